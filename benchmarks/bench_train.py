"""Distillation step throughput and MFU on one GPU: the SmolLM2-135M-shaped 50 % hybrid at sequence 2048.

Random weights of the teacher's shape (configs/teachers/smollm2-135m.yaml), the hybrid of configs/hybrids/50.yaml,
the official layer-wise stage (only the Mamba mixers train; CE + 0.1·KL batchmean; AdamW), bf16 compute, fp32
master weights, packed rows of random documents. Each variant is the trainer's own jitted step
(`train.trainer.build_step`), compiled once, run twice to warm up, then timed `--steps` times (host clock around
call + block_until_ready); the median is reported. Variants, side by side:

    default        the project's default step: the fused chunked KL/CE (`losses.fused_distill_loss`), XLA
                   chunked SSD, no remat
    pallas         + the Pallas SSD kernel (`pallas_kernels.dispatch.ssd`; the dispatcher's choice is recorded)
    plain          materialised fp32 [B, L, V] logits (`stages.distill_loss_full`), XLA SSD, remat full: the issue's
                   "untuned" step
    fused-remat    plain with the fused loss (the loss lever alone)
    pallas-remat   pallas with remat full;  pallas-b16-remat: the same at batch 16
    flash-preview  pallas + cuDNN flash attention (jax.nn.dot_product_attention) in place of models.llama.attend: a
                   preview of a lever outside the trainer (benchmark-only substitution, not yet in the project);
                   flash-b16: the same at batch 16
    substeps:NAME  teacher forward / student forward+backward / optimizer update of the best variant, timed as
                   separate jitted calls, for the share of step time each takes

FLOPs are counted analytically (`analytic_flops`, formula written into the results) and set beside XLA's own
`compiled.cost_analysis()`; MFU = analytic FLOPs / step time / 989 TFLOP/s (H100 bf16 dense peak).

Variants run one after another in a worker process; the parent kills a worker that passes a variant's deadline
and starts a fresh one for the rest, and stops starting variants when the budget is spent, so the whole script
ends within `--budget` seconds (plus writing the results). A persistent compilation cache (`--cache-dir`) lets a second
run skip compilation (and shares autotuning results between variants).

    PYTHONPATH=$PWD python3 benchmarks/bench_train.py --out benchmarks/results          # one GPU, < 300 s
    PYTHONPATH=$PWD python benchmarks/bench_train.py --tiny --out /tmp/bt                  # CPU smoke test
    PYTHONPATH=$PWD python3 benchmarks/bench_train.py --devices 2 --budget 420 --out ...   # scaling (issue 10)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_train.py --tiny --devices 4 ...

`--devices N` runs `train_scaling.py` instead: the step on 1 device and on N (data parallel, FSDP), with the
collective time from a profile, and a checkpoint saved on N devices restored on 1 and on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import device, gpu_count, now, versions  # noqa: E402

PEAK_BF16 = 989e12  # H100 SXM dense bf16 FLOP/s (the datasheet figure MFU is quoted against)
FLOOR_TOKENS_PER_S = 50_000  # the untuned JAX step on the same H100, batch 8 x 2048
GOAL_MFU = 0.40
SEQ = 2048
TINY_SEQ = 64


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    loss: str = "fused"  # fused | full
    ssd: str = "xla"  # xla | pallas
    remat: str = "none"
    batch: int = 8
    attention: str = "xla"  # xla | cudnn (preview)
    preview: bool = False  # a lever outside the trainer, substituted here only


VARIANTS = [  # in priority order: when the budget runs out, the last ones are skipped
    Variant("default"),
    Variant("pallas", ssd="pallas"),
    Variant("plain", loss="full", remat="full"),
    Variant("fused-remat", remat="full"),
    Variant("pallas-remat", ssd="pallas", remat="full"),
    Variant("pallas-b16-remat", ssd="pallas", remat="full", batch=16),
    Variant("flash-preview", ssd="pallas", attention="cudnn", preview=True),
    Variant("flash-b16", ssd="pallas", attention="cudnn", batch=16, preview=True),
]
BY_NAME = {v.name: v for v in VARIANTS}


# ------------------------------------------------------------------------------------------------ FLOP count


FLOPS_FORMULA = """\
T = B·L tokens; D hidden, F MLP width, V vocabulary, H heads, KV kv-heads, d head size; Mamba2: di = H·d, dxb =
KV·d, N = P = d, chunk Q. One multiply-add = 2 FLOPs; elementwise work, norms, softmax, the conv and the
optimizer are not counted.
- attention layer, forward: projections 2·T·D·(H·d + 2·KV·d) + 2·T·H·d·D; QKᵀ and PV over the full L×L square, as
  the XLA attention computes them: 2 · 2·B·H·L²·d
- Mamba2 layer, forward: projections 2·T·D·(2·di + 2·dxb + H) + 2·T·di·D; chunked SSD 2·T·H·(Q·N + Q·P + 2·P·N)
  (C Bᵀ and its product with x inside each chunk, the chunk's state and the state read-out; Q = 256, the XLA
  reference's chunk)
- MLP 2·T·3·D·F per layer; LM head 2·T·D·V
- teacher: forward only. Student: forward; input gradients of everything from the loss down to the lowest layer
  with trained parameters (matmuls 1× their forward FLOPs, the attention core and the SSD 2×), less that layer's
  own input projection when nothing below it trains; weight gradients 2·T·(parameters) of trained matrices only
  (layer-wise stage: the Mamba mixers' in_proj and out_proj)
- rematerialisation recomputes each student layer's forward once more: counted in `hardware_flops`, not in the
  model FLOPs that MFU uses"""


def analytic_flops(cfg: Any, attn_layers: set[int], batch: int, seq: int, train: str, remat: str,
                   ssd_chunk: int) -> dict[str, float]:
    """Model FLOPs of one distillation step (FLOPS_FORMULA). `attn_layers`: the student's attention layers."""
    T = batch * seq
    D, F, V, H, KV, d = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim)
    di, dxb = H * d, KV * d
    attn_in = 2 * T * D * (H * d + 2 * KV * d)
    attn_proj = attn_in + 2 * T * H * d * D
    attn_core = 2 * 2 * batch * H * seq * seq * d
    mamba_in = 2 * T * D * (2 * di + 2 * dxb + H)
    mamba_proj = mamba_in + 2 * T * di * D
    ssd = 2 * T * H * (ssd_chunk * d + ssd_chunk * d + 2 * d * d)
    mlp = 2 * T * 3 * D * F
    head = 2 * T * D * V
    n = cfg.num_layers
    teacher = n * (attn_proj + attn_core + mlp) + head
    layer_fwd = [(attn_proj + attn_core if i in attn_layers else mamba_proj + ssd) + mlp for i in range(n)]
    student = sum(layer_fwd) + head
    trained = [i for i in range(n) if train == "all" or i not in attn_layers]
    lowest = min(trained)
    dx = head
    for i in range(lowest, n):
        core = attn_core if i in attn_layers else ssd
        dx += layer_fwd[i] + core  # matmuls once more, the core twice
    if train != "all":  # the embedding is frozen: nothing needs the lowest layer's input gradient
        dx -= attn_in if lowest in attn_layers else mamba_in
    if train == "all":
        dw = sum((attn_proj if i in attn_layers else mamba_proj) + mlp for i in range(n)) + head
    else:
        dw = sum(mamba_proj for i in range(n) if i not in attn_layers)
    model = teacher + student + dx + dw
    recompute = sum(layer_fwd) if remat != "none" else 0.0
    return {"teacher_forward": teacher, "student_forward": student, "student_input_grads": dx,
            "student_weight_grads": dw, "model_flops": model, "remat_recompute": recompute,
            "hardware_flops": model + recompute, "tokens": T}


# --------------------------------------------------------------------------------------------------- worker


def _configs(tiny: bool) -> tuple[Any, Any]:
    from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig, load_config

    if tiny:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, dtype="float32", max_position_embeddings=256,
                          tie_word_embeddings=True)
        return cfg, HybridConfig(attn_fraction=0.5, mamba=MambaConfig(chunk_size=16))
    base = load_config(LlamaConfig, ROOT / "configs" / "teachers" / "smollm2-135m.yaml")
    cfg = dataclasses.replace(base, dtype="bfloat16", param_dtype="float32")
    return cfg, load_config(HybridConfig, ROOT / "configs" / "hybrids" / "50.yaml")


def build_models(tiny: bool) -> tuple[Any, Any, Any, Any]:
    """Random teacher of the configured shape and the hybrid converted from it (initialised on the host CPU when
    one is visible: hundreds of small eager RNG ops compile and run faster there than one by one on a GPU)."""
    import jax
    from flax import nnx

    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.models.llama import LlamaLM

    cfg, hyb = _configs(tiny)
    try:
        where: Any = jax.default_device(jax.devices("cpu")[0])
    except Exception:  # noqa: BLE001 - JAX_PLATFORMS without cpu: build on the default device
        where = contextlib.nullcontext()
    with where:
        teacher = LlamaLM(cfg, rngs=nnx.Rngs(0))
        student = build_hybrid(teacher, hyb, rngs=nnx.Rngs(1))
    return cfg, hyb, teacher, student


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """Rows packed with random documents of 128..seq tokens (segment ids 1, 2, ...), no padding; every token
    but each document's first is a training target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, seq)).astype(np.int32)
    seg = np.zeros((batch, seq), np.int32)
    mask = np.ones((batch, seq), np.int32)
    for r in range(batch):
        pos, doc = 0, 1
        while pos < seq:
            n = int(rng.integers(min(128, seq), seq + 1))
            seg[r, pos:pos + n] = doc
            mask[r, pos] = 0
            pos, doc = pos + n, doc + 1
    return {"tokens": tokens, "loss_mask": mask, "segment_ids": seg}


@contextlib.contextmanager
def implementations(v: Variant) -> Iterator[dict[str, str]]:
    """Routes the model's SSD and attention to the variant's implementations while its step is traced.

    models/mamba.py looks the scan up in `ops.ssd.SSD_IMPLS` at trace time and calls the XLA reference directly;
    the Pallas variant points 'chunked' at the dispatcher, which picks the kernel on a GPU and records its choice.
    The flash preview points `models.llama.attend` at cuDNN's fused attention with the same boolean mask."""
    import jax

    from mamba_llama_jax.models import llama
    from mamba_llama_jax.ops import ssd as ssd_ops
    from pallas_kernels import dispatch

    info = {"ssd": "xla_chunked (ops.ssd.ssd_chunked, as models/mamba.py calls it)", "attention": "xla (llama.attend)"}
    old_ssd, old_attend = ssd_ops.SSD_IMPLS["chunked"], llama.attend
    try:
        if v.ssd == "pallas":
            ssd_ops.SSD_IMPLS["chunked"] = dispatch.ssd
        if v.attention == "cudnn":
            def attend(q: Any, k: Any, v_: Any, mask: Any) -> Any:
                return jax.nn.dot_product_attention(q, k, v_, mask=mask[:, None], implementation="cudnn")
            llama.attend = attend
            info["attention"] = "cudnn (jax.nn.dot_product_attention, boolean mask)"
        yield info
        if v.ssd == "pallas":
            info["ssd"] = f"dispatch.ssd -> {dispatch.last_choice('ssd')}"
    finally:
        ssd_ops.SSD_IMPLS["chunked"], llama.attend = old_ssd, old_attend


def _stage(v: Variant, seq: int, steps: int) -> Any:
    from mamba_llama_jax.config import DataConfig, LossConfig, OptimConfig, StageConfig

    return StageConfig(name=v.name.replace("/", "_"), objective="distill", train="mamba", steps=max(steps, 10),
                       batch_size=v.batch, remat=v.remat, data=DataConfig(source="-", kind="tokens", seq_len=seq),
                       loss=LossConfig(ce_weight=1.0, kl_weight=0.1, kl_normalization="sequence_sum"),
                       optim=OptimConfig(lr=8e-5, warmup_steps=5))


# Kept set in every worker, also where the caller's environment lacks them: NVLink multicast can take a shared
# host's GPUs out of service (the device tool's KINDS.md).
SHARED_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MIN_TIMED = 20  # the median is taken over at least this many steps (fewer only when --steps asks for fewer)


def _median_ms(fn: Any, n: int, cap_s: float) -> tuple[float, list[float]]:
    """Median wall time of `fn` over n calls; past `cap_s` seconds it stops once MIN_TIMED calls are in."""
    ts: list[float] = []
    end = time.time() + cap_s
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        if time.time() > end and len(ts) >= MIN_TIMED:
            break
    return statistics.median(ts), ts


def _cost(compiled: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["cost_analysis_flops"] = float(ca.get("flops", float("nan")))
        out["cost_analysis_bytes"] = float(ca.get("bytes accessed", float("nan")))
    except Exception as e:  # noqa: BLE001 - not every backend implements it
        out["cost_analysis_error"] = repr(e)[:300]
    try:
        ma = compiled.memory_analysis()
        out["memory_analysis"] = {k: int(getattr(ma, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")}
    except Exception as e:  # noqa: BLE001
        out["memory_analysis_error"] = repr(e)[:300]
    return out


def step_inputs(step: Any, batch: int, seq: int, vocab: int) -> tuple[Any, ...]:
    """The step's arguments in call order, as `trainer.fit` starts them: (trainable, optimizer state, rng,
    frozen, teacher parameters, a batch of `make_batch` rows), all on the step's mesh."""
    import jax

    from mamba_llama_jax.train import mesh as mesh_lib
    from mamba_llama_jax.train import trainer

    rng = jax.device_put(jax.random.key_data(jax.random.key(0)), mesh_lib.replicated(step.mesh))
    return (step.student.trainable, trainer.init_opt_state(step), rng, step.student.frozen,
            {**step.teacher.trainable, **step.teacher.frozen},
            mesh_lib.global_batch(make_batch(batch, seq, vocab), step.mesh))


def run_variant(v: Variant, models: tuple[Any, ...], args: argparse.Namespace, cap_s: float) -> dict[str, Any]:
    """Compiles and times the trainer's step for one variant."""
    import jax
    import numpy as np

    from mamba_llama_jax.train import mesh as mesh_lib
    from mamba_llama_jax.train import stages, trainer

    cfg, hyb, teacher, student = models
    seq = TINY_SEQ if args.tiny else SEQ
    batch = v.batch // 4 if args.tiny else v.batch
    v = dataclasses.replace(v, batch=batch)
    stage = _stage(v, seq, args.steps)
    mesh = mesh_lib.make_mesh()
    fns = (stages.distill_reference_full, stages.distill_loss_full) if v.loss == "full" else None
    res: dict[str, Any] = {"name": v.name, "settings": dataclasses.asdict(v), "seq_len": seq}
    with implementations(v) as info:
        step = trainer.build_step(stage, student, teacher, mesh, objective_fns=fns)
        tr, opt, rng, fr, tp, b = step_inputs(step, batch, seq, cfg.vocab_size)
        t0 = time.perf_counter()
        compiled = step.fn.lower(tr, opt, rng, fr, tp, b).compile()
        res["compile_s"] = time.perf_counter() - t0
    res["implementations"] = info
    res.update(_cost(compiled))
    st: dict[str, Any] = {"tr": tr, "opt": opt, "rng": rng, "m": None}

    def one() -> None:  # the step's donated outputs feed the next call, as in `trainer.fit`
        st["tr"], st["opt"], st["rng"], st["m"] = compiled(st["tr"], st["opt"], st["rng"], fr, tp, b)
        jax.block_until_ready((st["tr"], st["m"]))

    for _ in range(args.warmup):
        one()
    med, ts = _median_ms(one, args.steps, cap_s)
    m = {k: float(np.asarray(x)) for k, x in st["m"].items()}
    flops = analytic_flops(cfg, set(student.attn_layers), batch, seq, stage.train, v.remat, hyb.mamba.chunk_size)
    res.update({
        "step_ms_median": med, "step_ms": ts, "steps_timed": len(ts), "tokens_per_s": batch * seq / (med / 1e3),
        "flops": flops, "mfu": flops["model_flops"] / (med / 1e3) / PEAK_BF16,
        "hardware_flops_utilisation": flops["hardware_flops"] / (med / 1e3) / PEAK_BF16,
        "last_metrics": m, "loss_finite": all(np.isfinite(x) for x in m.values()),
    })
    return res


def run_substeps(v: Variant, models: tuple[Any, ...], args: argparse.Namespace, cap_s: float) -> dict[str, Any]:
    """The step's three parts as separate jitted calls: teacher forward (the objective's reference),
    student forward + backward (value_and_grad of the loss), optimizer update (clip + AdamW + apply)."""
    import jax
    import optax

    from mamba_llama_jax.train import mesh as mesh_lib
    from mamba_llama_jax.train import stages, trainer

    cfg, hyb, teacher, student = models
    seq = TINY_SEQ if args.tiny else SEQ
    batch = v.batch // 4 if args.tiny else v.batch
    stage = _stage(dataclasses.replace(v, batch=batch), seq, args.steps)
    mesh = mesh_lib.make_mesh()
    ref_fn, loss_fn = ((stages.distill_reference_full, stages.distill_loss_full) if v.loss == "full"
                       else stages.objective("distill"))
    out: dict[str, Any] = {"name": f"substeps:{v.name}", "of": v.name}
    with implementations(v) as info:
        step = trainer.build_step(stage, student, teacher, mesh, donate=False)
        s, t = step.student, step.teacher
        tr, fr = s.trainable, s.frozen
        tp = {**t.trainable, **t.frozen}
        b = mesh_lib.global_batch(make_batch(batch, seq, cfg.vocab_size), mesh)
        fwd = jax.jit(lambda tp, b: jax.lax.stop_gradient(ref_fn(t.merge(tp), b)))
        ref = jax.block_until_ready(fwd(tp, b))

        def loss(tr: Any, fr: Any, ref: Any, b: Any) -> Any:
            return jax.value_and_grad(lambda p: loss_fn(s.merge(p, fr), b, ref, stage.loss), has_aux=True)(tr)
        fwd_bwd = jax.jit(loss)
        (_, _), grads = jax.block_until_ready(fwd_bwd(tr, fr, ref, b))

        def upd(g: Any, o: Any, p: Any) -> Any:
            u, o = step.tx.update(g, o, p)
            return optax.apply_updates(p, u), o
        update = jax.jit(upd)
        opt = trainer.init_opt_state(step)
        jax.block_until_ready(update(grads, opt, tr))
    out["implementations"] = info
    parts = {"teacher_forward": lambda: jax.block_until_ready(fwd(tp, b)),
             "student_fwd_bwd": lambda: jax.block_until_ready(fwd_bwd(tr, fr, ref, b)),
             "optimizer": lambda: jax.block_until_ready(update(grads, opt, tr))}
    ms = {}
    for name, fn in parts.items():
        for _ in range(args.warmup):
            fn()
        ms[name] = _median_ms(fn, args.steps, cap_s / 3)[0]
    total = sum(ms.values())
    out.update({"ms": ms, "sum_ms": total, "share": {k: x / total for k, x in ms.items()}})
    return out


def _emit(kind: str, payload: dict[str, Any]) -> None:
    print("BENCH " + json.dumps({"event": kind, **payload}), flush=True)


def worker_main(args: argparse.Namespace) -> None:
    import gc

    import jax

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    models = build_models(args.tiny)
    _emit("ready", {"backend": jax.default_backend()})
    for item in args.items.split(","):
        _emit("start", {"name": item})
        try:
            if item.startswith(("scale:", "resume:")):
                import train_scaling

                res = train_scaling.run_item(sys.modules[__name__], item, models, args)
            elif (v := BY_NAME[item.split(":", 1)[-1]]).attention == "cudnn" and jax.default_backend() != "gpu":
                res = {"name": item, "skipped": "cuDNN attention needs a GPU"}
            elif item.startswith("substeps:"):
                res = run_substeps(v, models, args, args.time_per_variant)
            else:
                res = run_variant(v, models, args, args.time_per_variant)
        except Exception as e:  # noqa: BLE001 - one variant failing must not end the others
            msg = f"{type(e).__name__}: {e}"
            oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
            res = {"name": item, "error": ("out of memory: " if oom else "") + msg[:1500],
                   "traceback": traceback.format_exc()[-3000:]}
        _emit("result", res)
        gc.collect()
        jax.clear_caches()


# --------------------------------------------------------------------------------------------------- parent


class Worker:
    """A worker process running `items` in order; `events()` yields its BENCH lines, None on a timeout."""

    def __init__(self, args: argparse.Namespace, items: list[str], log: Path):
        cmd = [sys.executable, __file__, "--worker", "--items", ",".join(items), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--time-per-variant", str(args.timing_cap),
               "--devices", str(args.devices)]
        if args.tiny:
            cmd.append("--tiny")
        cmd += ["--cache-dir", args.cache_dir]  # '' (off) too: the worker's default would turn it on
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # batch 16 wants more than the default 75 %
        env.setdefault("MAMBA_LLAMA_UNVERIFIED_KERNELS", "1")  # measure kernels whether or not test-gpu passed
        if args.tiny:
            env["JAX_PLATFORMS"] = "cpu"
        elif args.devices and env.get("JAX_PLATFORMS") in ("cuda", "gpu"):
            env["JAX_PLATFORMS"] += ",cpu"  # the resume check restores on the CPU too
        for k, v in SHARED_GPU_ENV.items():  # NVLink multicast stays off on shared multi-GPU hosts (device notes)
            env.setdefault(k, v)
        self.log = log.open("a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     cwd=str(ROOT))
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                self.q.put(line[len("BENCH "):])
        self.q.put(None)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event, {'event': 'exit'} when the worker ended, None when `timeout` passed first."""
        try:
            line = self.q.get(timeout=max(timeout, 0.1))
        except queue.Empty:
            return None
        return {"event": "exit", "rc": self.proc.wait()} if line is None else json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def run_items(args: argparse.Namespace, items: list[str], end: float, log: Path,
              results: dict[str, dict[str, Any]]) -> None:
    """Runs `items` in workers until done or `end`, killing a worker whose variant passes its deadline."""
    pending = list(items)
    while pending:
        if end - time.time() < args.min_start_s:
            for it in pending:
                results[it] = {"name": it, "skipped": "the time budget was spent before it could start"}
            return
        w = Worker(args, pending, log)
        current, started = None, time.time()
        try:
            while True:
                limit = (end if current is None else min(end, started + args.variant_deadline)) - time.time()
                ev = w.next_event(limit)
                if ev is None:  # deadline of the current variant (or of everything) passed
                    name = current or pending[0]
                    why = "startup" if current is None else "compile + timing"
                    results[name] = {"name": name, "error": f"deadline: {why} did not finish in time"}
                    print(f"  {name}: deadline passed, worker killed", flush=True)
                    pending.remove(name)
                    break
                if ev["event"] == "exit":
                    if current is not None:
                        results[current] = {"name": current, "error": f"worker exited (rc {ev['rc']}) while running "
                                            f"it; see the log"}
                        pending.remove(current)
                    elif pending:
                        for it in pending:
                            results[it] = {"name": it, "error": f"worker exited (rc {ev['rc']}) before starting"}
                        pending.clear()
                    break
                if ev["event"] == "start":
                    current, started = ev["name"], time.time()
                    print(f"  {current} ...", flush=True)
                elif ev["event"] == "result":
                    ev.pop("event")
                    results[ev["name"]] = ev
                    pending.remove(ev["name"])
                    print("  " + summary_line(ev), flush=True)
                    current = None
                    if not pending:
                        break
        finally:
            w.kill()


def summary_line(r: dict[str, Any]) -> str:
    if r["name"].startswith(("scale:", "resume:")):
        import train_scaling

        return train_scaling.summary_line(r)
    if "error" in r or "skipped" in r:
        return f"{r['name']}: {r.get('error') or r.get('skipped')}"[:300]
    if "ms" in r:
        return f"{r['name']}: " + ", ".join(f"{k} {x:.1f} ms" for k, x in r["ms"].items())
    return (f"{r['name']}: {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, MFU "
            f"{100 * r['mfu']:.1f} % (compile {r['compile_s']:.0f} s)")




def best_variant(results: dict[str, dict[str, Any]]) -> str | None:
    """The fastest variant of the project itself (no preview) at the smallest batch measured."""
    ok = [r for r in results.values() if "step_ms_median" in r and not r["settings"]["preview"]]
    if not ok:
        return None
    small = min(r["settings"]["batch"] for r in ok)
    return min((r for r in ok if r["settings"]["batch"] == small), key=lambda r: r["step_ms_median"])["name"]


def write_results(out: Path, meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "flops_formula": FLOPS_FORMULA, "results": list(results.values())}
    tmp = out / "train.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / "train.json")
    tmp = out / "train.md.tmp"
    tmp.write_text(markdown(meta, results))
    os.replace(tmp, out / "train.md")


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    seq = TINY_SEQ if meta["tiny"] else SEQ
    lines = [
        "# Distillation step: tokens/s and MFU (" + ("tiny CPU smoke test" if meta["tiny"] else
                                                     "SmolLM2-135M 50 % hybrid") + ")",
        "",
        f"{meta['date']}; device: {meta['device']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f". Command: `{meta['command']}`. "
        f"Wall {meta.get('wall_s', 0):.0f} s.",
        "",
        f"Step: `train.trainer.build_step`, layer-wise stage (only Mamba mixers train, CE + 0.1·KL batchmean, AdamW), "
        f"bf16 compute, fp32 master weights, teacher matrices bf16; random weights; rows of {seq} tokens packed "
        f"with random documents. Median of the timed steps after {meta['warmup']} warm-up steps (host clock around "
        "call + block_until_ready). MFU = analytic model FLOPs / time / 989 TFLOP/s; HFU adds the remat "
        "recompute.",
        "",
        "| variant | loss | SSD | attention | remat | batch | ms/step | tokens/s | x floor | MFU | HFU | "
        "analytic TFLOP | XLA cost TFLOP | temp GB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        if "ms" in r or r["name"].startswith("substeps:"):
            continue
        st = r.get("settings") or dataclasses.asdict(BY_NAME.get(r["name"], Variant(r["name"])))
        head = (f"| {r['name']}{' (preview)' if st['preview'] else ''} | {st['loss']} | "
                f"{r.get('implementations', {}).get('ssd', st['ssd'])} | {st['attention']} | {st['remat']} | "
                f"{st['batch']} |")
        if "step_ms_median" not in r:
            lines.append(head + f" {(r.get('error') or r.get('skipped', '?')).splitlines()[0][:160]} |" + " |" * 8)
            continue
        fl = r["flops"]
        temp = r.get("memory_analysis", {}).get("temp_size_in_bytes", float("nan")) / 1e9
        ca = r.get("cost_analysis_flops", float("nan")) / 1e12
        lines.append(head + f" {r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / FLOOR_TOKENS_PER_S:.2f} | {100 * r['mfu']:.1f} % | "
                     f"{100 * r['hardware_flops_utilisation']:.1f} % | {fl['model_flops'] / 1e12:.3g} | {ca:.3g} | "
                     f"{temp:.3g} | {r['compile_s']:.0f} |")
    subs = [r for r in results.values() if r["name"].startswith("substeps:")]
    for r in subs:
        lines += ["", f"**Where the time goes** ({r['name']}, the three parts as separate jitted calls):", ""]
        if "ms" not in r:
            lines.append(f"not measured: {(r.get('error') or r.get('skipped', '?')).splitlines()[0][:300]}")
            continue
        step = results.get(r["of"], {}).get("step_ms_median")
        lines += ["| part | ms | share of the parts |", "|---|---|---|"]
        lines += [f"| {k} | {x:.1f} | {100 * r['share'][k]:.0f} % |" for k, x in r["ms"].items()]
        lines.append(f"| sum | {r['sum_ms']:.1f} | (the fused step: {step:.1f} ms) |" if step else
                     f"| sum | {r['sum_ms']:.1f} | |")
    lines += ["", "**Goal** (issue 6: >= 40 % MFU; floor 50,000 tokens/s at batch 8):", ""]
    lines += verdict(results)
    lines += ["", "**FLOPs counted** (the analytic column; `flops` in train.json has each term):", "", FLOPS_FORMULA,
              "", "XLA's `cost_analysis()` counts what it can see: nothing inside Pallas or cuDNN custom calls, "
              "and a while loop's body (the fused loss's chunk loop, the SSD's chunk scan) possibly once "
              "rather than per iteration, so it is a cross-check of the matmul count, not a replacement.", ""]
    lines += NOTES
    return "\n".join(lines) + "\n"


NOTES = [
    "Notes:",
    "- SSD: models/mamba.py takes its training scan from `ops.ssd.SSD_IMPLS[mamba.scan]` and so calls the XLA "
    "chunked reference directly, never the dispatcher; the Pallas variants point that entry at "
    "`pallas_kernels.dispatch.ssd` while the step is traced, and the SSD column shows what the dispatcher chose.",
    "- flash-*: a preview, not the project's step: `models.llama.attend` is replaced by cuDNN's fused attention "
    "(same boolean causal + document mask, so it cannot skip the masked half) for the whole run of the variant.",
    "- Teacher: forward only, outside `value_and_grad`, its matrices stored in bf16 (`trainer."
    "frozen_in_compute_dtype`); the loss: `losses.fused_distill_loss` (no [B, L, V] logits) except in `plain`.",
]


def verdict(results: dict[str, dict[str, Any]]) -> list[str]:
    ok = [r for r in results.values() if "mfu" in r]
    if not ok:
        return ["No variant was measured."]
    out = []
    for label, pool in (("in the project", [r for r in ok if not r["settings"]["preview"]]),
                        ("with the preview levers", ok)):
        if not pool:
            continue
        b = max(pool, key=lambda r: r["mfu"])
        met = b["mfu"] >= GOAL_MFU
        out.append(f"- best {label}: {b['name']}, {100 * b['mfu']:.1f} % MFU, {b['tokens_per_s']:,.0f} tokens/s "
                   f"({b['tokens_per_s'] / FLOOR_TOKENS_PER_S:.1f}x the floor): goal "
                   + ("met" if met else f"missed by {100 * (GOAL_MFU - b['mfu']):.1f} points "
                      f"({GOAL_MFU / b['mfu']:.1f}x short)"))
    return out


def orchestrate_scaling(args: argparse.Namespace) -> None:
    """`--devices N`: the step on 1 device and on N (data parallel, FSDP), and the cross-count resume check."""
    import train_scaling

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_scaling.log"
    log.write_text("")
    meta = {"date": now(), "device": device(), "device_count": gpu_count(), "devices": args.devices,
            "versions": versions(), "tiny": args.tiny, "warmup": args.warmup, "steps": args.steps,
            "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "env": {k: os.environ.get(k, v) for k, v in SHARED_GPU_ENV.items()}
            | {k: os.environ[k] for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION") if k in os.environ},
            "budget_s": args.budget, "peak_flops": PEAK_BF16}
    items = train_scaling.items(args.devices)
    results: dict[str, dict[str, Any]] = {}
    print(f"bench_train --devices {args.devices}: {len(items)} items, budget {args.budget:.0f} s, log {log}",
          flush=True)
    run_items(args, items, t0 + args.budget, log, results)
    meta["wall_s"] = time.time() - t0
    train_scaling.write(out, meta, {it: results[it] for it in items if it in results})
    print(f"wrote {out / 'train_scaling.json'} and {out / 'train_scaling.md'} in {meta['wall_s']:.0f} s", flush=True)


def orchestrate(args: argparse.Namespace) -> None:
    if args.devices:
        return orchestrate_scaling(args)
    t0 = time.time()
    end = t0 + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    log.write_text("")
    names = args.variants.split(",") if args.variants else [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(BY_NAME)}")
    meta = {"date": now(),
            "device": device(), "versions": versions(), "tiny": args.tiny, "warmup": args.warmup,
            "steps": args.steps, "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "env": {k: os.environ[k] for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                               "MAMBA_LLAMA_UNVERIFIED_KERNELS", "MAMBA_LLAMA_FORCE_REFERENCE")
                    if k in os.environ},
            "budget_s": args.budget, "peak_flops": PEAK_BF16, "floor_tokens_per_s": FLOOR_TOKENS_PER_S}
    results: dict[str, dict[str, Any]] = {}
    print(f"bench_train: {len(names)} variants, budget {args.budget:.0f} s, log {log}", flush=True)
    # Reserve time for the part shares: they explain the step, so they run even if late variants are skipped.
    reserve = 0 if args.no_substeps else args.substeps_reserve
    run_items(args, names, end - reserve, log, results)
    write_results(out, meta, results)
    best = best_variant(results)
    if best and not args.no_substeps:
        run_items(args, [f"substeps:{best}"], end, log, results)
    meta["wall_s"] = time.time() - t0
    write_results(out, meta, results)
    print(f"wrote {out / 'train.json'} and {out / 'train.md'} in {meta['wall_s']:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke test of this script)")
    ap.add_argument("--variants", default="", help="comma-separated subset of " + ",".join(BY_NAME))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=280, help="seconds for everything")
    ap.add_argument("--variant-deadline", type=float, default=150, help="seconds for one variant's compile + timing")
    ap.add_argument("--timing-cap", type=float, default=25,
                    help=f"seconds of timing per variant, past which it stops once {MIN_TIMED} steps are in")
    ap.add_argument("--substeps-reserve", type=float, default=45, help="seconds kept for the part timings")
    ap.add_argument("--no-substeps", action="store_true")
    ap.add_argument("--min-start-s", type=float, default=20, help="no worker is started with less time left")
    ap.add_argument("--cache-dir", default="/tmp/bench_train_xla_cache",
                    help="persistent compilation cache ('' = off)")
    ap.add_argument("--devices", type=int, default=0,
                    help="N > 0: the scaling run instead (1 device vs N, data parallel and FSDP, and the resume "
                    "check across device counts; writes train_scaling.json/.md). See benchmarks/train_scaling.py")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--items", default="", help=argparse.SUPPRESS)
    ap.add_argument("--time-per-variant", type=float, default=25, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.steps = min(args.steps, 3)
        args.warmup = min(args.warmup, 1)
    if args.worker:
        worker_main(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
