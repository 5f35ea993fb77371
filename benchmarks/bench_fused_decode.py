"""Each fused decode GEMV alone (pallas_kernels/fused_decode.py) against its XLA reference, at the SmolLM2 decode
shapes: device time per call (from a profile: the union of the kernels' intervals, so launch gaps do not count),
host wall time per call, and the weight bandwidth the device time achieves. Sweeps the outputs per program
(`block_n`) and `num_warps`, the two knobs that set how many SMs stream the weights (issue 3: a layer's
weights are 4.4 MB, 1.5 µs at 3 TB/s, yet the fused layer took ~30 µs).

`--cold-mb M`: each timed call runs the GEMV on as many weight copies as make M MB, in turn (M well past the
50-60 MB L2: 200), so every call reads its weights from HBM, as a decode step does (the model is ~270 MB);
without it the same weights are re-read from L2 and the figures flatter the kernels (the 2026-11-24 sweep did
that). The 2026-12-04 run used 48 copies of every GEMV instead, which is 53 / 32 MB for q·k·v / o: still in L2.
XLA may merge the copies' dots, which share their input (its dot merger), so its cold figures are a lower bound;
the decode-step profile (bench_decode_profile.py) is the measure that counts.

    python benchmarks/bench_fused_decode.py                 # device: batch 1 and 8, results/fused_decode.md
    python benchmarks/bench_fused_decode.py --cold-mb 200 --batches 1   # weights from HBM: fused_decode_cold.md
    python benchmarks/bench_fused_decode.py --tiny          # CPU smoke test (interpret mode, small shapes)

`--dot`: the dot path (16 / 32 / 64 rows, what serves batches past the 1-D path's) instead, swept over
`fused_decode.tiling`'s dot knobs — rows a program (`--dot-rows`), outputs a program (`--dot-blocks`), pipeline
stages (`--dot-stages`), K a loop step (`--dot-k`) — and warps, for the GEMVs a decode step at those batches can
give it: gate·up + SiLU·mul on normalised rows (`gate_up_pallas`, the default there: issue 3's batch 64 spends
6.2 µs a layer in it for 3.5 MB of weights) and the o / down projections + residual (`matmul_residual_pallas`,
against XLA's GEMM and add). Results go to fused_decode_dot[_cold].md:

    python benchmarks/bench_fused_decode.py --dot --batches 64 --cold-mb 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# SmolLM2-135M: hidden 576, 9 + 3 + 3 heads of 64 (q·k·v 960), MLP 1536.
SHAPES = {"qkv": ("norm_matmul", 576, 960), "o": ("matmul_residual", 576, 576),
          "gate_up": ("norm_gate_up", 576, 1536), "down": ("matmul_residual", 1536, 576)}
TINY_SHAPES = {"qkv": ("norm_matmul", 64, 96), "o": ("matmul_residual", 64, 64),
               "gate_up": ("norm_gate_up", 64, 128), "down": ("matmul_residual", 128, 64)}
DOT_SHAPES = {"gate_up": ("gate_up", 576, 1536), "o": ("matmul_residual", 576, 576),
              "down": ("matmul_residual", 1536, 576)}
TINY_DOT_SHAPES = {"gate_up": ("gate_up", 64, 128), "down": ("matmul_residual", 128, 64)}
BLOCKS = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4)
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}  # HBM3 / HBM3e, vendor figures


def make_fns(kind: str, k: int, n: int, rows: int, interpret: bool, cold: float = 0.0,
             ) -> tuple[tuple[Any, ...], Callable[..., Any], Callable[..., Any], int]:
    """(arguments, reference, kernel(block_n, num_warps) -> fn, weight bytes) for one GEMV; with `cold` > 0 (MB)
    the functions take that many MB of weight copies and return the GEMV of each (`cold_over`)."""
    import functools

    import jax
    import jax.numpy as jnp

    from pallas_kernels import fused_decode as fd

    keys = jax.random.split(jax.random.key(0), 4)
    dt = jnp.bfloat16
    x = jax.random.normal(keys[0], (rows, k), dt)
    nw = 1 + 0.1 * jax.random.normal(keys[1], (k,), jnp.float32)
    if kind == "norm_matmul":
        w = (jax.random.normal(keys[2], (n, k), jnp.float32) / k ** 0.5).astype(dt)  # output-major
        args = (x, nw, w)
        ref = jax.jit(functools.partial(fd.norm_matmul_reference, eps=1e-5))
        ker = lambda bn, nwarps: jax.jit(functools.partial(fd.norm_matmul_pallas, eps=1e-5, block_n=bn,
                                                           num_warps=nwarps, interpret=interpret))
    elif kind == "norm_gate_up":
        w = (jax.random.normal(keys[2], (2 * n, k), jnp.float32) / k ** 0.5).astype(dt)
        args = (x, nw, w)
        ref = jax.jit(functools.partial(fd.norm_gate_up_reference, eps=1e-5))
        ker = lambda bn, nwarps: jax.jit(functools.partial(fd.norm_gate_up_pallas, eps=1e-5, block_n=bn,
                                                           num_warps=nwarps, interpret=interpret))
    elif kind == "gate_up":  # rows already normalised (the dot path's form past the 1-D path's batches)
        w = (jax.random.normal(keys[2], (2 * n, k), jnp.float32) / k ** 0.5).astype(dt)
        args = (x, w)
        ref = jax.jit(fd.gate_up_reference)
        ker = lambda bn, nwarps: jax.jit(functools.partial(fd.gate_up_pallas, block_n=bn, num_warps=nwarps,
                                                           interpret=interpret))
    else:
        w = (jax.random.normal(keys[2], (n, k), jnp.float32) / k ** 0.5).astype(dt)
        args = (x, w, jax.random.normal(keys[3], (rows, n), dt))
        ref = jax.jit(fd.matmul_residual_reference)
        ker = lambda bn, nwarps: jax.jit(functools.partial(fd.matmul_residual_pallas, block_n=bn,
                                                           num_warps=nwarps, interpret=interpret))
    wbytes = int(w.size) * 2
    if cold:
        cold = max(2, math.ceil(cold * 2 ** 20 / wbytes))  # MB -> copies
        wpos = 1 if kind in ("matmul_residual", "gate_up") else 2
        copies = [w] + [(w.astype(jnp.float32) * (1.0 + 1e-3 * c)).astype(dt) for c in range(1, cold)]
        args = args[:wpos] + (tuple(copies),) + args[wpos + 1:]
        ref, kernel = cold_over(ref, wpos), ker
        ker = lambda bn, nwarps: cold_over(kernel(bn, nwarps), wpos)
    return args, ref, ker, wbytes


def cold_over(fn: Callable[..., Any], wpos: int) -> Callable[..., Any]:
    """fn with its weight argument (position wpos) replaced by a tuple of copies: one jitted program calling fn
    on each copy in turn (XLA runs them one after another on one stream), returning every result (an unused one
    would be dropped by XLA)."""
    import jax

    def run_all(*args: Any) -> tuple[Any, ...]:
        return tuple(fn(*args[:wpos], w, *args[wpos + 1:]) for w in args[wpos])
    return jax.jit(run_all)


def time_fn(fn: Callable[..., Any], args: tuple[Any, ...], reps: int) -> dict[str, float]:
    """Median host wall time per call (µs, block_until_ready each) and device busy time per call (µs, from a
    profile of `reps` calls), after a warm-up call."""
    import jax
    from train_scaling import profile_steps

    jax.block_until_ready(fn(*args))
    walls = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append((time.perf_counter() - t) * 1e6)
    prof = profile_steps(lambda: jax.block_until_ready(fn(*args)), reps)
    busy = prof.get("busy_ms", float("nan")) * 1e3
    return {"wall_us": statistics.median(walls), "device_us": busy,
            **({"profile_error": prof["error"]} if "error" in prof else {})}


def _measure(row: dict[str, Any], fn: Callable[..., Any], args: tuple[Any, ...], want: Any, reps: int,
             copies: int, cold: float, peak_gbs: float | None) -> dict[str, Any]:
    """row + fn's max abs difference from `want`, its per-GEMV times and bandwidth (or the error it raised)."""
    import numpy as np

    first = (lambda o: o[0]) if cold else (lambda o: o)
    try:
        got = np.asarray(first(fn(*args)), np.float32)
        row["max_abs_diff"] = float(np.abs(got - want).max())
        t = time_fn(fn, args, reps)
        row.update({kk: v / copies if kk.endswith("_us") else v for kk, v in t.items()})
    except Exception as e:  # noqa: BLE001 - a block the compiler refuses is a finding, not a stop
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    if "device_us" in row and row["device_us"] == row["device_us"]:
        row["gb_s"] = row["weight_bytes"] / (row["device_us"] * 1e-6) / 1e9
        if peak_gbs:
            row["share_of_peak"] = row["gb_s"] / peak_gbs
    print(json.dumps(row), flush=True)
    return row


def _setup(kind: str, k: int, n: int, b: int, interpret: bool, cold: float) -> tuple[Any, ...]:
    """make_fns + the reference's result (the first copy's when cold) and the number of weight copies."""
    import numpy as np

    args, ref, ker, wbytes = make_fns(kind, k, n, b, interpret, cold)
    copies = next((len(a) for a in args if isinstance(a, tuple)), 1)
    out = ref(*args)
    return args, ref, ker, wbytes, copies, np.asarray(out[0] if cold else out, np.float32)


def run(shapes: dict[str, tuple[str, int, int]], batches: tuple[int, ...], blocks: tuple[int, ...],
        warps: tuple[int, ...], reps: int, interpret: bool, peak_gbs: float | None,
        cold: float = 0.0) -> list[dict[str, Any]]:
    rows_out = []
    for b in batches:
        for name, (kind, k, n) in shapes.items():
            args, ref, ker, wbytes, copies, want = _setup(kind, k, n, b, interpret, cold)
            variants = [("xla", None, None, ref)] + [(f"pallas bn{bn} w{nw}", bn, nw, ker(bn, nw))
                                                       for bn in blocks for nw in warps]
            for label, bn, nw, fn in variants:
                row = {"batch": b, "gemv": name, "kind": kind, "k": k, "n": n, "impl": label, "block_n": bn,
                       "num_warps": nw, "weight_bytes": wbytes, "copies": copies}
                rows_out.append(_measure(row, fn, args, want, reps, copies, cold, peak_gbs))
    return rows_out


def run_dot(shapes: dict[str, tuple[str, int, int]], batches: tuple[int, ...], grid: dict[str, tuple[int, ...]],
            warps: tuple[int, ...], reps: int, interpret: bool, peak_gbs: float | None,
            cold: float = 0.0) -> list[dict[str, Any]]:
    """The dot path's kernels over every combination of `grid`'s tiling values (dot_rows, dot_block, dot_stages,
    dot_k) and warps, each traced anew in its `fused_decode.tiling`, beside XLA's reference."""
    import itertools

    import jax

    from pallas_kernels import fused_decode as fd
    from pallas_kernels.dispatch import pow2_dividing

    rows_out = []
    for b in batches:
        for name, (kind, k, n) in shapes.items():
            args, ref, ker, wbytes, copies, want = _setup(kind, k, n, b, interpret, cold)
            base = {"batch": b, "gemv": name, "kind": kind, "k": k, "n": n, "weight_bytes": wbytes,
                    "copies": copies}
            rows_out.append(_measure({**base, "impl": "xla"}, ref, args, want, reps, copies, cold, peak_gbs))
            keys = ("dot_rows", "dot_block", "dot_stages", "dot_k")
            for vals in itertools.product(*(grid[kk] for kk in keys), warps):
                t, nw = dict(zip(keys, vals[:4])), vals[4]
                bk = pow2_dividing(k, t["dot_k"])
                if t["dot_rows"] > b or (t["dot_k"] > bk and bk in grid["dot_k"]):
                    continue  # more rows than the batch, or the same K step as another dot_k of the grid
                label = "pallas g{dot_rows} db{dot_block} ds{dot_stages} dk{dot_k}".format(**t) + f" w{nw}"
                jax.clear_caches()  # the kernels read the tiling when traced
                with fd.tiling(**t):
                    rows_out.append(_measure({**base, "impl": label, **t, "num_warps": nw}, ker(0, nw), args,
                                             want, reps, copies, cold, peak_gbs))
    return rows_out


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Fused decode GEMVs alone vs XLA ({meta['device']}, {meta['date']})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
             + f". Command: `{meta['command']}`. Device µs: union of the kernels' intervals in a profile of "
             f"{meta['reps']} calls, per call (launch gaps excluded); wall µs: median host time per call with "
             "block_until_ready (includes dispatch). GB/s: weight bytes / device time. "
             + (f"Cold: each call cycles through {meta['cold']} MB of weight copies (weights read from HBM), figures "
                "per GEMV." if meta.get("cold") else "Hot: the same weights every call (read from L2)."), "",
             "| batch | gemv (K→N) | impl | device µs | wall µs | GB/s | share of peak | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['gemv']} ({r['k']}→{r['n']}) | {r['impl']} | error: "
                         f"{r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['batch']} | {r['gemv']} ({r['k']}→{r['n']}) | {r['impl']} | {r['device_us']:.2f} | "
                     f"{r['wall_us']:.1f} | {r.get('gb_s', float('nan')):.0f} | "
                     f"{r.get('share_of_peak', float('nan')):.2f} | {r['max_abs_diff']:.3g} |")
    best = {}
    for r in rows:
        if "error" not in r and r["impl"] != "xla":
            key = (r["batch"], r["gemv"])
            if key not in best or r["device_us"] < best[key]["device_us"]:
                best[key] = r
    lines += ["", "Best kernel per GEMV against XLA (device µs):", ""]
    for (b, g), r in best.items():
        x = next(q for q in rows if q["batch"] == b and q["gemv"] == g and q["impl"] == "xla")
        if "error" not in x:
            lines.append(f"- batch {b} {g}: {r['impl']} {r['device_us']:.2f} vs XLA {x['device_us']:.2f} "
                         f"({x['device_us'] / r['device_us']:.2f}x)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: interpret mode, small shapes, few reps")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--cold-mb", dest="cold", type=float, default=0.0, metavar="MB",
                    help="time over MB of weight copies so that weights come from HBM (device: 200)")
    ap.add_argument("--dot", action="store_true", help="the dot path at 16-64 rows, swept over its tiling")
    ap.add_argument("--dot-rows", default="16,64")
    ap.add_argument("--dot-blocks", default="16,32,64")
    ap.add_argument("--dot-stages", default="4,8")
    ap.add_argument("--dot-k", default="32,64,128")
    ap.add_argument("--warps", default="", help="comma list (default: 1,2,4; with --dot: 4)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    if a.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from bench_env import device, now, versions

    dev = device()
    peak = next((v for k, v in PEAK_GBS.items() if k in dev), None)
    ints = lambda v: tuple(int(x) for x in v.split(",") if x)  # noqa: E731
    batches = ints(a.batches)
    warps = ints(a.warps) or ((4,) if a.dot else WARPS)
    if a.dot:
        grid = {"dot_rows": ints(a.dot_rows), "dot_block": ints(a.dot_blocks), "dot_stages": ints(a.dot_stages),
                "dot_k": ints(a.dot_k)}
        if a.tiny:
            grid = {"dot_rows": (16,), "dot_block": (16, 32), "dot_stages": (2,), "dot_k": (32,)}
        rows = run_dot(TINY_DOT_SHAPES if a.tiny else DOT_SHAPES, (16,) if a.tiny else batches, grid,
                       (4,) if a.tiny else warps, 2 if a.tiny else a.reps, a.tiny, None if a.tiny else peak,
                       a.cold)
    elif a.tiny:
        rows = run(TINY_SHAPES, (1,), (8, 16), (4,), 2, True, None, a.cold)
    else:
        rows = run(SHAPES, batches, BLOCKS, warps, a.reps, False, peak, a.cold)
    meta = {"date": now(), "device": dev, "versions": versions(), "reps": 2 if a.tiny else a.reps, "cold": a.cold,
            "command": "python benchmarks/bench_fused_decode.py "
                       + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "fused_decode" + ("_dot" if a.dot else "") + ("_cold" if a.cold else "") + ("_tiny" if a.tiny else "")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = report(rows, meta)
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
