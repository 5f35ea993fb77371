"""Greedy LM head + argmax alone: XLA's GEMM and argmax against `pallas_kernels.lm_head_argmax` at its tilings, on
SmolLM2's head (49,152 × 576, bf16, random weights) at batch 1 and 64 — which tiling the kernel's default
should be, and what the decode step can save (the head was ~0.046 ms of a ~0.8 ms step at batch 64).

Each figure: a jitted loop of `--inner` head calls, each one's hidden rows depending on the ids before (so none is
hoisted or skipped), timed with `block_until_ready`, warm-up excluded, median of `--runs` runs, divided by
`--inner`; both sides do the same work (rows → ids).

    python benchmarks/bench_lm_head.py --out benchmarks/results          # device
    python benchmarks/bench_lm_head.py --tiny --out /tmp/lm_head         # CPU smoke test (interpret mode)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TILINGS = ((64, 4, 4), (128, 4, 4), (128, 3, 4), (128, 4, 8), (256, 3, 4), (256, 3, 8))  # (block_v, stages, warps)


def timed(head: Callable[[Any, Any], Any], h: Any, wt: Any, inner: int, runs: int) -> float:
    """Median µs per head call of a jitted loop of `inner` calls."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def loop(h: Any, wt: Any) -> Any:
        def body(i: Any, carry: Any) -> Any:
            x, acc = carry
            ids = head(x, wt)
            return x + (ids % 2).astype(x.dtype)[:, None] * 1e-3, acc + ids
        return jax.lax.fori_loop(0, inner, body, (h, jnp.zeros(h.shape[:1], jnp.int32)))

    jax.block_until_ready(loop(h, wt))
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(loop(h, wt))
        walls.append(time.perf_counter() - t)
    return 1e6 * statistics.median(walls) / inner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: small head, interpret mode")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--inner", type=int, default=50)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--stem", default="lm_head")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from bench_env import device, now, versions
    from pallas_kernels import lm_head_argmax as lm

    interpret = jax.default_backend() != "gpu"
    vocab, k = (1024, 64) if a.tiny else (49152, 576)
    inner, runs = (2, 2) if a.tiny else (a.inner, a.runs)
    tilings = TILINGS[:2] if a.tiny else TILINGS
    r: dict[str, Any] = {"meta": {"date": now(), "device": device(), "versions": versions(),
                                  "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                                  "vocab": vocab, "width": k, "inner": inner, "runs": runs}, "rows": []}
    kw, kh = jax.random.split(jax.random.key(0))
    wt = (jax.random.normal(kw, (vocab, k)) * 0.05).astype(jnp.bfloat16)
    for b in map(int, a.batches.split(",")):
        h = jax.random.normal(kh, (b, k)).astype(jnp.bfloat16)
        want = lm.lm_head_argmax_reference(h, wt)
        row: dict[str, Any] = {"batch": b, "xla_us": timed(lm.lm_head_argmax_reference, h, wt, inner, runs),
                               "kernel_us": {}}
        for bv, st, wp in tilings:
            def head(x: Any, w: Any, bv: int = bv, st: int = st, wp: int = wp) -> Any:
                return lm.lm_head_argmax_pallas(x, w, interpret=interpret, block_v=bv, stages=st, warps=wp)
            same = bool(jnp.all(head(h, wt) == want))
            row["kernel_us"][f"bv{bv}/s{st}/w{wp}"] = {"us": timed(head, h, wt, inner, runs), "ids_equal": same}
        r["rows"].append(row)
        best = min(row["kernel_us"].items(), key=lambda kv: kv[1]["us"])
        print(f"b={b}: XLA {row['xla_us']:.1f} µs; best kernel {best[0]} {best[1]['us']:.1f} µs", flush=True)
    lines = [f"# Greedy LM head + argmax alone ({r['meta']['device']}, {r['meta']['date']})", "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in r['meta']['versions'].items())}. "
             f"Command: `{r['meta']['command']}`.", "",
             f"Head {vocab} × {k} bf16 (random), µs per call: median of {runs} runs of a jitted loop of {inner} calls"
             " (warm-up excluded). Kernel tilings: ids per program / pipeline stages / warps; `=` where its ids equal"
             " XLA's.", "",
             "| batch | XLA GEMM + argmax | " + " | ".join(f"kernel {t}" for t in r["rows"][0]["kernel_us"]) + " |",
             "|---|---|" + "---|" * len(r["rows"][0]["kernel_us"])]
    for row in r["rows"]:
        cells = " | ".join(f"{v['us']:.1f}{' =' if v['ids_equal'] else ' ≠'}" for v in row["kernel_us"].values())
        lines.append(f"| {row['batch']} | {row['xla_us']:.1f} | {cells} |")
    md = "\n".join(lines) + "\n"
    stem = a.stem + ("_tiny" if a.tiny else "")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(r, indent=1))
    (a.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
