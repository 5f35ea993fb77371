"""Projections as explicit split-K partial sums, and RMSNorm folded across them (pure JAX).

`matmul_t_partials` writes a GEMM as one batched dot over S slices of K, so the (S, rows, N) fp32 partials are a
tensor of the program and their sum can go into whichever launch reads the projection next
(`mamba_llama_jax.inference.split_k` says where and why). RMSNorm(x) @ W.T = rsqrt(mean(x²) + eps) ·
((x · g) @ W.T) row by row, so a norm in front of a projection becomes its weight on the GEMM's input (`weigh`,
elementwise: XLA computes it with the producer of x) and a per-row scale after the sum (`project_partials`): the
ground truth that the decode attention kernel's prologue matches (`pallas_kernels.decode_attention`, `rows=`).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

from mamba_llama_jax.errors import KernelError

F32 = jnp.float32


def matmul_t_partials(a: jax.Array, wt: jax.Array, parts: int) -> jax.Array:
    """a (rows, K) @ wt (N, K).T as `parts` fp32 partial sums over consecutive slices of K: (parts, rows, N)."""
    rows, k = a.shape
    n = wt.shape[0]
    if parts < 1 or k % parts:
        raise KernelError(f"matmul_t_partials: K = {k} does not divide into {parts} slices")
    ks = k // parts
    return jax.lax.dot_general(a.reshape(rows, parts, ks), wt.reshape(n, parts, ks),
                               (((2,), (2,)), ((1,), (1,))), preferred_element_type=F32)


def sum_partials(p: jax.Array) -> jax.Array:
    """The partials' sum, in order, as elementwise adds (p[0] + p[1] + ...)."""
    return functools.reduce(operator.add, [p[i] for i in range(p.shape[0])])


def row_scale(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm's per-row factor rsqrt(mean(x²) + eps) of x (..., K) over its last axis, fp32 (...,): the one
    definition the models' norms (`models.llama.RMSNorm`, `models.mamba.gated_rmsnorm`) and the split-K form share."""
    xf = x.astype(F32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1) + eps)


def weigh(x: jax.Array, norm_weight: jax.Array) -> jax.Array:
    """x (rows, K) times RMSNorm's weight g (K,), rounded to x's dtype: RMSNorm(x) without its row scale."""
    return (x.astype(F32) * norm_weight.astype(F32)[None, :]).astype(x.dtype)


def project_partials(p: jax.Array, rows: jax.Array, eps: float) -> jax.Array:
    """RMSNorm(rows) @ W.T from p = `matmul_t_partials(weigh(rows, g), W, S)`: the sum times the rows' scale,
    (rows, N) rounded to rows' dtype."""
    return (sum_partials(p) * row_scale(rows, eps)[:, None]).astype(rows.dtype)
