"""Why the decode attention kernel reads its K/V cache at ~1.1 TB/s: its block loop, taken apart.

In the decode step at batch 64 (prompt 128 + 256 new tokens) the attention kernel takes ~11 µs a layer to read ~12.6
MB of K/V (decode_profile_s18_kq_loads.md); alone over 4096 slots at batch 1 one block iteration took ~1.2 µs
(decode_attention.md: a full memory latency per iteration, as if nothing were prefetched). This times probe
kernels that each keep one piece of the real loop (`pallas_kernels.decode_attention._attend_dot`), over the same
caches, so the piece that costs shows:

  sum          K and V blocks loaded and added (no dot): the loads alone
  dot          q·Kᵀ, online softmax, p·V (`online_update`), loads straight into the dots
  dot+valid    + the padding mask read per block (`valid[b, slots]`), as the kernel does
  dot+where    + the new token substituted into the block that holds its slot (`jnp.where` on the loaded tiles)
  dot+valid+where   both: the real loop's shape
  dot+valid_pf the mask of block i+1 read in iteration i and carried (prefetched by hand)
  kernel       the real `decode_attention_pallas` (RoPE, cache write, prologue), one split of 128-slot blocks
               (its forms reading a block ahead, `kernel+vp1` / `kernel+vp2`, were measured and removed:
               decode_attention.py says why)

each in the project's slot-major cache layout (b, S, kv, d) and head-major (b, kv, S, d) (`@hm`), plus XLA's own
reduction over the filled slots (`xla_sum`) as the bandwidth it reaches. A call runs the probe over L layers'
caches in one jit (L·cache > the 50 MB L2, so every layer reads cold, as in the decode loop). Figures: µs a layer
(median over calls / L) and the K+V bytes of the filled slots per second. Every probe's output is checked against
a jnp reference of the same attention (max abs error printed).

    python benchmarks/bench_kv_loop.py --out benchmarks/results      # device
    python benchmarks/bench_kv_loop.py --tiny --out /tmp/kv_loop       # CPU smoke test (interpret mode)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FORMS = ("sum", "dot", "dot+valid", "dot+where", "dot+valid+where", "dot+valid_pf")
KERNELS = ("kernel",)
# name: (batch, slots, index (newest filled slot), layers)
SHAPES = {"b64-384": (64, 384, 255, 30), "b1-4096": (1, 4096, 4095, 30), "b64-4096": (64, 4096, 4095, 4)}
TINY_SHAPES = {"tiny": (2, 64, 40, 2)}
HEADS, KV, HEAD_DIM, BLOCK = 9, 3, 64, 128
TINY = dict(heads=4, kv=2, d=32, block=16)
Q_ROWS = 16  # the kernel's q tile: a group's heads padded to a tensor-core dot's smallest M


def _probe(k_ref: Any, v_ref: Any, q_ref: Any, idx_ref: Any, valid_ref: Any, o_ref: Any, *, form: str,
           head_major: bool, block: int, nblocks: int) -> None:
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from pallas_kernels.decode_attention import dot_t, online_update, pick_row

    f32 = jnp.float32
    bi, ki = pl.program_id(0), pl.program_id(1)
    index = idx_ref[0]
    hi = jnp.minimum(nblocks, index // block + 1)
    d = o_ref.shape[-1]

    def load(ref: Any, i: Any) -> Any:
        rows = pl.ds(i * block, block)
        return ref[bi, ki, rows, :] if head_major else ref[bi, rows, ki, :]

    if form == "sum":
        acc = jax.lax.fori_loop(0, hi, lambda i, a: a + load(k_ref, i).astype(f32) + load(v_ref, i).astype(f32),
                                jnp.zeros((block, d), f32))
        o_ref[bi, ki, :] = jnp.sum(acc, axis=0)
        return
    q = q_ref[...]
    new_k, new_v = q_ref[0, :], q_ref[1, :]
    scale = 1.0 / math.sqrt(d)
    init = (jnp.full((Q_ROWS,), -1e30, f32), jnp.zeros((Q_ROWS,), f32), jnp.zeros((Q_ROWS, d), f32))

    def attend(i: Any, carry: Any, mask: Any) -> Any:
        kb, vb = load(k_ref, i), load(v_ref, i)
        slot = i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        if "where" in form:
            new = (slot == index)[:, None]
            kb = jnp.where(new, new_k[None, :], kb)
            vb = jnp.where(new, new_v[None, :], vb)
        ok = slot <= index
        if mask is not None:
            ok = ok & (mask != 0)
        return online_update(carry, dot_t(q, kb) * scale, ok[None, :], vb)

    def valid_block(i: Any) -> Any:
        return valid_ref[bi, pl.ds(i * block, block)]

    if form == "dot+valid_pf":
        def body(i: Any, c: Any) -> Any:
            nxt = valid_block(jnp.minimum(i + 1, nblocks - 1))
            return attend(i, c[0], c[1]), nxt
        (m, l, acc), _ = jax.lax.fori_loop(0, hi, body, (init, valid_block(0)))
    else:
        m, l, acc = jax.lax.fori_loop(
            0, hi, lambda i, c: attend(i, c, valid_block(i) if "valid" in form else None), init)
    o_ref[bi, ki, :] = pick_row(acc, 0) / jnp.maximum(pick_row(l, 0), 1e-30)


def probe_reference(k: Any, v: Any, q: Any, index: int, valid: Any, *, form: str, head_major: bool,
                    block: int) -> Any:
    """What `_probe` computes, in jnp: (b, kv, d) fp32."""
    import jax.numpy as jnp

    f32 = jnp.float32
    if head_major:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # -> (b, S, kv, d)
    b, slots, kv, d = k.shape
    filled = min(slots, (index // block + 1) * block)
    if form == "sum":
        return jnp.sum(k[:, :filled].astype(f32) + v[:, :filled].astype(f32), axis=1)
    slot = jnp.arange(slots)
    if "where" in form:
        k = k.at[:, index].set(q[0])
        v = v.at[:, index].set(q[1])
    ok = (slot <= index)[None, :]
    if "valid" in form:
        ok = ok & (valid != 0)
    sc = jnp.einsum("bskd,d->bks", k.astype(f32), q[0].astype(f32)) / math.sqrt(d)
    sc = jnp.where(ok[:, None, :], sc, -1e30)
    p = jnp.exp(sc - sc.max(-1, keepdims=True)) * ok[:, None, :]
    return jnp.einsum("bks,bskd->bkd", p, v.astype(f32)) / p.sum(-1)[..., None]


def make_case(shape: tuple[int, int, int, int], variant: str, *, heads: int, kv: int, d: int, block: int,
              interpret: bool, stages: int = 2) -> tuple[Any, Any, float]:
    """(call, check, bytes a layer): call() runs the variant over every layer and returns its outputs; check()
    returns the max abs error of layer 0's output against the reference (nan where there is none)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.decode_attention import decode_attention_pallas, decode_attention_reference
    from pallas_kernels.triton_call import triton_call

    b, slots, index, layers = shape
    form, _, layout = variant.partition("@")
    head_major = layout == "hm"
    dt = jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 2 * layers + 3)
    cshape = (b, kv, slots, d) if head_major else (b, slots, kv, d)
    ks = [jax.random.normal(keys[2 * i], cshape, dt) for i in range(layers)]
    vs = [jax.random.normal(keys[2 * i + 1], cshape, dt) for i in range(layers)]
    valid = (jax.random.uniform(keys[-1], (b, slots)) > 0.1).astype(jnp.int32)
    idx = jnp.array([index], jnp.int32)
    filled = min(slots, (index // block + 1) * block)
    nbytes = 2.0 * b * filled * kv * d * 2

    if form == "xla_sum":
        @jax.jit
        def call_x(ks_: Any, vs_: Any) -> Any:
            return [jnp.sum(kc[:, :filled].astype(jnp.float32) + vc[:, :filled].astype(jnp.float32), axis=1)
                    for kc, vc in zip(ks_, vs_)]
        return (lambda: call_x(ks, vs)), (lambda: float("nan")), nbytes

    if form in KERNELS:
        qkv = jax.random.normal(keys[-2], (b, (heads + 2 * kv) * d), dt)
        ang = jax.random.uniform(keys[-3], (b, d // 2), jnp.float32, 0, 100)
        cos, sin = jnp.cos(ang), jnp.sin(ang)
        kw = dict(num_heads=heads, num_kv_heads=kv, window=slots)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def call_k(ks_: Any, vs_: Any) -> Any:
            outs, nk, nv = [], [], []
            for kc, vc in zip(ks_, vs_):
                o, kc, vc = decode_attention_pallas(qkv, kc, vc, cos, sin, idx[0], valid, block=block, splits=1,
                                                    interpret=interpret, **kw)
                outs.append(o)
                nk.append(kc)
                nv.append(vc)
            return outs, nk, nv

        state = {"k": ks, "v": vs}

        def run_k() -> Any:
            outs, state["k"], state["v"] = call_k(state["k"], state["v"])
            return outs

        def check_k() -> float:
            want, _, _ = decode_attention_reference(qkv, state["k"][0], state["v"][0], cos, sin, idx[0], valid, **kw)
            got, _, _ = decode_attention_pallas(qkv, state["k"][0], state["v"][0], cos, sin, idx[0], valid,
                                                block=block, splits=1, interpret=interpret, **kw)
            return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        return run_k, check_k, nbytes

    q = jax.random.normal(keys[-2], (Q_ROWS, d), dt)
    call = triton_call(
        functools.partial(_probe, form=form, head_major=head_major, block=block, nblocks=slots // block),
        grid=(b, kv), out_shape=jax.ShapeDtypeStruct((b, kv, d), jnp.float32), interpret=interpret,
        num_warps=4, num_stages=stages, name="kv_loop_probe")

    @jax.jit
    def call_p(ks_: Any, vs_: Any) -> Any:
        return [call(kc, vc, q, idx, valid) for kc, vc in zip(ks_, vs_)]

    def check_p() -> float:
        got = call_p(ks[:1], vs[:1])[0]
        want = probe_reference(ks[0], vs[0], q, index, valid, form=form, head_major=head_major, block=block)
        return float(jnp.max(jnp.abs(got - want)))
    return (lambda: call_p(ks, vs)), check_p, nbytes


def run(shapes: dict[str, tuple[int, int, int, int]], variants: list[str], reps: int, interpret: bool,
        heads: int, kv: int, d: int, block: int, deadline: float, stages: int = 2) -> list[dict[str, Any]]:
    import jax
    from bench_fused_decode import time_fn

    rows = []
    for name, shape in shapes.items():
        for variant in variants:
            row: dict[str, Any] = {"shape": name, "batch": shape[0], "slots": shape[1], "index": shape[2],
                                   "layers": shape[3], "variant": variant}
            if time.perf_counter() > deadline:
                rows.append({**row, "error": "skipped: deadline"})
                continue
            try:
                call, check, nbytes = make_case(shape, variant, heads=heads, kv=kv, d=d, block=block,
                                                interpret=interpret, stages=stages)
                t = time_fn(call, (), reps)
                per_layer = t["device_us"] / shape[3]
                row.update(us_per_layer=per_layer, wall_us_per_layer=t["wall_us"] / shape[3],
                           gb_s=nbytes / per_layer / 1e3, max_abs_err=check())
                if "profile_error" in t:
                    row["profile_error"] = t["profile_error"]
            except Exception as e:  # noqa: BLE001 - a probe the compiler refuses is a finding, not a stop
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            jax.clear_caches()
    return rows


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"# The decode attention loop taken apart ({meta['device']}, {meta['date']})", "",
           f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. Command: `{meta['command']}`.",
           "µs a layer = the kernels' busy time per call (union of their intervals in a profile of "
           f"{meta['reps']} calls, warm-up excluded) / layers; wall = median host time per call / layers (it "
           "carries the dispatch of every layer's arguments); probes with "
           f"{meta['stages']} pipeline stages; GB/s = K+V bytes of the filled slots / device time. Variants: the "
           "module docstring; `@hm` = head-major cache.", "",
           "| shape | variant | µs / layer | wall µs / layer | GB/s | max abs err |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['variant']} | {r['error'][:80]} | | | |")
        else:
            out.append(f"| {r['shape']} | {r['variant']} | {r['us_per_layer']:.2f} | {r['wall_us_per_layer']:.2f} | "
                       f"{r['gb_s']:.0f} | {r['max_abs_err']:.1e} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench_env import device, now, versions

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stem", default="kv_loop")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--variants", default="",
                   help="comma list (default: xla_sum, every form in both layouts, kernel)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--stages", type=int, default=2, help="the probes' pipeline stages (Triton num_stages; the "
                   "kernel keeps its own)")
    p.add_argument("--deadline-s", type=float, default=float("inf"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes in interpret mode (CPU smoke test)")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v] or (
        ["xla_sum"] + [f + lay for f in FORMS for lay in ("", "@hm")] + list(KERNELS))
    bad = [v for v in variants if v.partition("@")[0] not in (*FORMS, "xla_sum", *KERNELS)
           or v.partition("@")[2] not in ("", "hm")]
    if bad:
        p.error(f"unknown variants {bad}")
    if a.tiny:
        shapes, dims = TINY_SHAPES, TINY
    else:
        unknown = [s for s in a.shapes.split(",") if s not in SHAPES]
        if unknown:
            p.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
        shapes = {s: SHAPES[s] for s in a.shapes.split(",")}
        dims = dict(heads=HEADS, kv=KV, d=HEAD_DIM, block=BLOCK)
    rows = run(shapes, variants, 1 if a.tiny else a.reps, a.tiny, deadline=time.perf_counter() + a.deadline_s,
               stages=a.stages, **dims)
    meta = {"date": now(), "device": device(), "versions": versions(), "reps": 1 if a.tiny else a.reps,
            "stages": a.stages,
            "command": "python bench_kv_loop.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = report(rows, meta)
    (a.out / f"{a.stem}.md").write_text(md)
    print(md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
