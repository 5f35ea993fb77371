"""Does the Llama-3-8B 50 % hybrid distillation step fit? Compiled ahead of time from abstract shapes, no weights.

The teacher (configs/teachers/llama3-8b.yaml) and the 50 % hybrid are built with `nnx.eval_shape`, so every
parameter is a ShapeDtypeStruct; the trainer's own `build_step` places them on a fake CPU mesh (their
NamedShardings from the logical-axis rules) and the step is lowered and compiled with `jit(...).lower(...)
.compile()`. Per device: parameters and optimizer state from the shard shapes of the step's arguments; activations
and temporaries from `compiled.memory_analysis()` (XLA's buffer assignment for the whole step). Each mesh runs in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N (jax fixes the device count at import).

Caveats, also written into the results: XLA:CPU's buffer assignment is not XLA:GPU's or XLA:TPU's (CPU has no
native bf16 dot and may keep fp32 copies, fusion differs), so the temporaries are an estimate of the right order,
not a guarantee; real runs also need the framework's own reserve (CUDA context, NCCL buffers: ~1–3 GB on a GPU).

    PYTHONPATH=$PWD python benchmarks/memory_llama3_8b.py            # all cases -> benchmarks/results/
    PYTHONPATH=$PWD python benchmarks/memory_llama3_8b.py --only 8:1x8x1:mamba:full:8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
H100, V5P = 80e9, 95e9

# (devices, mesh (data, fsdp, tensor), trained parameters, remat policy, global batch in sequences of 2048)
CASES = [
    (8, (1, 8, 1), "mamba", "full", 8),     # 8-GPU host, official layer-wise stage, FSDP over all 8
    (8, (1, 8, 1), "mamba", "none", 8),     # the same without rematerialisation
    (8, (1, 8, 1), "all", "full", 8),       # end-to-end distillation: every parameter trains (AdamW state for 8B)
    (32, (1, 32, 1), "mamba", "full", 32),  # 32-chip TPU slice (v5p-64), FSDP over all 32
    (32, (1, 32, 1), "all", "full", 32),
    (32, (4, 8, 1), "mamba", "full", 32),   # the slice as 4 data-parallel groups of 8-way FSDP
]
SEQ = 2048


def case_id(c: tuple) -> str:
    n, mesh, train, remat, batch = c
    return f"{n}:{'x'.join(map(str, mesh))}:{train}:{remat}:{batch}"


def parse_case(s: str) -> tuple:
    n, mesh, train, remat, batch = s.split(":")
    return int(n), tuple(int(x) for x in mesh.split("x")), train, remat, int(batch)


def worker(case: tuple, teacher_dtype: str) -> dict:
    """In the subprocess: build abstract models, compile the step, measure."""
    import math

    import jax
    import numpy as np
    from flax import nnx

    from mamba_llama_jax.config import (DataConfig, HybridConfig, LlamaConfig, LossConfig, OptimConfig, StageConfig,
                                        load_config)
    from mamba_llama_jax.models.hybrid import HybridLM
    from mamba_llama_jax.models.llama import LlamaLM, rope_inv_freq
    from mamba_llama_jax.train import mesh as mesh_lib
    from mamba_llama_jax.train.trainer import build_step

    n, mesh_shape, train, remat, batch = case
    assert jax.device_count() == n, (jax.device_count(), n)
    base = load_config(LlamaConfig, ROOT / "configs" / "teachers" / "llama3-8b.yaml")
    s_cfg = base.__class__(**{**base.__dict__, "dtype": "bfloat16", "param_dtype": "float32"})
    # The frozen teacher needs no fp32 master copy; its dtype is a choice of the recipe (run_recipe: param_dtype).
    t_cfg = base.__class__(**{**base.__dict__, "dtype": "bfloat16", "param_dtype": teacher_dtype})
    hyb = HybridConfig(attn_fraction=0.5)
    teacher = nnx.eval_shape(lambda: LlamaLM(t_cfg, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: HybridLM(s_cfg, hyb, rngs=nnx.Rngs(1)))
    for m in (teacher, student):  # eval_shape turns every array attribute abstract, the RoPE table too: restore it
        m._inv_freq = rope_inv_freq(base.head_dim, base.rope_theta, base.rope_scaling)
    # The official layer-wise stage (CE + 0.1 KL batchmean, only Mamba trains) or end-to-end (KL, all).
    loss = (LossConfig(ce_weight=1.0, kl_weight=0.1, kl_normalization="sequence_sum") if train == "mamba"
            else LossConfig(ce_weight=0.0, kl_weight=1.0, kl_normalization="token_mean"))
    stage = StageConfig(name="aot", objective="distill", train=train, steps=1000, batch_size=batch,
                        data=DataConfig(source="-", kind="tokens", seq_len=SEQ), loss=loss, optim=OptimConfig(),
                        remat=remat)
    mesh = mesh_lib.make_mesh(mesh_shape)
    step = build_step(stage, student, teacher, mesh)
    s, t = step.student, step.teacher
    opt = jax.eval_shape(step.tx.init, s.trainable)
    opt = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt, step.opt_shardings)
    bsh = mesh_lib.batch_sharding(mesh)
    tok = lambda: jax.ShapeDtypeStruct((batch, SEQ), np.int32, sharding=bsh)
    b = {"tokens": tok(), "loss_mask": tok(), "segment_ids": tok()}
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=mesh_lib.replicated(mesh))
    teacher_p = {**t.trainable, **t.frozen}

    def per_device(tree) -> int:
        return int(sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                       for a in jax.tree.leaves(tree)))

    def total(tree) -> int:
        return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))

    t0 = time.perf_counter()
    lowered = step.fn.lower(s.trainable, opt, rng, s.frozen, teacher_p, b)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                            "temp_size_in_bytes", "generated_code_size_in_bytes")}
    # Donated trainable params and optimizer state alias their outputs: the live peak is args + temps + the outputs
    # that are not aliased.
    peak = mem["argument_size_in_bytes"] + mem["temp_size_in_bytes"] + mem["output_size_in_bytes"] - mem[
        "alias_size_in_bytes"]
    counts = {"student_trainable": sum(math.prod(a.shape) for a in jax.tree.leaves(s.trainable)),
              "student_frozen": sum(math.prod(a.shape) for a in jax.tree.leaves(s.frozen)),
              "teacher": sum(math.prod(a.shape) for a in jax.tree.leaves(teacher_p))}
    return {
        "case": case_id(case), "devices": n, "mesh": dict(zip(("data", "fsdp", "tensor"), mesh_shape)),
        "train": train, "remat": remat, "global_batch": batch, "seq_len": SEQ, "teacher_param_dtype": teacher_dtype,
        "student_param_dtype": "float32", "compute_dtype": "bfloat16", "param_counts": counts,
        "per_device_bytes": {
            "student_trainable_params": per_device(s.trainable), "student_frozen_params": per_device(s.frozen),
            "teacher_params": per_device(teacher_p), "optimizer_state": per_device(opt),
            "batch": per_device(b), "activations_and_temporaries": mem["temp_size_in_bytes"],
            "peak_estimate": peak,
        },
        "whole_model_bytes": {"student": total(s.trainable) + total(s.frozen), "teacher": total(teacher_p),
                              "optimizer_state": total(opt)},
        "memory_analysis": mem, "lower_s": t1 - t0, "compile_s": t2 - t1,
    }


def run_case(case: tuple, teacher_dtype: str, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={case[0]}")
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, "--worker", case_id(case), "--teacher-dtype", teacher_dtype],
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case_id(case), "error": f"compilation did not finish within {timeout} s"}
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode or line is None:
        return {"case": case_id(case), "error": r.stderr[-2000:]}
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    return res


def verdict(res: dict) -> dict:
    peak = res["per_device_bytes"]["peak_estimate"]
    return {name: {"capacity_gb": cap / GB, "fits": peak <= cap, "headroom_gb": (cap - peak) / GB}
            for name, cap in (("H100 80 GB", H100), ("TPU v5p 95 GB", V5P))}


def write(results: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        if "error" not in r:
            r["verdict"] = verdict(r)
    (out / "memory_llama3_8b.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        "# Llama-3-8B 50 % hybrid distillation step: memory per device, compiled ahead of time", "",
        f"{meta['date']}; jax {meta['jax']}, flax {meta['flax']}, optax {meta['optax']}; compiled on XLA:CPU with "
        f"fake devices ({meta['host']}). Sequence {SEQ}, bf16 compute, fp32 student parameters and AdamW state, "
        f"teacher parameters stored {meta['teacher_param_dtype']}, their matrices cast to bf16 once per step build "
        f"(`trainer.frozen_in_compute_dtype`). Parameters from the shard shapes of the step's "
        "arguments; activations/temporaries = `memory_analysis().temp_size_in_bytes`; peak = arguments + "
        "temporaries + non-aliased outputs. GB = 1e9 bytes.", "",
        "| devices | mesh (data, fsdp, tensor) | trains | remat | global batch | student params | teacher params "
        "| optimizer | activations + temps | peak | H100 80 GB | v5p 95 GB | compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error'].splitlines()[-1][:120] if r['error'] else '?'} |")
            continue
        p = r["per_device_bytes"]
        v = r["verdict"]
        fit = lambda k: ("fits" if v[k]["fits"] else "NO") + f" ({v[k]['headroom_gb']:+.1f})"
        m = r["mesh"]
        lines.append(
            f"| {r['devices']} | ({m['data']}, {m['fsdp']}, {m['tensor']}) | {r['train']} | {r['remat']} | "
            f"{r['global_batch']} | {(p['student_trainable_params'] + p['student_frozen_params']) / GB:.2f} | "
            f"{p['teacher_params'] / GB:.2f} | {p['optimizer_state'] / GB:.2f} | "
            f"{p['activations_and_temporaries'] / GB:.2f} | {p['peak_estimate'] / GB:.2f} | {fit('H100 80 GB')} | "
            f"{fit('TPU v5p 95 GB')} | {r['compile_s']:.0f} s |")
    lines += ["", "Headroom in GB in brackets (negative: over by that much).", ""] + meta.get("notes", [])
    (out / "memory_llama3_8b.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", action="append", default=[], metavar="CASE", help="devices:mesh:train:remat:batch")
    ap.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per compilation")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(parse_case(args.worker), args.teacher_dtype)), flush=True)
        return
    import flax
    import jax
    import optax

    cases = [parse_case(c) for c in args.only] or CASES
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "host": f"{platform.machine()}, {os.cpu_count()} CPU cores", "teacher_param_dtype": args.teacher_dtype,
            "seq_len": SEQ}
    results = []
    for c in cases:
        print(f"compiling {case_id(c)} ...", flush=True)
        r = run_case(c, args.teacher_dtype, args.timeout)
        print(json.dumps(r, indent=1)[:3000], flush=True)
        results.append(r)
    write(results, Path(args.out), meta)


if __name__ == "__main__":
    main()
