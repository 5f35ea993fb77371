"""Decode attention alone (pallas_kernels/decode_attention.py) against its XLA reference, at the SmolLM2 decode
shape (9 query heads, 3 KV heads of 64), swept over its tiling: slots per block × sequence splits × warps.

Why: at batch 1 a teacher layer takes ~28 µs on the H100 while its four fused GEMVs take ~11 µs
(`results/fused_decode.md`), and the hybrid decode table puts the one attention launch at ~12–15 µs, where reading
the 128–256 filled slots of 3 KV heads is well under 1 µs of bandwidth. This times the kernel by itself to find the
tiling `plan` should pick (or show that the kernel's structure, not its tiling, is the cost).

What is timed: the kernel's partials form (`decode_attention_partials_pallas`: RoPE, cache write, online softmax
per split; the merge of the splits runs in the o-projection's prologue in the decode step, so it is not here) and,
for reference, XLA's `decode_attention_reference` (RoPE, cache write, attention, all in one jit). The caches are
donated and fed back call after call, as in the decode loop, so no cache copy is timed. Device µs per call: the
union of the kernels' intervals in a profile (launch gaps excluded); wall µs: host time with block_until_ready.

With `--verify-tokens t` it times a speculative verify chunk's attention instead
(`pallas_kernels.verify_attention`: RoPE, the write of t tokens, causal GQA of t·g rows over cache + chunk; its
sequence splits merged by an XLA fusion, which is timed with it) against `verify_attention_reference`, over blocks
× splits (`planned` = `plan_splits`'s pick and the default 4 warps); stem `verify_attention`.

    python benchmarks/bench_decode_attention.py --out benchmarks/results            # device
    python benchmarks/bench_decode_attention.py --verify-tokens 4 --batches 1,4 \
        --contexts 384:256,4096:4000 --out benchmarks/results                      # device, verify chunks
    python benchmarks/bench_decode_attention.py --tiny --out /tmp/decode_attention  # CPU smoke test (interpret)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS, KV, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
TINY = dict(heads=4, kv=2, head_dim=16)
TINY_VERIFY = dict(heads=4, kv=2, head_dim=32)  # the verify kernel's smallest head
BLOCKS = (16, 32, 64, 128)
SPLITS = (1, 4, 8, 16, 32, 64)
WARPS = (1, 2, 4)
VERIFY_BLOCKS = (64, 128)
VERIFY_SPLITS = (1, 2, 4, 8, 16)
VERIFY_WARPS = (4,)  # verify_attention_pallas's default


def make_step(batch: int, slots: int, index: int, block: int | None, splits: int | None, warps: int | None,
              heads: int, kv: int, d: int, interpret: bool, verify_tokens: int = 0) -> Callable[[], Any]:
    """A no-argument call of one decode-attention step (kernel, or the XLA reference when `block` is None) on
    donated caches that it carries from call to call; with `verify_tokens` t, one verify chunk of t tokens
    written at slots [index, index + t)."""
    import jax
    import jax.numpy as jnp

    from mamba_llama_jax.ops.attention import decode_attention_reference, verify_attention_reference
    from pallas_kernels.decode_attention import decode_attention_partials_pallas
    from pallas_kernels.verify_attention import verify_attention_pallas

    k = jax.random.split(jax.random.key(0), 4)
    dt = jnp.bfloat16
    t = verify_tokens or 1
    lead = (batch, t) if verify_tokens else (batch,)
    qkv = jax.random.normal(k[0], (*lead, (heads + 2 * kv) * d), dt)
    caches = [jax.random.normal(k[1], (batch, slots, kv, d), dt), jax.random.normal(k[2], (batch, slots, kv, d), dt)]
    ang = jax.random.uniform(k[3], (*lead, d // 2), jnp.float32, 0, 100)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    idx = jnp.int32(index)
    valid = jnp.broadcast_to(jnp.arange(slots)[None, :] < index + t, (batch, slots))
    kw = dict(num_heads=heads, num_kv_heads=kv)
    if verify_tokens:
        if block is None:
            def fn(kc, vc):
                return verify_attention_reference(qkv, kc, vc, cos, sin, idx, valid, **kw)
        else:
            def fn(kc, vc):
                return verify_attention_pallas(qkv, kc, vc, cos, sin, idx, valid, block=block, splits=splits,
                                               num_warps=warps, interpret=interpret, **kw)
    elif block is None:
        def fn(kc, vc):
            return decode_attention_reference(qkv, kc, vc, cos, sin, idx, valid, num_heads=heads, num_kv_heads=kv,
                                              window=slots)
    else:
        def fn(kc, vc):
            return decode_attention_partials_pallas(qkv, kc, vc, cos, sin, idx, valid, num_heads=heads,
                                                    num_kv_heads=kv, window=slots, block=block, splits=splits,
                                                    num_warps=warps, interpret=interpret)
    jitted = jax.jit(fn, donate_argnums=(0, 1))

    def step() -> Any:
        out = jitted(*caches)
        caches[:] = out[-2:]
        return out[0]

    return step


def run(batches: tuple[int, ...], contexts: tuple[tuple[int, int], ...], blocks: tuple[int, ...],
        splits: tuple[int, ...], warps: tuple[int, ...], reps: int, interpret: bool, heads: int, kv: int,
        d: int, deadline: float = float("inf"), verify_tokens: int = 0,
        tilings: tuple[tuple[int, int, int], ...] = ()) -> list[dict[str, Any]]:
    """Every (block, splits, warps) of the three sweeps at each batch and context, or only `tilings` if given."""
    from bench_fused_decode import time_fn
    from pallas_kernels.decode_attention import pick_block, plan, planned_warps
    from pallas_kernels.verify_attention import plan_splits

    rows = []
    for b in batches:
        for slots, index in contexts:
            if verify_tokens:
                chosen = (pick_block(slots), plan_splits(b, kv, slots, pick_block(slots)))
            else:
                chosen = plan(b, kv, slots)
            grid = tilings or [(bl, sp, w) for bl in blocks for sp in splits for w in warps]
            variants = [("xla", None, None, None)] + [
                (f"b{bl} s{sp} w{w}", bl, sp, w) for bl, sp, w in grid if slots % bl == 0 and sp <= slots // bl]
            for label, bl, sp, w in variants:
                planned_w = VERIFY_WARPS[0] if verify_tokens else planned_warps(0, bl or 0)
                row = {"batch": b, "slots": slots, "index": index, "impl": label, "block": bl, "splits": sp,
                       "num_warps": w, "planned": (bl, sp) == chosen and w == planned_w}
                if time.perf_counter() > deadline:
                    row["error"] = "skipped: deadline"
                    rows.append(row)
                    continue
                try:
                    row.update(time_fn(make_step(b, slots, index, bl, sp, w, heads, kv, d, interpret, verify_tokens),
                                       (), reps))
                except Exception as e:  # noqa: BLE001 - a tiling the compiler refuses is a finding, not a stop
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    t = meta.get("verify_tokens", 0)
    if t:
        what = (f"# Verify attention ({t}-token chunks) alone vs XLA ({meta['device']}, {meta['date']})",
                "Kernel = `verify_attention_pallas` (RoPE + the chunk's cache write + causal GQA over cache + chunk;"
                " split, the XLA merge of the splits' partials is timed with it); xla = `verify_attention_reference`."
                " `slots (index)`: the chunk is written at [index, index + t).")
        planned = "`planned` = `plan_splits`'s pick with the default block and 4 warps."
    else:
        what = (f"# Decode attention alone vs XLA ({meta['device']}, {meta['date']})",
                "Kernel = the partials form (RoPE + cache write + per-split online softmax; the split merge is in"
                " the o-projection's prologue in the decode step); xla = the whole reference step.")
        planned = "`planned` = what `plan` picks."
    lines = [what[0], "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
             + f". Command: `{meta['command']}`. {what[1]} Device µs: union of the kernels' intervals over a profile"
             f" of {meta['reps']} calls, per call; wall µs: median host time per call. {planned}",
             "", "| batch | slots (index) | impl | planned | device µs | wall µs |", "|---|---|---|---|---|---|"]
    for r in rows:
        where = f"{r['slots']} ({r['index']})"
        if "error" in r:
            lines.append(f"| {r['batch']} | {where} | {r['impl']} | | error: {r['error'][:80]} | |")
        else:
            lines.append(f"| {r['batch']} | {where} | {r['impl']} | {'yes' if r['planned'] else ''} |"
                         f" {r['device_us']:.2f} | {r['wall_us']:.1f} |")
    lines += ["", "Best tiling per case against the planned one and XLA (device µs):", ""]
    for key in dict.fromkeys((r["batch"], r["slots"]) for r in rows):
        case = [r for r in rows if (r["batch"], r["slots"]) == key and "error" not in r]
        kern = [r for r in case if r["impl"] != "xla"]
        if not kern:
            continue
        best = min(kern, key=lambda r: r["device_us"])
        planned = next((r for r in kern if r["planned"]), None)
        xla = next((r for r in case if r["impl"] == "xla"), None)
        lines.append(f"- batch {key[0]}, {key[1]} slots: best {best['impl']} {best['device_us']:.2f}"
                     + (f"; planned {planned['impl']} {planned['device_us']:.2f}" if planned else "")
                     + (f"; XLA {xla['device_us']:.2f}" if xla else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: interpret mode, small shapes, few reps")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--contexts", default="256:127,4096:4095", help="slots:index pairs (index = the new token's slot)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--deadline-s", type=float, default=420, help="stop starting new variants after this")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tilings", default="", help="only these block:splits:warps triples (comma-separated), "
                    "e.g. 64:1:4; default: the whole sweep")
    ap.add_argument("--stem", default="", help="result file name (default decode_attention / verify_attention)")
    ap.add_argument("--verify-tokens", type=int, default=0,
                    help="time a verify chunk of this many tokens (verify_attention) instead of a decode step")
    a = ap.parse_args(argv)
    if not 0 <= a.verify_tokens <= 16:
        ap.error(f"--verify-tokens must be 0 (decode steps) to 16, got {a.verify_tokens}")
    from bench_env import device, now, versions

    verify = a.verify_tokens
    try:
        tilings = tuple(tuple(int(x) for x in t.split(":")) for t in a.tilings.split(",") if t)
        good = all(len(t) == 3 and min(t) >= 1 for t in tilings)
    except ValueError:
        good = False
    if not good:
        ap.error(f"--tilings takes block:splits:warps triples of positive integers, got {a.tilings!r}")
    shape = (TINY_VERIFY if verify else TINY) if a.tiny else dict(heads=HEADS, kv=KV, head_dim=HEAD_DIM)
    contexts = tuple(tuple(map(int, c.split(":"))) for c in a.contexts.split(","))
    batches = tuple(map(int, a.batches.split(",")))
    blocks, splits, warps = (VERIFY_BLOCKS, VERIFY_SPLITS, VERIFY_WARPS) if verify else (BLOCKS, SPLITS, WARPS)
    if a.tiny:
        batches, contexts, blocks, splits, a.reps = (1,), ((32, 20),), (16, 32), (1, 2), 2
        warps = warps if verify else (1,)
    if verify and (bad := [f"{s}:{i}" for s, i in contexts if i + verify > s]):
        ap.error(f"--verify-tokens {verify}: a chunk written at index must end within the slots (index + "
                 f"{verify} <= slots); these contexts do not: {', '.join(bad)}")
    meta = {"date": now(), "device": device(), "versions": versions(), "reps": a.reps, "verify_tokens": verify,
            "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    t0 = time.perf_counter()
    rows = run(batches, contexts, blocks, splits, warps, a.reps, a.tiny, shape["heads"], shape["kv"],
               shape["head_dim"], deadline=t0 + a.deadline_s, verify_tokens=verify, tilings=tilings)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.stem or ("verify_attention" if verify else "decode_attention")
    stem += "_tiny" if a.tiny else ""  # a smoke run never replaces device figures
    (a.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (a.out / f"{stem}.md").write_text(report(rows, meta))
    print(report(rows, meta))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
