"""One decode step of attention in one Pallas launch: RoPE on q/k, the K/V cache write, GQA over the valid slots.

Same signature and result as `mamba_llama_jax.ops.attention.decode_attention_reference` (see there for shapes),
plus `interpret`, `block` and `splits`. Why one kernel: at decode the step is launch-bound (~2 µs per XLA kernel,
~10 kernels per layer for rope, the two cache updates, scores, softmax and values); this does it in one.

Layout: grid (batch, kv_heads, splits). A program owns one KV head of one row: it rotates that head's k, writes
k/v into the cache (the caches are aliased in/out, so nothing else is copied), and runs an online softmax over
its share of the filled slots for the g = h/kv query heads that share the head — each K/V block is read once for
all g heads. The number of blocks is dynamic (`index // block + 1`, bounded by the static window), so one
compiled step serves every cache fill. The new token's k/v enter the softmax from registers (the block holding
slot `index` has them substituted), so no program depends on another's store. With `splits` > 1 (long windows
at small batch, where b·kv programs would leave most SMs idle) each split handles a slice of the blocks and
writes unnormalised partials, merged by a small XLA epilogue.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.attention import NEG_INF, decode_attention_reference
from pallas_kernels import dispatch

F32 = jnp.float32
PALLAS_TRITON = dispatch.PALLAS_TRITON
REFERENCE = "reference_xla"


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def pick_block(slots: int, cap: int = 128) -> int:
    """The largest power of two <= cap dividing `slots` (blocks must tile the cache exactly)."""
    blk = 1
    while blk * 2 <= cap and slots % (blk * 2) == 0:
        blk *= 2
    return blk


def pick_splits(batch: int, kv: int, window: int, block: int, sms: int = 132) -> int:
    """Sequence splits: enough programs to cover the SMs once, but each split keeps >= 4 blocks of work."""
    if batch * kv >= sms:
        return 1
    return max(1, min(-(-sms // (batch * kv)), window // (4 * block)))


def _kernel(qkv_ref, kc_ref, vc_ref, cos_ref, sin_ref, idx_ref, valid_ref,  # inputs
            o_ref, m_ref, l_ref, kco_ref, vco_ref,  # outputs (kco/vco alias kc/vc)
            *, h: int, kv: int, d: int, block: int, nblocks: int, splits: int, dtype: Any):
    del kco_ref, vco_ref  # aliased: written through kc_ref/vc_ref's buffers below
    bi, ki, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g, half = h // kv, d // 2
    index = idx_ref[0]
    c, s = cos_ref[bi, :], sin_ref[bi, :]

    def rope(off: int):  # rounded to the compute dtype, as the reference does
        x1 = qkv_ref[bi, pl.ds(off, half)].astype(F32)
        x2 = qkv_ref[bi, pl.ds(off + half, half)].astype(F32)
        return ((x1 * c - x2 * s).astype(dtype).astype(F32), (x2 * c + x1 * s).astype(dtype).astype(F32))

    qs = [rope((ki * g + j) * d) for j in range(g)]
    k1, k2 = rope((h + ki) * d)
    k1c, k2c = k1.astype(kc_ref.dtype), k2.astype(kc_ref.dtype)
    v_new = qkv_ref[bi, pl.ds((h + kv + ki) * d, d)].astype(vc_ref.dtype)

    @pl.when(si == 0)
    def _write():
        kc_ref[bi, index, ki, pl.ds(0, half)] = k1c
        kc_ref[bi, index, ki, pl.ds(half, half)] = k2c
        vc_ref[bi, index, ki, :] = v_new

    scale = 1.0 / math.sqrt(d)
    per = nblocks // splits
    lo = si * per
    hi = jnp.minimum(lo + per, index // block + 1)  # blocks past the newest slot hold nothing valid

    def body(i, carry):
        rows = pl.ds(i * block, block)
        slot = i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        new = (slot == index)[:, None]
        kb1 = jnp.where(new, k1c[None, :], kc_ref[bi, rows, ki, pl.ds(0, half)]).astype(F32)
        kb2 = jnp.where(new, k2c[None, :], kc_ref[bi, rows, ki, pl.ds(half, half)]).astype(F32)
        vb = jnp.where(new, v_new[None, :], vc_ref[bi, rows, ki, :]).astype(F32)
        ok = (valid_ref[bi, rows] != 0) & (slot <= index)
        out = []
        for j in range(g):
            m, l, acc = carry[3 * j: 3 * j + 3]
            q1, q2 = qs[j]
            sc = (jnp.sum(kb1 * q1[None, :], axis=1) + jnp.sum(kb2 * q2[None, :], axis=1)) * scale
            sc = jnp.where(ok, sc, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(sc))
            corr = jnp.exp(m - m_new)
            p = jnp.where(ok, jnp.exp(sc - m_new), 0.0)  # masked slots add nothing even while m is NEG_INF
            out += [m_new, l * corr + jnp.sum(p), acc * corr + jnp.sum(p[:, None] * vb, axis=0)]
        return tuple(out)

    init = []
    for _ in range(g):
        init += [jnp.full((), NEG_INF, F32), jnp.zeros((), F32), jnp.zeros((d,), F32)]
    res = jax.lax.fori_loop(lo, hi, body, tuple(init))
    for j in range(g):
        m, l, acc = res[3 * j: 3 * j + 3]
        head = ki * g + j
        if splits == 1:
            o_ref[bi, pl.ds(head * d, d)] = (acc / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)
        else:
            o_ref[bi, si, pl.ds(head * d, d)] = acc
            m_ref[bi, si, pl.ds(head, 1)] = jnp.full((1,), m, F32)
            l_ref[bi, si, pl.ds(head, 1)] = jnp.full((1,), l, F32)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "window", "block", "splits",
                                             "interpret", "num_warps"))
def decode_attention_pallas(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array,
                            sin: jax.Array, index: jax.Array, valid: jax.Array, *, num_heads: int,
                            num_kv_heads: int, window: int = 0, block: int = 0, splits: int = 0,
                            interpret: bool = False, num_warps: int = 4) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel (see the module docstring); `block`/`splits` 0 = chosen from the shapes."""
    check_args(qkv, k_cache, v_cache, cos, sin, valid, num_heads=num_heads, num_kv_heads=num_kv_heads,
               window=window, kernel=True)
    b, slots, kv, d = k_cache.shape
    h = num_heads
    window = window or slots
    block = block or pick_block(window)
    nblocks = window // block
    splits = splits or pick_splits(b, kv, window, block)
    splits = max(1, min(splits, nblocks))
    while nblocks % splits:
        splits -= 1
    kern = functools.partial(_kernel, h=h, kv=kv, d=d, block=block, nblocks=nblocks, splits=splits,
                             dtype=qkv.dtype)
    if splits == 1:
        o_shape = jax.ShapeDtypeStruct((b, h * d), qkv.dtype)
        ml_shape = jax.ShapeDtypeStruct((1, 1, 1), F32)  # unused
    else:
        o_shape = jax.ShapeDtypeStruct((b, splits, h * d), F32)
        ml_shape = jax.ShapeDtypeStruct((b, splits, h), F32)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
    o, m, l, kc, vc = pl.pallas_call(
        kern,
        grid=(b, kv, splits),
        out_shape=(o_shape, ml_shape, ml_shape, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={1: 3, 2: 4},
        compiler_params=params,
        interpret=interpret,
        name="decode_attention",
    )(qkv, k_cache, v_cache, cos.astype(F32), sin.astype(F32), jnp.reshape(index, (1,)).astype(jnp.int32),
      valid.astype(jnp.int32))
    if splits > 1:  # merge the splits' partial softmaxes
        mx = jnp.max(m, axis=1, keepdims=True)
        w = jnp.exp(m - mx)  # (b, splits, h)
        den = jnp.sum(w * l, axis=1)  # (b, h)
        num = jnp.sum(w[..., None] * o.reshape(b, splits, h, d), axis=1)
        o = (num / jnp.maximum(den, 1e-30)[..., None]).reshape(b, h * d).astype(qkv.dtype)
    return o, kc, vc


def check_args(qkv: Any, k_cache: Any, v_cache: Any, cos: Any, sin: Any, valid: Any, *, num_heads: int,
               num_kv_heads: int, window: int = 0, kernel: bool = True) -> None:
    """Raises KernelError naming the first bad argument (shapes only). `kernel=False`: what the reference needs."""
    def bad(msg: str) -> KernelError:
        return KernelError(f"decode_attention: {msg}")

    if getattr(k_cache, "ndim", None) != 4 or v_cache.shape != k_cache.shape:
        raise bad(f"k_cache and v_cache must both be (batch, slots, kv_heads, head_dim), got "
                  f"{getattr(k_cache, 'shape', None)} and {getattr(v_cache, 'shape', None)}")
    b, slots, kv, d = k_cache.shape
    h = num_heads
    if kv != num_kv_heads or h % kv:
        raise bad(f"num_kv_heads ({num_kv_heads}) must equal the cache's {kv} and divide num_heads ({h})")
    if qkv.shape != (b, (h + 2 * kv) * d):
        raise bad(f"qkv must be (batch, (heads + 2·kv_heads)·head_dim) = {(b, (h + 2 * kv) * d)}, got {qkv.shape}")
    if cos.shape != (b, d // 2) or sin.shape != cos.shape:
        raise bad(f"cos and sin must be (batch, head_dim/2) = {(b, d // 2)}, got {cos.shape} and {sin.shape}")
    if valid.shape != (b, slots):
        raise bad(f"valid must be (batch, slots) = {(b, slots)}, got {valid.shape}")
    if window < 0 or window > slots:
        raise bad(f"window must be in [0, slots={slots}], got {window}")
    if not kernel:
        return
    if not (_pow2(d) and d >= 16):
        raise bad(f"head_dim ({d}) must be a power of two >= 16 for the Pallas kernel; use "
                  "mamba_llama_jax.ops.attention.decode_attention_reference for other sizes")
    if pick_block(window or slots) < 16:
        raise bad(f"the attended slots ({window or slots}) must be a multiple of 16 for the Pallas kernel")


# The compiled kernel has run on an H100 (greedy tokens matched the reference path) but its GPU test (kernel ==
# reference at real shapes) has not yet run there: until it has, the reference stays the default on GPUs and
# MAMBA_LLAMA_UNVERIFIED_KERNELS=1 opts in. Set True in the commit that records a passing `make test-gpu`.
GPU_VERIFIED = False


def _kernel_allowed() -> bool:
    return (not dispatch.force_reference() and dispatch._on_gpu()
            and (GPU_VERIFIED or dispatch.unverified_allowed()))


def decode_attention_choice(qkv: Any, k_cache: Any, v_cache: Any, cos: Any, sin: Any, valid: Any, *,
                            num_heads: int, num_kv_heads: int, window: int = 0) -> str:
    """Which implementation `decode_attention` would use (raises KernelError for bad arguments)."""
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, window=window)
    check_args(qkv, k_cache, v_cache, cos, sin, valid, kernel=False, **kw)
    if not _kernel_allowed():
        return REFERENCE
    try:
        check_args(qkv, k_cache, v_cache, cos, sin, valid, kernel=True, **kw)
    except KernelError:
        return REFERENCE
    return PALLAS_TRITON


def kernel_would_run(head_dim: int, slots_multiple: int) -> bool:
    """Whether the Generator's decode attention will be the kernel (for its phase plan): GPU, not forced to the
    reference, a head size the kernel tiles, and caches whose slot count is a multiple of 16."""
    return _kernel_allowed() and _pow2(head_dim) and head_dim >= 16 and slots_multiple % 16 == 0


def decode_attention(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array, sin: jax.Array,
                     index: jax.Array, valid: jax.Array, *, num_heads: int, num_kv_heads: int,
                     window: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Kernel on GPU (see GPU_VERIFIED), the XLA reference elsewhere or with MAMBA_LLAMA_FORCE_REFERENCE=1; records the choice
    (`pallas_kernels.dispatch.last_choice("decode_attention")`)."""
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, window=window)
    choice = decode_attention_choice(qkv, k_cache, v_cache, cos, sin, valid, **kw)
    dispatch.record_choice("decode_attention", choice)
    if choice == PALLAS_TRITON:
        return decode_attention_pallas(qkv, k_cache, v_cache, cos, sin, index, valid, **kw)
    return decode_attention_reference(qkv, k_cache, v_cache, cos, sin, index, valid, **kw)
