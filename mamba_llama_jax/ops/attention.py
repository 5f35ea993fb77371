"""Pure-JAX decode and verify attention: the references that `pallas_kernels.decode_attention` and
`pallas_kernels.verify_attention` must equal.

One decode step of one attention layer after its fused q/k/v projection: RoPE on q and k, the new k/v written
into the cache at slot `index`, and grouped-query attention of the one query per row over the valid slots
`[0, window)`. Softmax in fp32; q and k are rounded to the compute dtype after RoPE (as `models.llama.apply_rope`
does), so the kernel and this reference see the same operands.

Shapes (b batch, h query heads, kv KV heads, d head size, S cache slots):
  qkv (b, (h + 2·kv)·d)  the projections before RoPE, [q | k | v], compute dtype
  k_cache, v_cache (b, S, kv, d)
  cos, sin (b, d/2) fp32  RoPE tables at each row's position
  index () int32          the slot the new token is written to
  valid (b, S) bool       slots holding real tokens *after* this token is written (the cache's `valid`)
Returns (out (b, h·d) in qkv.dtype, k_cache, v_cache).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32
NEG_INF = -1e30  # finite, as models.llama: a fully masked row gives no NaN


def rope_halves(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF rotate-half RoPE in fp32, rounded back to x.dtype. x (..., d); cos/sin broadcastable to (..., d/2)."""
    half = x.shape[-1] // 2
    xf = x.astype(F32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend_one(q: jax.Array, kc: jax.Array, vc: jax.Array, mask: jax.Array, window: int = 0) -> jax.Array:
    """One query per row against the cache, as broadcast-multiply-reduce rather than a batched matmul.

    q (b, h, d); kc, vc (b, S, kv, d); mask (b, S) bool. A dot_general with batch dims (b, kv) would need the
    cache transposed, i.e. a copy of the whole cache per layer per step; a reduction fusion reads it in place.
    `window` > 0 attends only to the first `window` slots (the caller promises the rest are masked).
    """
    b, h, d = q.shape
    kv = kc.shape[2]
    if window and window < kc.shape[1]:
        kc, vc, mask = kc[:, :window], vc[:, :window], mask[:, :window]
    qg = q.reshape(b, 1, kv, h // kv, d).astype(F32)
    scores = jnp.sum(qg * kc[:, :, :, None, :].astype(F32), axis=-1) / math.sqrt(d)  # (b, s, kv, g)
    scores = jnp.where(mask[:, :, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(probs[..., None] * vc[:, :, :, None, :].astype(F32), axis=1)  # (b, kv, g, d)
    return out.reshape(b, h, d).astype(q.dtype)


def rope_and_write(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array, sin: jax.Array,
                   index: jax.Array, *, num_heads: int, num_kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step's prologue: split the fused q·k·v row, rotate q and k, write k and v at slot `index`.
    Returns q (b, heads, d) and the updated caches. For a chunk of t tokens (qkv (b, t, ·), cos / sin (b, t, d/2))
    the t keys / values go to slots [index, index + t) and q is (b, t, heads, d)."""
    one = qkv.ndim == 2
    if one:
        qkv, cos, sin = qkv[:, None], cos[:, None], sin[:, None]
    b, t, _ = qkv.shape
    h, kv = num_heads, num_kv_heads
    d = k_cache.shape[-1]
    q = qkv[..., : h * d].reshape(b, t, h, d)
    k = qkv[..., h * d: (h + kv) * d].reshape(b, t, kv, d)
    v = qkv[..., (h + kv) * d:].reshape(b, t, kv, d)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    q, k = rope_halves(q, c, s), rope_halves(k, c, s)
    start = (0, index, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
    return (q[:, 0] if one else q), k_cache, v_cache


def decode_attention_reference(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array,
                               sin: jax.Array, index: jax.Array, valid: jax.Array, *, num_heads: int,
                               num_kv_heads: int, window: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """See the module docstring. `window` 0 = the whole cache; else a static bound (slots beyond it unread)."""
    b = qkv.shape[0]
    h, d = num_heads, k_cache.shape[-1]
    q, k_cache, v_cache = rope_and_write(qkv, k_cache, v_cache, cos, sin, index, num_heads=h,
                                         num_kv_heads=num_kv_heads)
    slot = jnp.arange(k_cache.shape[1], dtype=jnp.int32)[None, :]
    mask = valid & (slot <= index)
    out = attend_one(q, k_cache, v_cache, mask, window)
    return out.reshape(b, h * d), k_cache, v_cache


def verify_attention_reference(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array,
                               sin: jax.Array, index: jax.Array, valid: jax.Array, *, num_heads: int,
                               num_kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A speculative verify chunk's attention, the decode step's maths for t tokens at once: the chunk's q·k·v
    (b, t, (h + 2·kv)·d) rotated with per-token tables cos / sin (b, t, d/2), its k / v written at slots
    [index, index + t), and token j's query attending to the valid slots <= index + j. The matmuls take the
    cache in its own dtype with fp32 accumulation (no fp32 copy of the cache; q is already rounded to it, so the
    scores are exact products); the softmax is fp32 and its probabilities enter p·V with ~16 bits (in two parts
    of the cache's dtype; fp32 caches: fp32), not rounded to the compute dtype as `models.llama.attend` rounds
    them, so a verified token sees about the numbers a decode step would (`decode_attention_reference`).
    `valid` (b, S): slots holding real tokens with the chunk written (a verify chunk is all real tokens).
    Returns (out (b, t, h·d) in qkv.dtype, k_cache, v_cache)."""
    b, t, _ = qkv.shape
    h, kv = num_heads, num_kv_heads
    d = k_cache.shape[-1]
    q, k_cache, v_cache = rope_and_write(qkv, k_cache, v_cache, cos, sin, index, num_heads=h, num_kv_heads=kv)
    slot = jnp.arange(k_cache.shape[1], dtype=jnp.int32)[None, None, :]
    mask = valid[:, None, :] & (slot <= index + jnp.arange(t, dtype=jnp.int32)[None, :, None])  # (b, t, S)
    cdt = k_cache.dtype
    prec = "highest" if cdt == F32 else None  # fp32 operands at full precision (a GPU would take TF32)
    mm = lambda spec, a, c: jnp.einsum(spec, a, c, precision=prec, preferred_element_type=F32)
    qg = q.reshape(b, t, kv, h // kv, d).astype(cdt)
    scores = mm("btkgd,bskd->bkgts", qg, k_cache) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    if cdt == F32:
        out = mm("bkgts,bskd->btkgd", probs, v_cache)
    else:
        hi = probs.astype(cdt)
        out = mm("bkgts,bskd->btkgd", hi, v_cache) + mm("bkgts,bskd->btkgd", (probs - hi.astype(F32)).astype(cdt),
                                                          v_cache)
    return out.reshape(b, t, h * d).astype(qkv.dtype), k_cache, v_cache
