"""Multi-GPU scaling of the distillation step: `bench_train.py --devices N` (issue 10).

One run on one machine, through the same `train.mesh` code the trainer uses everywhere: the SmolLM2-135M 50 %
hybrid distillation step at sequence 2048 on 1 device, then on N devices as pure data parallelism (mesh
(N, 1, 1): parameters replicated, gradients all-reduced) and as FSDP (mesh (1, N, 1): parameters and optimizer
state sharded over `fsdp` along `embed`, gathered per layer). Weak scaling: every device keeps the per-device batch
(8 rows), so the global batch is 8·N and the ideal is N times the 1-device tokens/s.

Per configuration: median step time (≥ 20 timed steps after warm-up, `block_until_ready`), tokens/s, MFU (analytic
model FLOPs of the global batch / time / (N · 989 TFLOP/s)), the scaling ratio against 1 device, the collectives
XLA compiled into the step (op counts and bytes from the optimised HLO), and the collective time from a profile
(`jax.profiler.trace` over a few steps, read back with `jax.profiler.ProfileData`): per device and step, the time
NCCL collective kernels run (`collective_ms`) and the part of it no compute kernel overlaps (`exposed_ms`).

Stages: `layerwise` (the official layer-wise stage, only Mamba mixers train: the same step `bench_train.py`
times on one GPU) and `all` (end-to-end, every parameter trains: the largest gradient all-reduce).

The exact-resume check (`resume`): two steps on the N-device FSDP mesh, a checkpoint written by the trainer's own
`Checkpointer`, restored on a 1-device mesh and on the CPU; every array (trainable, frozen, optimizer state, RNG,
step) must come back bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

MESHES = ("1", "data", "fsdp")
STAGES = ("layerwise", "all")
GOAL_RATIO_PER_DEVICE = 0.9  # issue 10: >= 1.8x on two GPUs
PROFILE_STEPS = 5
COLLECTIVE_RE = re.compile(r"all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|collective-?permute|nccl",
                           re.IGNORECASE)
HLO_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}


def items(n_devices: int) -> list[str]:
    """What one run measures, in priority order (the budget may cut the tail)."""
    out = ["scale:layerwise:1", "scale:layerwise:data", "scale:layerwise:fsdp"]
    if n_devices > 1:
        out.append("resume:fsdp")
    return out + ["scale:all:1", "scale:all:data", "scale:all:fsdp"]


def mesh_shape(kind: str, n: int) -> tuple[int, int, int]:
    return {"1": (1, 1, 1), "data": (n, 1, 1), "fsdp": (1, n, 1)}[kind]


# ------------------------------------------------------------------------------------------ HLO collectives


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collective ops of an optimised HLO module: count and result bytes per kind (async pairs counted once, by
    their `-start`; the result shape of a start op is a tuple whose last element is the destination buffer)."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?\S+\s*=\s*(.+?)\s+(" + "|".join(HLO_OPS) + r")(-start)?\(", line)
        if not m:
            continue
        shapes = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))
        if m.group(3) and len(shapes) > 1:
            shapes = shapes[len(shapes) // 2:]  # (operands..., results...): the results
        nbytes = 0
        for dt, dims in shapes:
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            nbytes += size * _DTYPE_BYTES.get(dt, 4)
        rec = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        rec["count"] += 1
        rec["bytes"] += nbytes
    return out


# ------------------------------------------------------------------------------------------------ profiles


def _union(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _length(intervals: Sequence[tuple[int, int]]) -> int:
    return sum(b - a for a, b in intervals)


def _minus(xs: Sequence[tuple[int, int]], ys: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of the (merged) intervals xs not covered by the (merged) intervals ys."""
    out, j = [], 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        cur, k = a, j
        while k < len(ys) and ys[k][0] < b:
            if ys[k][0] > cur:
                out.append((cur, ys[k][0]))
            cur = max(cur, ys[k][1])
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


_SKIP_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Framework", "Source code", "python")


def collective_time(planes: Iterable[Any], steps: int) -> dict[str, Any]:
    """Per device and step: time in collective kernels, the part of it no other kernel overlaps, and the time any
    kernel runs. `planes`: XPlanes as `jax.profiler.ProfileData` gives them (name, lines → events with name,
    start_ns, end_ns). GPU planes ('/device:GPU:k') are read from their stream lines ('Stream #…'); without GPU
    planes (the CPU test) each XLA executor thread of the host plane counts as one device."""
    units: list[tuple[str, list[Any]]] = []
    planes = list(planes)
    gpus = [p for p in planes if p.name.startswith("/device:") and "CPU" not in p.name]
    for p in gpus:
        lines = list(p.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")]
        units.append((p.name, streams or [ln for ln in lines if not ln.name.startswith(_SKIP_LINES)]))
    if not gpus:
        for p in planes:
            for ln in p.lines:
                if ln.name.startswith("tf_XLAExecute"):
                    units.append((f"{p.name}:{ln.name}", [ln]))
    per_device, names, others = [], {}, {}
    for name, lines in units:
        coll, comp = [], []
        for ln in lines:
            for e in ln.events:
                iv = (int(e.start_ns), int(e.end_ns))
                pool = names if COLLECTIVE_RE.search(e.name) else others
                pool[e.name[:80]] = pool.get(e.name[:80], 0) + iv[1] - iv[0]
                (coll if pool is names else comp).append(iv)
        c, k = _union(coll), _union(comp)
        per_device.append({"device": name, "collective_ms": _length(c) / 1e6 / steps,
                           "exposed_ms": _length(_minus(c, k)) / 1e6 / steps,
                           "busy_ms": _length(_union(c + k)) / 1e6 / steps,
                           "lines": [ln.name for ln in lines][:8]})
    # by kernel name, summed over all devices (per step): which collectives the time went to
    top = sorted(names.items(), key=lambda kv: -kv[1])[:6]
    mean = (lambda key: statistics.mean(d[key] for d in per_device)) if per_device else (lambda key: float("nan"))
    return {"steps": steps, "devices": len(per_device), "collective_ms": mean("collective_ms"),
            "exposed_ms": mean("exposed_ms"), "busy_ms": mean("busy_ms"), "per_device": per_device,
            "top_collectives_ms": {k: v / 1e6 / steps for k, v in top},
            # what else ran (summed over devices, per step): what the collective pattern was matched against
            "top_other_events_ms": {k: v / 1e6 / steps for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:8]}}


def profile_steps(run_step: Any, steps: int = PROFILE_STEPS) -> dict[str, Any]:
    """Profiles `steps` calls of `run_step` and returns `collective_time` of the trace (or why it could not)."""
    import jax
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="scaling_profile_")
    try:
        with jax.profiler.trace(d):
            for _ in range(steps):
                run_step()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return {"error": "the profiler wrote no .xplane.pb"}
        return collective_time(ProfileData.from_file(files[0]).planes, steps)
    except Exception as e:  # noqa: BLE001 - a profiler that cannot run must not lose the timings
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the items


def _stage_for(bt: Any, stage: str, batch: int, seq: int, steps: int) -> Any:
    base = bt._stage(bt.Variant(f"scale-{stage}", ssd="pallas", batch=batch), seq, steps)
    return dataclasses.replace(base, train="mamba" if stage == "layerwise" else "all")


def _rows(bt: Any, args: argparse.Namespace, n: int) -> tuple[int, int, int]:
    """(sequence length, rows per device, global batch) on `n` devices: weak scaling."""
    per_device = 2 if args.tiny else 8
    return (bt.TINY_SEQ if args.tiny else bt.SEQ), per_device, per_device * n


def _devices(n: int) -> list[Any]:
    import jax

    devs = jax.devices()
    if len(devs) < n:
        raise RuntimeError(f"--devices {n}: only {len(devs)} {jax.default_backend()} device(s) are visible")
    return devs[:n]


def run_scale(bt: Any, item: str, models: tuple[Any, ...], args: argparse.Namespace, cap_s: float) -> dict[str, Any]:
    """One `scale:<stage>:<mesh>` item: compile, time and profile the step on that mesh."""
    import jax
    import numpy as np

    from mamba_llama_jax.train import mesh as mesh_lib
    from mamba_llama_jax.train import trainer

    _, stage_name, kind = item.split(":")
    cfg, hyb, teacher, student = models
    n = 1 if kind == "1" else args.devices
    seq, per_device, batch = _rows(bt, args, n)
    stage = _stage_for(bt, stage_name, batch, seq, args.steps)
    shape = mesh_shape(kind, n)
    mesh = mesh_lib.make_mesh(shape, _devices(n))
    res: dict[str, Any] = {"name": item, "stage": stage_name, "train": stage.train, "mesh": kind,
                           "mesh_shape": list(shape), "devices": n, "batch": batch, "per_device_batch": per_device,
                           "seq_len": seq}
    with bt.implementations(bt.Variant("scale", ssd="pallas")) as info:
        step = trainer.build_step(stage, student, teacher, mesh)
        tr, opt, rng, fr, tp, b = bt.step_inputs(step, batch, seq, cfg.vocab_size)
        t0 = time.perf_counter()
        compiled = step.fn.lower(tr, opt, rng, fr, tp, b).compile()
        res["compile_s"] = time.perf_counter() - t0
    res["implementations"] = info
    res["hlo_collectives"] = hlo_collectives(compiled.as_text())
    res["sharded_parameters"] = sorted(k for k, v in {**tr, **fr}.items() if not v.sharding.is_fully_replicated)[:5]
    res["n_sharded_parameters"] = sum(not v.sharding.is_fully_replicated for v in {**tr, **fr}.values())
    st: dict[str, Any] = {"tr": tr, "opt": opt, "rng": rng, "m": None}

    def one() -> None:
        st["tr"], st["opt"], st["rng"], st["m"] = compiled(st["tr"], st["opt"], st["rng"], fr, tp, b)
        jax.block_until_ready((st["tr"], st["m"]))

    for _ in range(args.warmup):
        one()
    med, ts = bt._median_ms(one, args.steps, cap_s)
    res["profile"] = profile_steps(one, 2 if args.tiny else PROFILE_STEPS)
    m = {k: float(np.asarray(x)) for k, x in st["m"].items()}
    flops = bt.analytic_flops(cfg, set(student.attn_layers), batch, seq, stage.train, "none", hyb.mamba.chunk_size)
    res.update({"step_ms_median": med, "step_ms": ts, "steps_timed": len(ts),
                "tokens_per_s": batch * seq / (med / 1e3), "model_flops": flops["model_flops"],
                "mfu": flops["model_flops"] / (med / 1e3) / (n * bt.PEAK_BF16), "last_metrics": m,
                "loss_finite": all(np.isfinite(x) for x in m.values())})
    return res


def _host(tree: Any) -> Any:
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _same(a: Any, b: Any) -> tuple[int, int, list[str]]:
    """(leaves, bit-identical leaves, names of the differing ones)."""
    import jax

    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree.leaves(b)
    bad = []
    for (path, x), y in zip(fa, fb):
        ok = x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()
        if not ok:
            bad.append(jax.tree_util.keystr(path))
    return len(fa), len(fa) - len(bad), bad[:10]


def _abstract_on(state: Any, mesh: Any) -> Any:
    """The state's shapes with each array's partition spec kept but placed on `mesh` (a 1-device mesh names the
    same axes, so every spec stays valid)."""
    import jax
    from jax.sharding import NamedSharding

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, x.sharding.spec)),
                        state)


def run_resume(bt: Any, item: str, models: tuple[Any, ...], args: argparse.Namespace) -> dict[str, Any]:
    """Saves after two steps on the N-device mesh and restores on 1 device and on the CPU, bit for bit."""
    import jax

    from mamba_llama_jax.config import CheckpointConfig
    from mamba_llama_jax.train import mesh as mesh_lib
    from mamba_llama_jax.train import trainer

    kind = item.split(":")[1]
    cfg, _, teacher, student = models
    n = args.devices
    seq, _, batch = _rows(bt, args, n)
    stage = _stage_for(bt, "layerwise", batch, seq, 10)
    mesh = mesh_lib.make_mesh(mesh_shape(kind, n), _devices(n))
    res: dict[str, Any] = {"name": item, "saved_on": {"mesh": kind, "shape": list(mesh_shape(kind, n)), "devices": n}}
    with bt.implementations(bt.Variant("scale", ssd="pallas")):
        step = trainer.build_step(stage, student, teacher, mesh, donate=False)
        tr, opt, rng, fr, tp, b = bt.step_inputs(step, batch, seq, cfg.vocab_size)
        for _ in range(2):
            tr, opt, rng, _m = step.fn(tr, opt, rng, fr, tp, b)
    state = {"trainable": tr, "frozen": fr, "opt_state": opt, "rng": rng, "step": trainer._step_array(2, mesh)}
    res["saved_sharded_arrays"] = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    saved = _host(state)
    d = Path(tempfile.mkdtemp(prefix="scaling_ckpt_"))
    try:
        ck = trainer.Checkpointer(d, CheckpointConfig(async_save=False))
        ck.save(2, state, None, {"stage": stage.name, "step": 2})
        ck.close()
        targets = {"1 device": mesh_lib.make_mesh((1, 1, 1), _devices(1))}
        try:
            cpu = jax.devices("cpu")[:1]
        except RuntimeError:
            cpu = []
        if cpu and jax.default_backend() != "cpu":
            targets["cpu"] = mesh_lib.make_mesh((1, 1, 1), cpu)
        elif not cpu:
            res["cpu"] = {"skipped": "no CPU backend in this process (JAX_PLATFORMS excludes it)"}
        ck = trainer.Checkpointer(d, CheckpointConfig(async_save=False))
        for label, m1 in targets.items():
            restored, meta = ck.restore(2, _abstract_on(state, m1), None)
            placed = {str(x.sharding.device_set) for x in jax.tree.leaves(restored)}
            leaves, same, bad = _same(saved, _host(restored))
            res[label] = {"leaves": leaves, "bit_identical": same, "differing": bad, "meta": meta,
                          "restored_on": sorted(placed)[:2]}
        ck.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    res["exact"] = all(res[k]["bit_identical"] == res[k]["leaves"] for k in ("1 device", "cpu") if k in res
                       and "leaves" in res[k])
    return res


def run_item(bt: Any, item: str, models: tuple[Any, ...], args: argparse.Namespace) -> dict[str, Any]:
    if item.startswith("resume:"):
        return run_resume(bt, item, models, args)
    return run_scale(bt, item, models, args, args.time_per_variant)


# ------------------------------------------------------------------------------------------------- reports


def summary_line(r: dict[str, Any]) -> str:
    if "error" in r or "skipped" in r:
        return f"{r['name']}: {r.get('error') or r.get('skipped')}"[:300]
    if r["name"].startswith("resume:"):
        parts = [f"{k}: {r[k]['bit_identical']}/{r[k]['leaves']} bit-identical" for k in ("1 device", "cpu")
                 if "leaves" in r.get(k, {})]
        return f"{r['name']}: " + "; ".join(parts)
    p = r.get("profile", {})
    return (f"{r['name']}: {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, MFU "
            f"{100 * r['mfu']:.1f} %, collectives {p.get('collective_ms', float('nan')):.1f} ms/step "
            f"(exposed {p.get('exposed_ms', float('nan')):.1f}) (compile {r['compile_s']:.0f} s)")


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """tokens/s of each N-device mesh over the same stage's 1-device figure."""
    out = {}
    for st in STAGES:
        base = results.get(f"scale:{st}:1", {}).get("tokens_per_s")
        for kind in ("data", "fsdp"):
            r = results.get(f"scale:{st}:{kind}", {})
            if base and "tokens_per_s" in r:
                ratio = r["tokens_per_s"] / base
                out[f"{st}:{kind}"] = {"ratio": ratio, "per_device_efficiency": ratio / r["devices"],
                                       "devices": r["devices"]}
    return out


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    n = meta["devices"]
    lines = [
        f"# Distillation step on {n} devices: data parallel and FSDP against 1 device (issue 10)", "",
        f"{meta['date']}; device: {meta['device']} × {meta['device_count']} visible; versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f". Command: `{meta['command']}`. "
        f"Wall {meta.get('wall_s', 0):.0f} s. Environment: "
        + (", ".join(f"{k}={v}" for k, v in meta["env"].items()) or "none set") + ".", "",
        "Step: `train.trainer.build_step` over `train.mesh.make_mesh`, "
        f"{'tiny CPU model' if meta['tiny'] else 'SmolLM2-135M-shaped 50 % hybrid (random weights)'}, "
        f"sequence {results.get('scale:layerwise:1', {}).get('seq_len', '?')}, bf16 compute, fp32 master weights, "
        "Pallas SSD through the dispatcher (column SSD), fused KL/CE; weak scaling: the per-device batch stays "
        "fixed, the global batch grows with the mesh. Median of ≥ 20 timed steps after warm-up (host clock around "
        "call + block_until_ready). MFU = analytic model FLOPs / time / (devices × 989 TFLOP/s). Collectives: "
        f"from a profile of {PROFILE_STEPS} steps, per device and step (kernel time; exposed = not overlapped by "
        "any compute kernel); HLO: collective ops XLA compiled into the step.", "",
        "| stage (trains) | mesh | (data, fsdp, tensor) | devices | global batch | ms/step | tokens/s | ratio vs 1 | "
        "efficiency | MFU | collective ms/step | exposed ms | HLO collectives | SSD | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rat = ratios(results)
    for name, r in results.items():
        if not name.startswith("scale:"):
            continue
        _, st, kind = name.split(":")
        head = f"| {st} ({'Mamba mixers' if st == 'layerwise' else 'all'}) | {kind} |"
        if "step_ms_median" not in r:
            lines.append(head + f" {(r.get('error') or r.get('skipped', '?')).splitlines()[0][:160]} |" + " |" * 11)
            continue
        p = r.get("profile", {})
        coll = ("profile failed: " + p["error"][:80]) if "error" in p else f"{p['collective_ms']:.2f}"
        exp = "" if "error" in p else f"{p['exposed_ms']:.2f}"
        hlo = ", ".join(f"{k} ×{v['count']} ({v['bytes'] / 1e6:.1f} MB)" for k, v in r["hlo_collectives"].items())
        rr = rat.get(f"{st}:{kind}")
        lines.append(
            f"{head} {tuple(r['mesh_shape'])} | {r['devices']} | {r['batch']} | {r['step_ms_median']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {f'{rr['ratio']:.2f}x' if rr else '1.00x' if kind == '1' else ''} | "
            f"{f'{rr['per_device_efficiency']:.2f}' if rr else ''} | {100 * r['mfu']:.1f} % | {coll} | {exp} | "
            f"{hlo or 'none'} | {r['implementations']['ssd']} | {r['compile_s']:.0f} |")
    lines += ["", f"**Goal** (issue 10: ≥ {GOAL_RATIO_PER_DEVICE * 2:.1f}x on two GPUs, ≥ "
              f"{GOAL_RATIO_PER_DEVICE} efficiency per added GPU):", ""]
    if not rat:
        lines.append("- no N-device configuration was measured next to its 1-device figure")
    for key, v in rat.items():
        met = v["per_device_efficiency"] >= GOAL_RATIO_PER_DEVICE
        lines.append(f"- {key}: {v['ratio']:.2f}x on {v['devices']} devices, efficiency "
                     f"{v['per_device_efficiency']:.2f}: " + ("met" if met else
                     f"missed by {GOAL_RATIO_PER_DEVICE - v['per_device_efficiency']:.2f} efficiency"))
    res = next((r for k, r in results.items() if k.startswith("resume:")), None)
    lines += ["", "**Exact resume across device counts** (trainer `Checkpointer`, saved after 2 steps):", ""]
    if res is None or "error" in res or "skipped" in res:
        lines.append("- not run: " + ("" if res is None else (res.get("error") or res.get("skipped", ""))[:300]))
    else:
        so = res["saved_on"]
        lines.append(f"- saved on mesh {so['mesh']} {tuple(so['shape'])} ({so['devices']} devices, "
                     f"{res['saved_sharded_arrays']} arrays sharded)")
        for k in ("1 device", "cpu"):
            v = res.get(k)
            if v is None:
                continue
            lines.append(f"- restored on {k}: " + (v["skipped"] if "skipped" in v else
                         f"{v['bit_identical']} of {v['leaves']} arrays bit-identical"
                         + (f"; differing: {v['differing']}" if v["differing"] else "")))
        lines.append(f"- exact: **{res['exact']}**")
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("train_scaling.json", json.dumps({"meta": meta, "ratios": ratios(results),
                                                          "results": list(results.values())}, indent=1)),
                       ("train_scaling.md", markdown(meta, results))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
