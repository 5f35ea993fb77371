"""A speculative verify chunk's attention in one Pallas launch: RoPE on its t queries and keys, the cache write of
its t keys and values, and causal GQA of the t tokens over cache + chunk.

Reference: `mamba_llama_jax.ops.attention.verify_attention_reference` (same signature and maths; this adds
`interpret`, `block`, `splits` and `num_warps`).

Why: a verify chunk's attention in XLA is RoPE, two cache updates, scores, mask, softmax and values, ~5-7 kernels
per attention layer where a decode step's is one (`decode_attention`), and at batch 1 a speculative round is
launch-bound (results/speculative_selfdraft.md: a round cost 2.5 plain steps). Here it is one launch per layer.
The probabilities also stay fp32 (the decode kernel's dot form: two bf16 parts in p·V), as in a decode step,
where XLA's chunk attention rounds them to the compute dtype first: verified tokens see a decode step's numbers.

Layout: grid (batch, kv_heads). A program owns one KV head of one row. It rotates the chunk's t keys and its g·t
queries (g = heads per KV head), the queries as rows r = j·g + i of a pair of (R, d/2) tiles (R >= 16, a power of
two: a tensor-core dot's M; rows past t·g are zero), writes the t keys / values into the cache (slots
[index, index + t), which no program reads), and runs one online softmax per row: over the cached slots
[0, index) in blocks (q·Kᵀ and p·V as tensor-core dots), then over the chunk's own keys from registers, causally
(key j' <= the row's token j).

Sequence splits (`plan_splits`), for long caches only: grid (batch, kv_heads, splits). The filled blocks
[0, ceil(index / block)) are shared out among the splits at run time (one compiled program serves every fill), each
split writes an unnormalised partial (output, running max, running sum) per query row, and split 0 also writes the
chunk into the cache and adds the chunk's own keys; `decode_attention.merge_partials` merges them (one small XLA
fusion). Why: at batch 1 the b·kv programs (3 for SmolLM2) each walk the whole cache, a serial chain of
index / block blocks; at 4 k slots that is 32 blocks a program. Below LONG_SLOTS (the speculative benchmarks' caches
of a few hundred slots: 1-3 blocks a program) the kernel stays unsplit, as first measured. The split kernel's
programs read the cached slots [0, index) while split 0 writes [index, index + t): disjoint, so no program depends
on another's store (a chunk past the cache's end, clamped into it, is a caller's bug; see `_kernel`).

Kernel shapes: head_dim a power of two >= 32 (half a head is q·Kᵀ's contraction: a dot's K >= 16), slots a multiple
of 16, t·g <= MAX_ROWS. `verify_attention` falls back to the reference elsewhere.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.attention import NEG_INF, verify_attention_reference
from pallas_kernels import dispatch
from pallas_kernels.decode_attention import (MAX_PROGRAMS, SMS, blocks_per_split, check_cache_args, dot_t,
                                             merge_partials, online_update, pick_block, pick_row, split_range)
from pallas_kernels.dispatch import is_pow2, pow2_at_least, pow2_at_most
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32
PALLAS_TRITON = dispatch.PALLAS_TRITON
REFERENCE = "reference_xla"
MAX_ROWS = 64  # query rows (t tokens x g heads) a program holds: (MAX_ROWS, head_dim) fp32 accumulators
MIN_ROWS = 16  # a tensor-core dot's smallest M (and N: the chunk's key tile)
LONG_SLOTS = 1024  # caches from this many slots up are split (`plan_splits`)
MAX_SPLITS = 16  # at most this many splits (each a partial of t·h rows for the merge to read)

# Its `-m gpu` tests passed on an H100 (session 16, benchmarks/results/test-gpu.md).
GPU_VERIFIED = True


def _kernel(qkv_ref, kc_ref, vc_ref, cos_ref, sin_ref, idx_ref, valid_ref,  # inputs
            *out_refs,  # o (unsplit) or o, m, l (the splits' partials); then kco, vco (aliasing kc, vc)
            h: int, kv: int, d: int, t: int, block: int, splits: int, dtype: Any):
    # kco / vco are aliased: written through kc_ref / vc_ref's buffers below
    o_ref, m_ref, l_ref = (out_refs[0], None, None) if splits == 1 else out_refs[:3]
    bi, ki = pl.program_id(0), pl.program_id(1)
    si = pl.program_id(2) if splits > 1 else 0
    g, half = h // kv, d // 2
    rows_q = pow2_at_least(t * g, MIN_ROWS)
    rows_k = pow2_at_least(t, MIN_ROWS)
    index = idx_ref[0]
    cdt = kc_ref.dtype
    # Where the chunk is written: at index, clamped as dynamic_update_slice clamps it (the reference's write), so
    # that a chunk past the cache's end — a caller's bug — never writes out of bounds (split, the other splits may
    # then read those slots before or after the write: the output is unspecified, the caches are the reference's).
    start = jnp.minimum(index, kc_ref.shape[1] - t)

    def rope(j: int, off: int) -> tuple[jax.Array, jax.Array]:  # token j's head at column `off`, rounded as the ref
        c, s = cos_ref[bi, j, :], sin_ref[bi, j, :]
        x1 = qkv_ref[bi, j, pl.ds(off, half)].astype(F32)
        x2 = qkv_ref[bi, j, pl.ds(off + half, half)].astype(F32)
        return ((x1 * c - x2 * s).astype(dtype).astype(F32), (x2 * c + x1 * s).astype(dtype).astype(F32))

    rq = jax.lax.broadcasted_iota(jnp.int32, (rows_q, half), 0)
    rk = jax.lax.broadcasted_iota(jnp.int32, (rows_k, half), 0)
    rv = jax.lax.broadcasted_iota(jnp.int32, (rows_k, d), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (rows_k,), 0)
    q1 = jnp.zeros((rows_q, half), F32)
    q2 = jnp.zeros((rows_q, half), F32)
    k1 = jnp.zeros((rows_k, half), F32)
    k2 = jnp.zeros((rows_k, half), F32)
    vt = jnp.zeros((rows_k, d), F32)
    chunk_ok = jnp.zeros((rows_k,), bool)
    news = []
    for j in range(t):
        for i in range(g):
            a1, a2 = rope(j, (ki * g + i) * d)
            q1 = jnp.where(rq == j * g + i, a1[None, :], q1)
            q2 = jnp.where(rq == j * g + i, a2[None, :], q2)
        b1, b2 = rope(j, (h + ki) * d)
        v = qkv_ref[bi, j, pl.ds((h + kv + ki) * d, d)]
        news.append((b1, b2, v))
        k1 = jnp.where(rk == j, b1[None, :], k1)
        k2 = jnp.where(rk == j, b2[None, :], k2)
        vt = jnp.where(rv == j, v.astype(F32)[None, :], vt)
        chunk_ok = chunk_ok | ((col == j) & (valid_ref[bi, start + j] != 0))

    def write() -> None:
        for j, (b1, b2, v) in enumerate(news):
            kc_ref[bi, start + j, ki, pl.ds(0, half)] = b1.astype(cdt)
            kc_ref[bi, start + j, ki, pl.ds(half, half)] = b2.astype(cdt)
            vc_ref[bi, start + j, ki, :] = v.astype(cdt)

    if splits == 1:
        write()
    else:
        pl.when(si == 0)(write)
    q1, q2 = q1.astype(cdt), q2.astype(cdt)
    scale = 1.0 / math.sqrt(d)

    def body(i: Any, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:  # cached slots [0, index)
        rows = pl.ds(i * block, block)
        slot = i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        kb1 = kc_ref[bi, rows, ki, pl.ds(0, half)]
        kb2 = kc_ref[bi, rows, ki, pl.ds(half, half)]
        ok = ((valid_ref[bi, rows] != 0) & (slot < index))[None, :]
        return online_update(carry, (dot_t(q1, kb1) + dot_t(q2, kb2)) * scale, ok, vc_ref[bi, rows, ki, :])

    init = (jnp.full((rows_q,), NEG_INF, F32), jnp.zeros((rows_q,), F32), jnp.zeros((rows_q, d), F32))
    filled = (index + block - 1) // block
    if splits == 1:
        lo, hi = 0, filled
    else:  # this split's share of the filled blocks, decided at run time
        lo, hi = split_range(si, filled, blocks_per_split(filled, splits))
    carry = jax.lax.fori_loop(lo, hi, body, init)
    # the chunk's own keys: causal within the chunk (row r is token r // g; padding rows see every key); split,
    # split 0 adds them
    sc = (dot_t(q1, k1.astype(cdt)) + dot_t(q2, k2.astype(cdt))) * scale  # (rows_q, rows_k)
    tok = jax.lax.broadcasted_iota(jnp.int32, (rows_q, rows_k), 0) // g
    key = jax.lax.broadcasted_iota(jnp.int32, (rows_q, rows_k), 1)
    ok = (key <= tok) & chunk_ok[None, :] & (si == 0)
    m, l, acc = online_update(carry, sc, ok, vt.astype(cdt))
    for j in range(t):
        for i in range(g):
            r, head = j * g + i, ki * g + i
            if splits == 1:
                out = pick_row(acc, r) / jnp.maximum(pick_row(l, r), 1e-30)
                o_ref[bi, j, pl.ds(head * d, d)] = out.astype(o_ref.dtype)
            else:
                o_ref[bi, si, j, pl.ds(head * d, d)] = pick_row(acc, r)
                m_ref[bi, si, j, pl.ds(head, 1)] = jnp.full((1,), pick_row(m, r), F32)
                l_ref[bi, si, j, pl.ds(head, 1)] = jnp.full((1,), pick_row(l, r), F32)


def check_args(qkv: Any, k_cache: Any, v_cache: Any, cos: Any, sin: Any, valid: Any, *, num_heads: int,
               num_kv_heads: int, kernel: bool = True) -> None:
    """Raises KernelError naming the first bad argument (shapes only). `kernel=False`: what the reference needs."""
    def bad(msg: str) -> KernelError:
        return KernelError(f"verify_attention: {msg}")

    b, slots, kv, d = check_cache_args(k_cache, v_cache, valid, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                       op="verify_attention")
    h = num_heads
    if getattr(qkv, "ndim", None) != 3 or qkv.shape[0] != b or qkv.shape[2] != (h + 2 * kv) * d:
        raise bad(f"qkv must be (batch, t, (heads + 2·kv_heads)·head_dim) = ({b}, t, {(h + 2 * kv) * d}), got "
                  f"{getattr(qkv, 'shape', None)}")
    t = qkv.shape[1]
    if t > slots:
        raise bad(f"a chunk of {t} tokens does not fit a cache of {slots} slots")
    if cos.shape != (b, t, d // 2) or sin.shape != cos.shape:
        raise bad(f"cos and sin must be (batch, t, head_dim/2) = {(b, t, d // 2)}, got {cos.shape} and {sin.shape}")
    if not kernel:
        return
    if not (is_pow2(d) and d >= 32):
        raise bad(f"head_dim ({d}) must be a power of two >= 32 for the Pallas kernel")
    if slots % 16:
        raise bad(f"the cache's slots ({slots}) must be a multiple of 16 for the Pallas kernel")
    if t * (h // kv) > MAX_ROWS:
        raise bad(f"t·(heads/kv_heads) = {t * (h // kv)} query rows exceed the kernel's {MAX_ROWS}")


def plan_splits(batch: int, kv: int, slots: int, block: int) -> int:
    """How many splits a verify over a `slots`-slot cache in `block`-slot blocks runs (module docstring): none
    (1) below LONG_SLOTS or when batch·kv programs already cover the SMs; else as many as keep within MAX_SPLITS,
    one block each at a full cache, and about MAX_PROGRAMS programs (decode attention's bound). A power of two.
    Not yet measured on a GPU (the decode kernel's splits were: benchmarks/results/decode_attention.md)."""
    if slots < LONG_SLOTS or batch * kv >= SMS:
        return 1
    return pow2_at_most(max(1, min(MAX_SPLITS, slots // block, MAX_PROGRAMS // (batch * kv))))


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "block", "splits", "interpret",
                                             "num_warps"))
def verify_attention_pallas(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array, sin: jax.Array,
                            index: jax.Array, valid: jax.Array, *, num_heads: int, num_kv_heads: int,
                            block: int = 0, splits: int = 0, interpret: bool = False,
                            num_warps: int = 4) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel (module docstring); `block` 0 = the largest power of two <= 128 dividing the slots, `splits`
    0 = `plan_splits`."""
    check_args(qkv, k_cache, v_cache, cos, sin, valid, num_heads=num_heads, num_kv_heads=num_kv_heads)
    b, t, _ = qkv.shape
    _, slots, kv, d = k_cache.shape
    h = num_heads
    block = block or pick_block(slots)
    if not (is_pow2(block) and block >= 16 and slots % block == 0):
        raise KernelError(f"verify_attention: block must be a power of two >= 16 dividing the slots ({slots}), "
                          f"got {block}")
    splits = splits or plan_splits(b, kv, slots, block)
    if not 1 <= splits <= slots // block:
        raise KernelError(f"verify_attention: splits must be 1 to the cache's {slots // block} blocks of {block} "
                          f"slots, got {splits}")
    kern = functools.partial(_kernel, h=h, kv=kv, d=d, t=t, block=block, splits=splits, dtype=qkv.dtype)
    caches = (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    if splits == 1:
        outs, grid = (jax.ShapeDtypeStruct((b, t, h * d), qkv.dtype),), (b, kv)
    else:
        outs, grid = (jax.ShapeDtypeStruct((b, splits, t, h * d), F32), jax.ShapeDtypeStruct((b, splits, t, h), F32),
                      jax.ShapeDtypeStruct((b, splits, t, h), F32)), (b, kv, splits)
    res = triton_call(
        kern, grid=grid, out_shape=outs + caches,
        input_output_aliases={1: len(outs), 2: len(outs) + 1}, interpret=interpret, num_warps=num_warps,
        num_stages=2, name="verify_attention",
    )(qkv, k_cache, v_cache, cos.astype(F32), sin.astype(F32), jnp.reshape(index, (1,)).astype(jnp.int32),
      valid.astype(jnp.int32))
    if splits == 1:
        return res
    o_part, m, l, kc, vc = res
    # the t·h query rows as heads of merge_partials' (b, splits, heads·d) layout
    out = merge_partials(o_part.reshape(b, splits, t * h * d), m.reshape(b, splits, t * h),
                         l.reshape(b, splits, t * h), qkv.dtype)
    return out.reshape(b, t, h * d), kc, vc


def verify_attention_choice(qkv: Any, k_cache: Any, v_cache: Any, cos: Any, sin: Any, valid: Any, *,
                            num_heads: int, num_kv_heads: int) -> str:
    """Which implementation `verify_attention` would use (raises KernelError for bad arguments)."""
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads)
    check_args(qkv, k_cache, v_cache, cos, sin, valid, kernel=False, **kw)
    if not dispatch.kernel_allowed(GPU_VERIFIED):
        return REFERENCE
    try:
        check_args(qkv, k_cache, v_cache, cos, sin, valid, kernel=True, **kw)
    except KernelError:
        return REFERENCE
    return PALLAS_TRITON


def verify_attention(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array, sin: jax.Array,
                     index: jax.Array, valid: jax.Array, *, num_heads: int,
                     num_kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel where allowed (GPU once verified, interpret mode in tests) and shapes fit, the reference
    elsewhere; records the choice (`pallas_kernels.dispatch.last_choice("verify_attention")`)."""
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads)
    choice = verify_attention_choice(qkv, k_cache, v_cache, cos, sin, valid, **kw)
    dispatch.record_choice("verify_attention", choice)
    if choice == PALLAS_TRITON:
        return verify_attention_pallas(qkv, k_cache, v_cache, cos, sin, index, valid,
                                       interpret=not dispatch._on_gpu(), **kw)
    return verify_attention_reference(qkv, k_cache, v_cache, cos, sin, index, valid, **kw)
