"""Mamba1 selective scan, side by side on one GPU: the Pallas kernel (`pallas_kernels/selective_scan.py`), the JAX
sequential reference (`ops.scan.selective_scan`, lax.scan) and the JAX associative scan
(`ops.scan.selective_scan_associative`, materialises (b,l,d,n)).

Same inputs for all, as a MambaInLlama Mamba1 layer feeds them: bf16 u/z/B/C, fp32 delta (raw: + delta_bias and
softplus inside), fp32 A/D/delta_bias, B/C in groups of d_state channels (g = d / n). fwd = y and the final state;
fwd+bwd = forward + every gradient (u, delta, A, B, C, D, z, delta_bias) for a given cotangent of y. Median of
`--reps` timed calls after warm-up (host clock around call + block_until_ready), each implementation cut off at
`--deadline` seconds of timing and the whole run at `--budget` seconds (what was skipped is recorded).

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda MAMBA_LLAMA_UNVERIFIED_KERNELS=1 \\
        python3 benchmarks/bench_selective_scan.py --out benchmarks/results
    .venv/bin/python benchmarks/bench_selective_scan.py --tiny --out /tmp/ss   # CPU smoke run (interpreted)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mamba_llama_jax.ops.scan import selective_scan, selective_scan_associative  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.selective_scan import selective_scan_pallas  # noqa: E402

SHAPES = [(8, 2048, 1152, 16), (8, 2048, 3072, 16)]  # (b, l, d, n): SmolLM2 Mamba1 (d_inner 2·576), and wider
PEAK_BW = 3.35e12  # B/s, H100 SXM HBM3 datasheet
ASSOC_MAX_BYTES = 24e9  # skip the associative scan where one fp32 (b,l,d,n) tensor times ~6 would not fit


def inputs(shape, seed=0) -> dict:
    b, l, d, n = shape
    g = d // n
    r = np.random.default_rng(seed)
    f = np.float32
    bf = jnp.bfloat16
    return dict(
        u=jnp.asarray(r.standard_normal((b, l, d), f)).astype(bf),
        delta=jnp.asarray(r.standard_normal((b, l, d), f) - 2.0),
        A=jnp.asarray(-np.tile(np.arange(1, n + 1, dtype=f), (d, 1))),  # A_log = log(1..n), the S4D init
        B=jnp.asarray(r.standard_normal((b, l, g, n), f)).astype(bf),
        C=jnp.asarray(r.standard_normal((b, l, g, n), f)).astype(bf),
        D=jnp.ones((d,), jnp.float32),
        z=jnp.asarray(r.standard_normal((b, l, d), f)).astype(bf),
        delta_bias=jnp.asarray(r.uniform(-4.0, -2.0, (d,)).astype(f)),
        dy=jnp.asarray(r.standard_normal((b, l, d), f)).astype(bf),
    )


def min_bytes(shape, bwd: bool) -> int:
    """Each input read once, each output written once (bf16 u/z/y/B/C, fp32 delta; small per-channel arrays and
    the kernel's saved chunk states left out)."""
    b, l, d, n = shape
    bc = 2 * b * l * (d // n) * n * 2
    fwd = b * l * d * (2 + 4 + 2 + 2) + bc + b * d * n * 4
    if not bwd:
        return fwd
    return fwd + b * l * d * (2 + 4 + 2 + 2 + 2 + 4 + 2) + 2 * bc  # reads u, delta, z, dy; writes du, ddelta, dz


def implementations(variants, tiny: bool) -> dict:
    impls = {}
    for name, kw in variants:
        impls[f"pallas[{name}]"] = (selective_scan_pallas, dict(kw, interpret=tiny))
    impls["jax_sequential"] = (selective_scan, {})
    impls["jax_associative"] = (selective_scan_associative, {})
    return impls


def make_runs(fn, kw, ins):
    def f(u, delta, A, B, C, D, z, bias):
        return fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, **kw)

    def fb(u, delta, A, B, C, D, z, bias, dy):
        (y, fin), vjp = jax.vjp(f, u, delta, A, B, C, D, z, bias)
        return vjp((dy, jnp.zeros_like(fin)))

    args = tuple(ins[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    return {"fwd": (jax.jit(f), args), "fwd+bwd": (jax.jit(fb), args + (ins["dy"],))}


def time_call(run, args, reps: int, deadline_s: float, warmup: int = 2) -> dict:
    t0 = time.perf_counter()
    out = jax.block_until_ready(run(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(run(*args))
    ts = []
    stop = time.perf_counter() + deadline_s
    while len(ts) < reps and time.perf_counter() < stop:
        t = time.perf_counter()
        jax.block_until_ready(run(*args))
        ts.append((time.perf_counter() - t) * 1e3)
    r = dict(median_ms=statistics.median(ts), min_ms=min(ts), reps=len(ts), first_call_s=round(first, 3))
    if len(ts) < reps:
        r["note"] = f"deadline hit after {len(ts)} of {reps} timed calls"
    return r, out


def bench_shape(shape, impls, args, log, budget_end: float) -> dict:
    b, l, d, n = shape
    ins = inputs(shape)
    res, outs = {}, {}
    for name, (fn, kw) in impls.items():
        runs = make_runs(fn, kw, ins)
        for mode in ("fwd", "fwd+bwd"):
            key = f"{name} {mode}"
            if time.perf_counter() > budget_end:
                res[key] = dict(skipped="time budget of the run spent")
                continue
            if name == "jax_associative" and b * l * d * n * 4 * (6 if mode == "fwd" else 12) > ASSOC_MAX_BYTES:
                res[key] = dict(skipped="materialises (b,l,d,n) fp32 tensors: over the memory cap at this shape")
                continue
            run, a = runs[mode]
            try:
                if name.startswith("pallas"):  # which implementation runs: the Pallas calls must be in the graph
                    assert "selective_scan_fwd" in str(jax.make_jaxpr(run)(*a)), "no Pallas call traced"
                deadline = min(args.deadline, max(1.0, budget_end - time.perf_counter()))
                r, out = time_call(run, a, args.reps, deadline)
                r["min_bytes"] = min_bytes(shape, mode != "fwd")
                r["GB_s"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
                r["pct_of_3.35TB_s"] = 100 * r["GB_s"] * 1e9 / PEAK_BW
                res[key] = r
                if mode == "fwd":
                    outs[name] = np.asarray(out[0].astype(jnp.float32))
                log(f"  {key:34s} {r['median_ms']:9.3f} ms  {r['GB_s']:7.0f} GB/s ({r['pct_of_3.35TB_s']:.1f} % "
                    f"of 3.35 TB/s)  reps {r['reps']}  first call {r['first_call_s']} s")
            except Exception as e:  # keep going: one failing implementation must not lose the others' numbers
                res[key] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
                log(f"  {key:34s} ERROR {type(e).__name__}: {str(e)[:300]}")
    entry = dict(shape=shape, groups=d // n, results=res)
    ref = outs.get("jax_sequential")
    for name, y in outs.items():
        if ref is not None and name != "jax_sequential":
            entry[f"rel_err_y {name} vs jax_sequential"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    try:
        entry["dispatch_choice"] = dispatch.selective_scan_choice(
            *(ins[k] for k in ("u", "delta", "A", "B", "C")), D=ins["D"], z=ins["z"], delta_bias=ins["delta_bias"])
    except Exception as e:
        entry["dispatch_choice"] = f"error: {e}"
    return entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--deadline", type=float, default=6.0, help="seconds of timed calls per implementation and mode")
    ap.add_argument("--budget", type=float, default=105.0, help="seconds for the whole run (then the rest skips)")
    ap.add_argument("--shapes", default="0,1")
    # name:chunk:block_d:num_warps:bwd_block_d:bwd_num_warps[:prefetch:bwd_prefetch]; the first is the default
    ap.add_argument("--variants", default="default:16:32:4:32:4:4:2")
    ap.add_argument("--skip", default="", help="comma list of implementations to leave out (jax_associative, ...)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: one tiny shape, kernel interpreted")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.tiny:
        SHAPES[:] = [(1, 24, 16, 4)]
        args.shapes, args.reps, args.variants = "0", 3, "c4b8:4:8:4:8:4:2:2"
    variants = []
    for v in args.variants.split(","):
        name, q, bd, w, bbd, bw, *pf = v.split(":")
        kw = dict(chunk_size=int(q), block_d=int(bd), num_warps=int(w), bwd_block_d=int(bbd), bwd_num_warps=int(bw))
        if pf:
            kw.update(prefetch=int(pf[0]), bwd_prefetch=int(pf[1]))
        variants.append((name, kw))
    os.makedirs(args.out, exist_ok=True)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                python=platform.python_version(), unverified_kernels=dispatch.unverified_allowed(),
                dtypes="bf16 u/z/B/C/y, fp32 delta/A/D/delta_bias, fp32 states; g = d / n; bias + softplus inside",
                timing="median of host-timed calls (call + block_until_ready) after 2 warm-up calls")
    try:
        import jaxlib
        meta["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    try:
        meta["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:
        pass
    log(json.dumps(meta))
    impls = {k: v for k, v in implementations(variants, args.tiny).items() if k not in args.skip.split(",")}
    results = []
    budget_end = start + args.budget
    for si in map(int, args.shapes.split(",")):
        shape = SHAPES[si]
        log(f"shape (b,l,d,n) = {shape}, groups {shape[2] // shape[3]}")
        results.append(bench_shape(shape, impls, args, log, budget_end))
        with open(os.path.join(args.out, "selective_scan.json"), "w") as fh:
            json.dump(dict(meta=meta, results=results), fh, indent=1)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.out, "selective_scan.json"), "w") as fh:
        json.dump(dict(meta=meta, results=results), fh, indent=1)
    write_md(meta, results, os.path.join(args.out, "selective_scan.md"))
    print(open(os.path.join(args.out, "selective_scan.md")).read())


def _cell(r: dict) -> str:
    if "median_ms" in r:
        return f"{r['median_ms']:.3f}"
    return (r.get("skipped") or r.get("error") or "-")[:50]


def write_md(meta, results, path) -> None:
    out = ["# Mamba1 selective scan benchmark\n", f"`{json.dumps(meta)}`\n",
           "ms (median); GB/s = minimum bytes (each input read once, each output written once) / time, and its "
           "share of the H100's 3.35 TB/s.\n"]
    for e in results:
        out.append(f"\n## (b,l,d,n) = {tuple(e['shape'])}, groups {e['groups']}; dispatcher picks "
                   f"`{e.get('dispatch_choice')}`\n")
        out.append("| implementation | fwd ms | fwd GB/s (% peak) | fwd+bwd ms | fwd+bwd GB/s (% peak) |\n"
                   "|---|---|---|---|---|")
        names = sorted({k.rsplit(" ", 1)[0] for k in e["results"]})
        for nm in names:
            f, fb = e["results"].get(f"{nm} fwd", {}), e["results"].get(f"{nm} fwd+bwd", {})
            bw = lambda r: f"{r['GB_s']:.0f} ({r['pct_of_3.35TB_s']:.1f} %)" if "GB_s" in r else "-"
            out.append(f"| {nm} | {_cell(f)} | {bw(f)} | {_cell(fb)} | {bw(fb)} |")
        for k, v in e.items():
            if k.startswith("rel_err"):
                out.append(f"\n{k}: {v:.2e}")
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
