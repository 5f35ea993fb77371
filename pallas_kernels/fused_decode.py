"""Small-batch decode GEMVs that fuse what XLA launches separately, one Pallas launch each.

Why: at decode and small batch the step is launch-bound (~2 µs a kernel; XLA needs ~11-17 kernels per layer for
two RMSNorms, four projections, their split-K reductions, SiLU·mul and two residual adds). With these and the
decode-attention kernels a Llama layer is six launches:
  (a) `norm_matmul`            RMSNorm prologue + x·W        (the fused q·k·v projection)
      decode attention, then the merge of its sequence splits (`decode_attention.merge_partials_pallas`)
  (b) `matmul_residual`        o-projection + residual add
  (c) `norm_gate_up`           RMSNorm prologue + x·[W_gate | W_up] + SiLU(gate)·up epilogue
  (d) `matmul_residual`        down projection + residual add
Past these batches, at 16-64 rows, (c) runs without its norm on rows XLA normalised (`gate_up`,
`inference.gate_up_rows`: the default on GPUs, measured faster than XLA's GEMM + fusion), or, in the `weighed` form,
(b) also writes its rows times the MLP norm's weight (`matmul_residual_weigh`) and (c) takes those straight into its
dots and applies the norm's row scale after them (`gate_up_weighed`): no launch between the two for the norm.
`attn_combine_residual` does the merge in (b)'s prologue instead (one launch fewer): every program then merges
every split of every head, which measured slower than the separate merge (`merge_mode`).
Each kernel's grid runs over blocks of outputs, so every program streams its own slice of the weight matrix
(bf16) and many SMs read at once; each program recomputes the row's RMS norm from the whole row, which costs
nothing at small batch (the row is ~1 kB).

Weights are output-major, (N, K): each output's K weights contiguous (`prepare_for_inference` stores them so).
Why: in the (K, N) layout a program's slice of a few output columns is a 32-byte piece of every one of K rows,
and a decode step reads each layer's weights cold from HBM (a model does not fit in L2). Measured on the H200
(benchmarks/results/decode_profile.md, 2026-12-04): in the decode loop the four (K, N) kernels took 24 µs a
layer, 0.72 of the 0.85 ms a step was busy, though each took 2.3-3.6 µs alone with its weights hot in L2
(fused_decode.md). In (N, K) a program reads whole K-long rows: long contiguous bursts, and output blocks small
enough that every SM streams. Accumulation is fp32. Rounding to the compute dtype happens
where the XLA path rounds (after the norm, after each matmul, after each elementwise op), so a kernel differs
from its reference only by summation order.

Every kernel has a pure-JAX reference of the same signature here (`*_reference`): the exact ops of the
unfused path in `inference/generate.py`, which is what runs on CPU, with MAMBA_LLAMA_FORCE_REFERENCE=1, and
for shapes the kernels do not tile. The dispatchers (`norm_matmul`, ...) choose, and record the choice under
`pallas_kernels.dispatch.last_choice("fused_decode")`.

Shapes (b rows, K input width, N output width; compute dtype = the rows' dtype):
  x, residual (b, K) / (b, N) compute dtype; norm_weight (K,) any float; weights wt (N, K) compute dtype
  (output-major: `x @ wt.T`).
  Kernels: rows b in 1..8 (one 1-D pass per row) or 16 / 32 / 64 (tensor-core dots); K and N multiples of 16
  (blocks are powers of two that tile them exactly: Triton tensors must be powers of two, and exact tiling
  needs no masked loads).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.partials import row_scale, weigh
from pallas_kernels import dispatch
from pallas_kernels.dispatch import is_pow2, pow2_at_least, pow2_dividing
from pallas_kernels.decode_attention import merge_partials
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32
PALLAS_TRITON = dispatch.PALLAS_TRITON
REFERENCE = "reference_xla"
OP = "fused_decode"

# "0" / "off" turns the fused GEMVs off (decode attention alone, for the benchmark's comparison); an integer
# sets the largest batch they serve. Default 4: the decode step of the SmolLM2-shaped teacher on the H200
# (benchmarks/results/decode_crossover.md, unprofiled ms/step, fused vs XLA GEMMs) 0.460 vs 0.658 at batch 1,
# 0.524 vs 0.901 at 2, 0.627 vs 0.859 at 4, 0.963 vs 0.827 at 8 (the 1-D path re-reads every row per output);
# the dot path loses to XLA at 16 and 64 (decode_dot.md: 1.052 vs 0.870, 1.219 vs 1.025).
FUSED_DECODE_ENV = "MAMBA_LLAMA_FUSED_DECODE"
DEFAULT_MAX_BATCH = 4
# ... and by default only for models up to this hidden size (the smallest width of each GEMV): the 1-D path's
# one-output programs win at SmolLM2's 576 but lose at Llama-3.2-1B's 2048 (benchmarks/results/
# speculative_llama1b_b4.md: a fused plain step 2.65 ms at batch 4 vs 1.33 ms for XLA's verify of 3 tokens per row);
# sizes in between are not measured. An explicit MAMBA_LLAMA_FUSED_DECODE=N lifts this bound.
DEFAULT_MAX_HIDDEN = 1024
DOT_ROWS = (16, 32, 64)  # row counts served by tensor-core dots (tl.dot needs >= 16 rows, Triton powers of two)

# Compiled and compared with the reference on an H100: the gpu tests of this file passed there
# (benchmarks/results/test-gpu-decode.xml), so the kernels are the default on GPUs at small batch.
GPU_VERIFIED = True
# `gate_up_pallas` (the dot path's gate·up + SiLU·mul on normalised rows, what `inference.gate_up_rows` routes
# batches 16-64 through): its `-m gpu` test passed on an H100 at 16 and 64 rows in GATE_UP_TILING
# (benchmarks/results/test-gpu-s21-fused-decode.xml, with the whole file's GPU tests; session 20's tiling:
# test-gpu-s20-fused-decode-gate-up.xml). 8 stages at 16 rows (GATE_UP_TILING_BY_ROWS) ran in the H100's decode loop
# (the profiles that chose it) and passed its `-m gpu` test in it (test-gpu-s24.xml, 16 rows).
GATE_UP_GPU_VERIFIED = True
# gate_up_pallas's own tiling where no `tiling(...)` block names one: row groups of 16, 32 gate and 32 up outputs a
# program (1536 / 32 × 4 = 192 programs at 64 rows), 4 pipeline stages, K steps of 64. Swept alone on an H100 at
# 64 rows, weights from HBM (benchmarks/results/fused_decode_dot_cold.md, 16 tilings): 4.75 µs against 6.26 for
# session 20's all-rows-a-program, 16-output, 8-stage tiling and 10.8 for XLA's GEMM + SiLU·mul; K steps of 32
# lose everywhere (5.4-9.2 µs). In the decode loop, one process (decode_profile_s21_gu_tiling.md, unprofiled ms a
# step): 0.921 / 0.923 → 0.880 at batch 64 (the kernel 6.2 → 4.8 µs a layer), 0.750 → 0.743 at 16; 8 stages
# instead of 4: 0.897 at 64, 0.731 at 16.
GATE_UP_TILING = {"dot_rows": 16, "dot_block": 32, "dot_stages": 4, "dot_k": 64}
# ... and what differs from it at a row count: 8 stages at 16 rows. In the decode loop on the H100, twice, one
# process each: 0.743 → 0.731 ms a step at 16 rows (decode_profile_s21_gu_tiling.md), 0.733 → 0.719 and, with the
# 64-slot attention blocks, 0.691 → 0.677 (decode_profile_s22_attn_block*.md), and 0.693 → 0.682-0.684 (4 stages
# → 8, decode_profile_s24_b16.md); at 64 rows 8 stages lost (0.880 → 0.897, 0.873 → 0.884).
GATE_UP_TILING_BY_ROWS = {16: {"dot_stages": 8}}
# matmul_residual_pallas's own dot-path tiling: all rows a program, 8 stages (16 outputs, K steps up to 128). Alone
# at 64 rows on the H100 (fused_decode_dot_cold.md): o 3.13 µs, down 4.64 (the best of 24 / 36 tilings, within
# 0.01 of o's best) against 3.4-4.8 / 5.6 in the dot path's defaults; in the decode loop 3.1 / 4.7 µs a layer
# against 4.3 / 5.9 (decode_profile_s21_gu_tiling.md, `fd64+kq4+g64+ds8` vs `fd64+kq4`).
MATMUL_RESIDUAL_TILING = {"dot_rows": 64, "dot_stages": 8}
# `matmul_residual_weigh_pallas` / `gate_up_weighed_pallas` (the `weighed` MLP form, `inference.gate_up_rows`): their
# `-m gpu` tests passed on an H100 at 16, 32 and 64 rows, bf16 and fp32 (benchmarks/results/test-gpu-s27-weighed.xml),
# and the decode loop ran with them (decode_profile_s27_weighed.md).
WEIGHED_GPU_VERIFIED = True


# ------------------------------------------------------------------------------------------------- references


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`models.llama.RMSNorm` on (b, K) rows: fp32 statistics, rounded to the rows' dtype."""
    return ((x.astype(F32) * row_scale(x, eps)[:, None]) * weight.astype(F32)).astype(x.dtype)


def matmul_t(a: jax.Array, wt: jax.Array) -> jax.Array:
    """a @ wt.T for output-major weights wt (N, K), a (..., K) -> (..., N): one dot_general, no transpose copy."""
    return jax.lax.dot_general(a, wt, (((a.ndim - 1,), (1,)), ((), ())))


def norm_matmul_reference(x: jax.Array, norm_weight: jax.Array, wt: jax.Array, *, eps: float) -> jax.Array:
    """(a): RMSNorm(x) @ wt.T, (b, N) in x.dtype."""
    dt = x.dtype
    return matmul_t(rms_norm_reference(x, norm_weight, eps), wt.astype(dt))


def matmul_residual_reference(a: jax.Array, wt: jax.Array, residual: jax.Array) -> jax.Array:
    """(b)/(d): residual + a @ wt.T, (b, N) in residual.dtype."""
    dt = residual.dtype
    return residual + matmul_t(a.astype(dt), wt.astype(dt))


def swiglu(gu: jax.Array, inter: int) -> jax.Array:
    """SiLU(gate) * up on [gate | up] columns."""
    return jax.nn.silu(gu[..., :inter]) * gu[..., inter:]


def norm_gate_up_reference(x: jax.Array, norm_weight: jax.Array, wt_gate_up: jax.Array, *,
                           eps: float) -> jax.Array:
    """(c): SiLU(h @ W_gate) * (h @ W_up) with h = RMSNorm(x); wt_gate_up = [W_gate | W_up].T (2·I, K) -> (b, I)."""
    return gate_up_reference(rms_norm_reference(x, norm_weight, eps), wt_gate_up)


def gate_up_reference(h: jax.Array, wt_gate_up: jax.Array) -> jax.Array:
    """(c) without its norm: SiLU(h @ W_gate) * (h @ W_up) of already normalised rows h (b, K) -> (b, I)."""
    return swiglu(matmul_t(h, wt_gate_up.astype(h.dtype)), wt_gate_up.shape[0] // 2)


def matmul_residual_weigh_reference(a: jax.Array, wt: jax.Array, residual: jax.Array, norm_weight: jax.Array, *,
                                    squares: bool = False) -> tuple[jax.Array, ...]:
    """(b) with the next norm's weight applied too: (h, weigh(h, g)) with h = residual + a @ wt.T — the rows and the
    rows times RMSNorm's weight g without its row scale (`ops.partials.weigh`), both in residual.dtype; with
    `squares`, also the rows' sums of squares as the kernel's partials (`square_partials`)."""
    h = matmul_residual_reference(a, wt, residual)
    return (h, weigh(h, norm_weight)) + ((square_partials(h),) if squares else ())


def square_partials(h: jax.Array) -> jax.Array:
    """The rows' sums of squares (fp32) as `matmul_residual_weigh_pallas` writes them: (P2, rows), one row per
    program of its grid over N (`square_parts`), then zero rows up to P2."""
    rows, n = h.shape
    parts, p2 = square_parts(n, rows)
    hf = h.astype(F32)
    return jnp.pad(jnp.sum((hf * hf).reshape(rows, parts, n // parts), axis=2).T, ((0, p2 - parts), (0, 0)))


def squares_scale(squares: jax.Array, k: int, eps: float) -> jax.Array:
    """RMSNorm's row scale (rows,) from sum-of-squares partials (P, rows) of rows K wide (`ops.partials.row_scale`)."""
    return jax.lax.rsqrt(jnp.sum(squares, axis=0) / k + eps)


def gate_up_weighed_reference(hw: jax.Array, rows: jax.Array | None, wt_gate_up: jax.Array, *, eps: float,
                              squares: jax.Array | None = None) -> jax.Array:
    """(c) on rows given as hw = weigh(rows, g): SiLU(gate)·up of RMSNorm(rows) @ [W_gate | W_up] with the norm's row
    scale applied to the fp32 products, rounded there ((hw @ W.T) · rsqrt(mean(rows²) + eps)), as
    `ops.partials.project_partials` does for q·k·v; (b, I) in hw.dtype. The row scale from `squares` (the
    o-projection's partials, `square_partials`) where given, else from `rows`."""
    gu = jax.lax.dot_general(hw, wt_gate_up.astype(hw.dtype), _CONTRACT_K, preferred_element_type=F32)
    scale = row_scale(rows, eps) if squares is None else squares_scale(squares, hw.shape[1], eps)
    return swiglu((gu * scale[:, None]).astype(hw.dtype), wt_gate_up.shape[0] // 2)


def attn_combine_residual_reference(o_part: jax.Array, m: jax.Array, l: jax.Array, wt: jax.Array,
                                    residual: jax.Array) -> jax.Array:
    """(b) after a split decode attention: residual + merge(o_part, m, l) @ wt.T.

    o_part (b, S, H·d) fp32 unnormalised per-split outputs, m / l (b, S, H) fp32 per-split running max and sum
    (`pallas_kernels.decode_attention.decode_attention_partials`); wt (N, H·d)."""
    return matmul_residual_reference(merge_partials(o_part, m, l, residual.dtype), wt, residual)


# ---------------------------------------------------------------------------------------------------- checks


def _bad(msg: str) -> KernelError:
    return KernelError(f"fused_decode: {msg}")


def _check_rows(x: Any, name: str, width: int | None = None) -> tuple[int, int]:
    if getattr(x, "ndim", None) != 2:
        raise _bad(f"{name} must be (rows, width), got shape {getattr(x, 'shape', None)}")
    if width is not None and x.shape[1] != width:
        raise _bad(f"{name} must have {width} columns, got {x.shape}")
    return x.shape


def _check_matrix(wt: Any, k: int, name: str) -> int:
    if getattr(wt, "ndim", None) != 2 or wt.shape[1] != k:
        raise _bad(f"{name} must be (N, {k}) (output-major: input width last), got shape "
                   f"{getattr(wt, 'shape', None)}")
    return wt.shape[0]


def _check_gate_up(x: Any, wt_gate_up: Any, name: str) -> tuple[int, int, int]:
    """(rows, K, I) of x (rows, K) and [W_gate | W_up].T (2·I, K)."""
    b, k = _check_rows(x, name)
    n2 = _check_matrix(wt_gate_up, k, "wt_gate_up")
    if n2 % 2:
        raise _bad(f"wt_gate_up must hold [W_gate | W_up].T (an even number of rows), got {wt_gate_up.shape}")
    return b, k, n2 // 2


def kernel_shape_ok(rows: int, *widths: int) -> bool:
    """Whether the kernels tile these sizes: rows 1..8 or 16/32/64, every width a multiple of 16."""
    return (1 <= rows <= 8 or rows in DOT_ROWS) and all(w % 16 == 0 and w > 0 for w in widths)


def _env_bound() -> int | None:
    """The batch bound MAMBA_LLAMA_FUSED_DECODE sets (0 = kernels off), or None where it asks for the defaults
    (unset, 1/on: DEFAULT_MAX_BATCH and DEFAULT_MAX_HIDDEN)."""
    v = os.environ.get(FUSED_DECODE_ENV, "").strip().lower()
    if v in ("", "1", "on", "true", "yes"):
        return None
    if v in ("0", "off", "false", "no"):
        return 0
    try:
        return max(0, int(v))
    except ValueError:
        raise KernelError(f"{FUSED_DECODE_ENV} must be 0/off, 1/on or a batch size, got {v!r}") from None


def max_batch() -> int:
    """Largest row count the dispatchers send to the kernels (0 = kernels off), from MAMBA_LLAMA_FUSED_DECODE."""
    bound = _env_bound()
    return DEFAULT_MAX_BATCH if bound is None else bound


def fused_decode_choice(rows: int, *widths: int) -> str:
    """Which implementation the dispatchers use for `rows` rows and these K/N widths."""
    if not dispatch.kernel_allowed(GPU_VERIFIED):
        return REFERENCE
    bound = _env_bound()
    if bound is None:  # the defaults: a batch bound and a model-size bound
        bound = 0 if widths and min(widths) > DEFAULT_MAX_HIDDEN else DEFAULT_MAX_BATCH
    return PALLAS_TRITON if rows <= bound and kernel_shape_ok(rows, *widths) else REFERENCE


def kernels_would_run(rows: int, *widths: int) -> bool:
    return fused_decode_choice(rows, *widths) == PALLAS_TRITON


# ---------------------------------------------------------------------------------------------------- kernels
# Two code paths per kernel, picked by the (static) row count:
#   rows <= 8: every row on its own as 1-D vectors; each (bn, bk) weight tile is loaded once and reused for all
#     rows; the K loop is unrolled so all of a program's loads are independent (issued together: one memory
#     latency), and products are summed elementwise, reduced across K once at the end.
#   rows 16/32/64: (rows, bk) x (bn, bk)^T tensor-core dots in a fori_loop that Triton pipelines.

_CONTRACT_K = (((1,), (1,)), ((), ()))  # (rows, bk) . (bn, bk) -> (rows, bn)


def _r(v: jax.Array, dt: Any) -> jax.Array:
    """Round an fp32 value to the compute dtype (where the XLA path rounds) and back to fp32."""
    return v.astype(dt).astype(F32)


def _norm_rows_1d(x_ref: Any, nw_ref: Any, r: int, k: int, bk: int, eps: float, dt: Any) -> list[jax.Array]:
    """Row r of x normalised (RMSNorm), as fp32 blocks of bk already rounded to dt."""
    xs = [x_ref[r, pl.ds(i * bk, bk)].astype(F32) for i in range(k // bk)]
    ss = xs[0] * xs[0]
    for v in xs[1:]:
        ss = ss + v * v
    rs = jax.lax.rsqrt(jnp.sum(ss) / k + eps)
    return [_r((v * rs) * nw_ref[pl.ds(i * bk, bk)].astype(F32), dt) for i, v in enumerate(xs)]


def _gemv_rows(rows: list[list[jax.Array]], wt_ref: Any, out0: int | jax.Array, bk: int,
               bn: int) -> list[jax.Array]:
    """Per row: sum_i wt[out0:out0+bn, i-th K block] . rows[r][i] -> (bn,) fp32."""
    acc = [jnp.zeros((bn, bk), F32) for _ in rows]
    for i in range(len(rows[0])):
        wk = wt_ref[pl.ds(out0, bn), pl.ds(i * bk, bk)].astype(F32)
        for r, blocks in enumerate(rows):
            acc[r] = acc[r] + wk * blocks[i][None, :]
    return [jnp.sum(a, axis=1) for a in acc]


def _group(rows: int) -> tuple[int, Any]:
    """Dot path: this program's row group (its size, and the slice of rows) — grid axis 1 (`dot_group`)."""
    rg = dot_group(rows)
    return rg, pl.ds(pl.program_id(1) * rg, rg)


def _dot_t(a: jax.Array, wk: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, wk, _CONTRACT_K, preferred_element_type=F32)


def _gemv_dot(x_ref: Any, nw_ref: Any | None, rs_: Any, wt_ref: Any, outs: list[Any], k: int, bk: int, rows: int,
              bn: int, eps: float, dt: Any) -> list[jax.Array]:
    """(rows, bn) fp32 for each output slice in `outs`: sum over K blocks of x[rs_, block i] @ wt[outs, block i].T;
    RMSNorm(x) in place of x when nw_ref is given. The norm's row scale is one factor per row, so it is applied to
    the dot's results after the loop, its sum of squares taken in the same loop from the blocks the dots load
    (one pass over the rows instead of a pass for the norm first). The dots see the rows times the norm's weight,
    rounded to the compute dtype where the XLA path rounds the normalised rows: the same maths, another rounding
    point. Measured no faster at 64 rows on the H100: norm·gate·up 10.6 µs a layer with the pass first
    (benchmarks/results/decode_profile_s17_fused64.md), 10.0 this way (decode_profile_s21_gu_tiling.md) against
    4.8 for gate_up on normalised rows — the elementwise work between the rows' loads and the dots is what costs."""
    def dots(xb: jax.Array, i: Any, accs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return tuple(a + _dot_t(xb, wt_ref[c, pl.ds(i * bk, bk)].astype(dt)) for a, c in zip(accs, outs))

    init = tuple(jnp.zeros((rows, bn), F32) for _ in outs)
    if nw_ref is None:
        return list(jax.lax.fori_loop(0, k // bk, lambda i, accs: dots(x_ref[rs_, pl.ds(i * bk, bk)].astype(dt),
                                                                        i, accs), init))

    def body(i: Any, carry: tuple[tuple[jax.Array, ...], jax.Array]) -> tuple[tuple[jax.Array, ...], jax.Array]:
        accs, ss = carry
        v = x_ref[rs_, pl.ds(i * bk, bk)].astype(F32)
        xb = (v * nw_ref[pl.ds(i * bk, bk)].astype(F32)[None, :]).astype(dt)
        return dots(xb, i, accs), ss + jnp.sum(v * v, axis=1)
    accs, ss = jax.lax.fori_loop(0, k // bk, body, (init, jnp.zeros((rows,), F32)))
    scale = jax.lax.rsqrt(ss / k + eps)[:, None]
    return [a * scale for a in accs]


def _dot_rows(x_ref: Any, nw_ref: Any | None, wt_ref: Any, outs: list[Any], k: int, bk: int, eps: float,
              dt: Any, bn: int) -> tuple[Any, list[jax.Array]]:
    """Dot path: (this program's row slice, [(rows, bn) fp32 per output slice in `outs`]) for its row group, x
    normalised when nw_ref is given (`_gemv_dot`). (Unrolling the K loop, as the 1-D path does, measured slower
    here: 1.57 vs 1.22 ms a step at batch 64, benchmarks/results/decode_dot.md.)"""
    rg, rs = _group(x_ref.shape[0])
    return rs, _gemv_dot(x_ref, nw_ref, rs, wt_ref, outs, k, bk, rg, bn, eps, dt)


def _norm_matmul_kernel(x_ref, nw_ref, wt_ref, o_ref, *, k: int, bk: int, bn: int, eps: float):
    j = pl.program_id(0)
    dt = o_ref.dtype
    rows = x_ref.shape[0]
    if rows in DOT_ROWS:
        cols = pl.ds(j * bn, bn)
        rs, (acc,) = _dot_rows(x_ref, nw_ref, wt_ref, [cols], k, bk, eps, dt, bn)
        o_ref[rs, cols] = acc.astype(dt)
        return
    xs = [_norm_rows_1d(x_ref, nw_ref, r, k, bk, eps, dt) for r in range(rows)]
    for r, acc in enumerate(_gemv_rows(xs, wt_ref, j * bn, bk, bn)):
        o_ref[r, pl.ds(j * bn, bn)] = acc.astype(dt)


def _silu_mul(g: jax.Array, u: jax.Array, dt: Any) -> jax.Array:
    """`swiglu` of fp32 gate / up values with the XLA path's roundings, in dt."""
    g, u = _r(g, dt), _r(u, dt)
    s = _r(1.0 / (1.0 + jnp.exp(-g)), dt)
    return (_r(g * s, dt) * u).astype(dt)


def _norm_gate_up_kernel(x_ref, nw_ref, wt_ref, o_ref, *, k: int, bk: int, bn: int, inter: int, eps: float):
    j = pl.program_id(0)
    dt = o_ref.dtype
    rows = x_ref.shape[0]
    if rows in DOT_ROWS:
        cg, cu = pl.ds(j * bn, bn), pl.ds(inter + j * bn, bn)
        rs, (g, u) = _dot_rows(x_ref, nw_ref, wt_ref, [cg, cu], k, bk, eps, dt, bn)
        o_ref[rs, cg] = _silu_mul(g, u, dt)
        return
    xs = [_norm_rows_1d(x_ref, nw_ref, r, k, bk, eps, dt) for r in range(rows)]
    gs = _gemv_rows(xs, wt_ref, j * bn, bk, bn)
    us = _gemv_rows(xs, wt_ref, inter + j * bn, bk, bn)
    for r in range(rows):
        o_ref[r, pl.ds(j * bn, bn)] = _silu_mul(gs[r], us[r], dt)


def _gate_up_kernel(h_ref, wt_ref, o_ref, **kw: Any):
    """`_norm_gate_up_kernel` on rows already normalised: the dot path's K loop loads them straight into its
    dots (what Triton pipelines), with no pass over the rows for their norm first."""
    _norm_gate_up_kernel(h_ref, None, wt_ref, o_ref, eps=0.0, **kw)


def _gate_up_weighed_kernel(hw_ref, x_ref, wt_ref, o_ref, *, k: int, bk: int, bn: int, inter: int, eps: float,
                            squared: bool):
    """`_gate_up_kernel` on hw = weigh(rows, g): its K loop loads hw straight into the dots and, beside them, the
    rows themselves (x_ref) for their sum of squares (no elementwise work between a load and a dot) — or, `squared`,
    x_ref holds the o-projection's partial sums of squares (P2, rows), added up before the loop, which then loads hw
    alone; the norm's row scale multiplies the products after the loop."""
    j = pl.program_id(0)
    dt = o_ref.dtype
    rg, rs = _group(hw_ref.shape[0])
    cg, cu = pl.ds(j * bn, bn), pl.ds(inter + j * bn, bn)

    def dots(i: Any, g: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        hb = hw_ref[rs, pl.ds(i * bk, bk)]
        return (g + _dot_t(hb, wt_ref[cg, pl.ds(i * bk, bk)].astype(dt)),
                u + _dot_t(hb, wt_ref[cu, pl.ds(i * bk, bk)].astype(dt)))

    def body(i: Any, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        g, u, ss = carry
        v = x_ref[rs, pl.ds(i * bk, bk)].astype(F32)
        return (*dots(i, g, u), ss + jnp.sum(v * v, axis=1))

    zero = jnp.zeros((rg, bn), F32)
    if squared:
        ss = jnp.sum(x_ref[:, rs], axis=0)
        g, u = jax.lax.fori_loop(0, k // bk, lambda i, c: dots(i, *c), (zero, zero))
    else:
        g, u, ss = jax.lax.fori_loop(0, k // bk, body, (zero, zero, jnp.zeros((rg,), F32)))
    scale = jax.lax.rsqrt(ss / k + eps)[:, None]
    o_ref[rs, cg] = _silu_mul(g * scale, u * scale, dt)


def _matmul_residual_weigh_kernel(a_ref, wt_ref, res_ref, nw_ref, o_ref, ow_ref, sq_ref=None, *, k: int, bk: int,
                                  bn: int, parts: int):
    """`_matmul_residual_kernel`'s dot path writing the next norm's weighed rows too (`weigh`) and, given `sq_ref`
    (P2, rows), its rows' sums of squares over its outputs at row j (`square_partials`); programs j < P2 - parts
    write the zero rows after the `parts` programs' own."""
    j = pl.program_id(0)
    dt = o_ref.dtype
    cols = pl.ds(j * bn, bn)
    rs, (acc,) = _dot_rows(a_ref, None, wt_ref, [cols], k, bk, 0.0, dt, bn)
    h = (_r(acc, dt) + res_ref[rs, cols].astype(F32)).astype(dt)
    o_ref[rs, cols] = h
    ow_ref[rs, cols] = (h.astype(F32) * nw_ref[cols].astype(F32)[None, :]).astype(dt)
    if sq_ref is not None:
        hf = h.astype(F32)
        sq_ref[j, rs] = jnp.sum(hf * hf, axis=1)

        @pl.when(j < sq_ref.shape[0] - parts)
        def _zero_row() -> None:
            sq_ref[parts + j, rs] = jnp.zeros(hf.shape[:1], F32)


def _matmul_residual_kernel(a_ref, wt_ref, res_ref, o_ref, *, k: int, bk: int, bn: int):
    j = pl.program_id(0)
    dt = o_ref.dtype
    rows = a_ref.shape[0]
    cols = pl.ds(j * bn, bn)
    if rows in DOT_ROWS:
        rs, (acc,) = _dot_rows(a_ref, None, wt_ref, [cols], k, bk, 0.0, dt, bn)
        o_ref[rs, cols] = (_r(acc, dt) + res_ref[rs, cols].astype(F32)).astype(dt)
        return
    xs = [[a_ref[r, pl.ds(i * bk, bk)].astype(F32) for i in range(k // bk)] for r in range(rows)]
    for r, acc in enumerate(_gemv_rows(xs, wt_ref, j * bn, bk, bn)):
        o_ref[r, cols] = (_r(acc, dt) + res_ref[r, cols].astype(F32)).astype(dt)


def _attn_combine_kernel(op_ref, m_ref, l_ref, wt_ref, res_ref, o_ref, *, heads: int, d: int, splits: int,
                         bn: int):
    """Every program merges the splits' partial softmaxes of every head (cheap: rows x S x H·d fp32, read from
    L2 by all programs) and multiplies the merged, rounded attention output with its rows of W_o^T."""
    j = pl.program_id(0)
    dt = o_ref.dtype
    rows = op_ref.shape[0]
    cols = pl.ds(j * bn, bn)
    if rows in DOT_ROWS:
        # splits <= 4 here (>= 48 programs already at 16 rows): the split axis is unrolled, all tensors 2-D
        rows, rs = _group(rows)
        acc = jnp.zeros((rows, bn), F32)
        for hh in range(heads):
            ms = [m_ref[rs, s, hh] for s in range(splits)]
            mx = ms[0]
            for v in ms[1:]:
                mx = jnp.maximum(mx, v)
            num = jnp.zeros((rows, d), F32)
            den = jnp.zeros((rows,), F32)
            for s in range(splits):
                wt = jnp.exp(ms[s] - mx)
                den = den + wt * l_ref[rs, s, hh]
                num = num + wt[:, None] * op_ref[rs, s, pl.ds(hh * d, d)]
            a = (num / jnp.maximum(den, 1e-30)[:, None]).astype(dt)
            acc = acc + _dot_t(a, wt_ref[cols, pl.ds(hh * d, d)].astype(dt))
        o_ref[rs, cols] = (_r(acc, dt) + res_ref[rs, cols].astype(F32)).astype(dt)
        return
    sl = pl.ds(0, splits)
    acc = [jnp.zeros((bn, d), F32) for _ in range(rows)]  # reduced over d once, at the end (as `_gemv_rows`)
    for hh in range(heads):
        wk = wt_ref[cols, pl.ds(hh * d, d)].astype(F32)
        for r in range(rows):
            mh = m_ref[r, sl, hh]  # (S,)
            wt = jnp.exp(mh - jnp.max(mh))
            den = jnp.sum(wt * l_ref[r, sl, hh])
            num = jnp.sum(wt[:, None] * op_ref[r, sl, pl.ds(hh * d, d)], axis=0)  # (d,)
            a = _r(num / jnp.maximum(den, 1e-30), dt)
            acc[r] = acc[r] + wk * a[None, :]
    for r in range(rows):
        o_ref[r, cols] = (_r(jnp.sum(acc[r], axis=1), dt) + res_ref[r, cols].astype(F32)).astype(dt)


# --------------------------------------------------------------------------------------------- pallas wrappers

# The 1-D path's tiling, read when a kernel is traced. `tiling` overrides them for a while (the decode-step
# benchmark's variants, side by side in one run).
_TILING: dict[str, Any] = {"row_block": 1, "row_warps": 1, "combine_block": 0, "merge": "kernel", "dot_rows": 16,
                           "dot_block": 16, "dot_stages": 3, "dot_k": 128, "squares": "o"}
DOT_WARPS = 4
MERGES = ("combine", "xla", "kernel")
# Where the `weighed` form takes its rows' sums of squares (`tiling(squares=...)`): "gate_up" = gate·up loads the
# rows beside the weighed rows each K step and sums their squares there; "o" = the o-projection kernel writes them as
# partial sums, one per program (`square_parts`), and gate·up adds those up before its K loop, which then loads the
# weighed rows alone. "o" is the default: on the H200 at 64 rows, one process (benchmarks/results/
# decode_profile_s28_squares.md), 0.784 / 0.795 against 0.797 / 0.797 ms a step, gate·up 5.4 against 5.7 µs a layer;
# issue 3's table 0.804 against 0.814 (generate_s28_squares.md). Both ways passed the GPU tests there
# (test-gpu-s28-squares.xml).
SQUARES = ("gate_up", "o")


@contextlib.contextmanager
def tiling(*, row_block: int | None = None, row_warps: int | None = None,
           combine_block: int | None = None, merge: str | None = None,
           dot_rows: int | None = None, dot_block: int | None = None,
           dot_stages: int | None = None, dot_k: int | None = None, squares: str | None = None) -> Iterator[None]:
    """Within the block, kernels traced anew use these outputs per program / warps on the 1-D path, and this
    output block for `attn_combine_residual` (0: as the other kernels); `merge` says where a split decode
    attention's partials are merged in the decode step (`merge_mode`); `dot_rows` / `dot_block` the dot path's
    rows (`dot_group`: 16..64) / outputs (`pick_block_n`: 16..128) per program and `dot_stages` the pipeline
    stages of its K loop (1..8, Triton's num_stages; default 3) and `dot_k` the most K a step of that loop takes
    (`block_k`: 16..128, default 128); `squares` where the `weighed` form sums its rows' squares (SQUARES). Clear
    jax's caches (`jax.clear_caches`) so that nothing traced before is reused."""
    if merge is not None and merge not in MERGES:
        raise _bad(f"tiling merge must be one of {MERGES}, got {merge!r}")
    if squares is not None and squares not in SQUARES:
        raise _bad(f"tiling squares must be one of {SQUARES}, got {squares!r}")
    if dot_rows is not None and dot_rows not in DOT_ROWS:
        raise _bad(f"tiling dot_rows must be one of {DOT_ROWS}, got {dot_rows}")
    if dot_block is not None and dot_block not in (16, 32, 64, 128):
        raise _bad(f"tiling dot_block must be one of 16, 32, 64, 128, got {dot_block}")
    if dot_stages is not None and not 1 <= dot_stages <= 8:
        raise _bad(f"tiling dot_stages must be in 1..8, got {dot_stages}")
    if dot_k is not None and dot_k not in (16, 32, 64, 128):
        raise _bad(f"tiling dot_k must be one of 16, 32, 64, 128, got {dot_k}")
    new = {"row_block": row_block, "row_warps": row_warps, "combine_block": combine_block, "merge": merge,
           "dot_rows": dot_rows, "dot_block": dot_block, "dot_stages": dot_stages, "dot_k": dot_k, "squares": squares}
    for k, v in new.items():
        if k not in ("merge", "dot_stages", "squares") and v is not None and (v < 0 or (v and v & (v - 1))):
            raise _bad(f"tiling {k} must be a power of two (or 0 for combine_block), got {v}")
    old, old_named = dict(_TILING), set(_NAMED)
    _TILING.update({k: v for k, v in new.items() if v is not None})
    _NAMED.update(k for k, v in new.items() if v is not None)
    try:
        yield
    finally:
        _TILING.clear()
        _TILING.update(old)
        _NAMED.clear()
        _NAMED.update(old_named)


_NAMED: set[str] = set()  # the `_TILING` keys an enclosing `tiling(...)` block sets


def _own_tiling(own: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
    """A kernel's own tiling defaults (e.g. GATE_UP_TILING) for what is traced inside, except the keys an
    enclosing `tiling(...)` block names (a benchmark's variant still decides)."""
    return tiling(**{k: v for k, v in own.items() if k not in _NAMED})


def pick_block_n(n: int, rows: int, *, combine: bool = False) -> int:
    """Outputs per program. Dot path: 16 (a tensor-core dot's smallest N; `tiling(dot_block=...)` for more: fewer
    programs, each with larger dots). 1-D path: 1, with one warp (SmolLM2 at
    batch 1: 960 programs for q·k·v, 576 for o and down, 1536 for gate·up), so that every SM streams its share of
    the weights, one K-long contiguous row per program. Measured in the decode loop on the H200
    (benchmarks/results/decode_variants.md): the four GEMVs' step total 0.440 ms at 1 output / 1 warp, 0.495 at
    2 / 1, 0.649 at 4 / 1, 0.722 at 4 / 2 (the previous default). The combine kernel may take its own (`tiling`):
    each of its programs also merges every split of every head, work that grows with the number of programs."""
    if rows in DOT_ROWS:
        return pow2_dividing(n, _TILING["dot_block"])
    cap = (_TILING["combine_block"] if combine else 0) or _TILING["row_block"]
    return pow2_dividing(n, cap)


def merge_mode() -> str:
    """Where the decode step merges a split attention's partials: "combine" = in the o-projection kernel's
    prologue (`attn_combine_residual`, no extra launch); "xla" / "kernel" = first on their own (an XLA fusion /
    `decode_attention.merge_partials_pallas`), then `matmul_residual`."""
    return _TILING["merge"]


def dot_group(rows: int) -> int:
    """Dot path: rows per program (grid axis 1 runs over the groups). 16, the smallest tensor-core dot: 4x the
    programs at 64 rows (each output block's weights are then read by 4 programs, 3 of them from L2)."""
    return min(rows, _TILING["dot_rows"])


def pick_warps(rows: int) -> int:
    return DOT_WARPS if rows in DOT_ROWS else _TILING["row_warps"]


def _check_kernel_shape(rows: int, *widths: int) -> None:
    if not kernel_shape_ok(rows, *widths):
        raise _bad(f"the Pallas kernels need 1..8 or {DOT_ROWS} rows and widths that are multiples of 16, got "
                   f"{rows} rows and widths {widths}; use the *_reference functions (or the dispatchers)")


def _call(kernel: Any, out: Any, grid: int, interpret: bool, num_warps: int, name: str, *args: Any) -> Any:
    """Launches `kernel` over `grid` output blocks (and, on the dot path, the row groups) for `out` (one shape or a
    tuple of them, all with the same rows)."""
    rows = jax.tree.leaves(out)[0].shape[0]
    grids = (grid, rows // dot_group(rows)) if rows in DOT_ROWS else (grid,)
    return triton_call(kernel, grid=grids, out_shape=out, interpret=interpret, name=name,
                       num_warps=num_warps or pick_warps(rows),
                       num_stages=_TILING["dot_stages"] if rows in DOT_ROWS else 1)(*args)


def block_k(k: int, rows: int) -> int:
    """K per step of a kernel's K loop: the largest power of two up to 128 tiling K (the 1-D path unrolls the
    loop), on the dot path up to `tiling(dot_k=)` (a step's three tiles are what each pipeline stage holds)."""
    return pow2_dividing(k, _TILING["dot_k"] if rows in DOT_ROWS else 128)


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "interpret", "num_warps"))
def norm_matmul_pallas(x: jax.Array, norm_weight: jax.Array, wt: jax.Array, *, eps: float, block_n: int = 0,
                       interpret: bool = False, num_warps: int = 0) -> jax.Array:
    """(a) as one launch; same result as `norm_matmul_reference` up to summation order."""
    b, k = _check_rows(x, "x")
    n = _check_matrix(wt, k, "wt")
    _check_kernel_shape(b, k, n)
    bn = block_n or pick_block_n(n, b)
    kern = functools.partial(_norm_matmul_kernel, k=k, bk=block_k(k, b), bn=bn, eps=float(eps))
    return _call(kern, jax.ShapeDtypeStruct((b, n), x.dtype), n // bn, interpret, num_warps, "norm_matmul",
                 x, norm_weight, wt.astype(x.dtype))


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "interpret", "num_warps"))
def norm_gate_up_pallas(x: jax.Array, norm_weight: jax.Array, wt_gate_up: jax.Array, *, eps: float,
                        block_n: int = 0, interpret: bool = False, num_warps: int = 0) -> jax.Array:
    """(c) as one launch; same result as `norm_gate_up_reference` up to summation order."""
    b, k = _check_rows(x, "x")
    n2 = _check_matrix(wt_gate_up, k, "wt_gate_up")
    inter = n2 // 2
    _check_kernel_shape(b, k, inter)
    bn = block_n or pick_block_n(inter, b)
    kern = functools.partial(_norm_gate_up_kernel, k=k, bk=block_k(k, b), bn=bn, inter=inter, eps=float(eps))
    return _call(kern, jax.ShapeDtypeStruct((b, inter), x.dtype), inter // bn, interpret, num_warps,
                 "norm_gate_up", x, norm_weight, wt_gate_up.astype(x.dtype))


@functools.partial(jax.jit, static_argnames=("block_n", "interpret", "num_warps"))
def gate_up_pallas(h: jax.Array, wt_gate_up: jax.Array, *, block_n: int = 0, interpret: bool = False,
                   num_warps: int = 0) -> jax.Array:
    """(c) without its norm, one launch on the dot path (16 / 32 / 64 rows) in GATE_UP_TILING (with
    GATE_UP_TILING_BY_ROWS's changes at its row count); same result as `gate_up_reference` up to summation order."""
    b, k, inter = _check_gate_up(h, wt_gate_up, "h")
    if b not in DOT_ROWS:
        raise _bad(f"gate_up_pallas needs {DOT_ROWS} rows (the dot path's), got {b}")
    _check_kernel_shape(b, k, inter)
    with _own_tiling({**GATE_UP_TILING, **GATE_UP_TILING_BY_ROWS.get(b, {})}):
        bn = block_n or pick_block_n(inter, b)
        kern = functools.partial(_gate_up_kernel, k=k, bk=block_k(k, b), bn=bn, inter=inter)
        return _call(kern, jax.ShapeDtypeStruct((b, inter), h.dtype), inter // bn, interpret, num_warps, "gate_up",
                     h, wt_gate_up.astype(h.dtype))


@functools.partial(jax.jit, static_argnames=("block_n", "interpret", "num_warps"))
def matmul_residual_pallas(a: jax.Array, wt: jax.Array, residual: jax.Array, *, block_n: int = 0,
                           interpret: bool = False, num_warps: int = 0) -> jax.Array:
    """(b)/(d) as one launch; same result as `matmul_residual_reference` up to summation order."""
    b, k = _check_rows(a, "a")
    n = _check_matrix(wt, k, "wt")
    _check_rows(residual, "residual", n)
    if residual.shape[0] != b:
        raise _bad(f"residual must have a's {b} rows, got {residual.shape}")
    _check_kernel_shape(b, k, n)
    dt = residual.dtype
    with _own_tiling(MATMUL_RESIDUAL_TILING):
        bn = block_n or pick_block_n(n, b)
        kern = functools.partial(_matmul_residual_kernel, k=k, bk=block_k(k, b), bn=bn)
        return _call(kern, jax.ShapeDtypeStruct((b, n), dt), n // bn, interpret, num_warps, "matmul_residual",
                     a.astype(dt), wt.astype(dt), residual)


@functools.partial(jax.jit, static_argnames=("squares", "block_n", "interpret", "num_warps"))
def matmul_residual_weigh_pallas(a: jax.Array, wt: jax.Array, residual: jax.Array, norm_weight: jax.Array, *,
                                 squares: bool = False, block_n: int = 0, interpret: bool = False,
                                 num_warps: int = 0) -> tuple[jax.Array, ...]:
    """(b) with the next norm's weighed rows as a second output (and, with `squares`, the rows' sum-of-squares
    partials as a third), one launch on the dot path (16 / 32 / 64 rows) in MATMUL_RESIDUAL_TILING; same result as
    `matmul_residual_weigh_reference` up to summation order."""
    b, k = _check_rows(a, "a")
    n = _check_matrix(wt, k, "wt")
    _check_rows(residual, "residual", n)
    if residual.shape[0] != b or getattr(norm_weight, "shape", None) != (n,) or b not in DOT_ROWS:
        raise _bad(f"matmul_residual_weigh_pallas needs {DOT_ROWS} rows, residual (rows, {n}) and norm_weight "
                   f"({n},), got a {a.shape}, residual {residual.shape}, norm_weight "
                   f"{getattr(norm_weight, 'shape', None)}")
    _check_kernel_shape(b, k, n)
    dt = residual.dtype
    with _own_tiling(MATMUL_RESIDUAL_TILING):
        bn = block_n or pick_block_n(n, b)
        parts = n // bn
        kern = functools.partial(_matmul_residual_weigh_kernel, k=k, bk=block_k(k, b), bn=bn, parts=parts)
        out = jax.ShapeDtypeStruct((b, n), dt)
        sq = (jax.ShapeDtypeStruct((pow2_at_least(parts, 1), b), F32),) if squares else ()
        return _call(kern, (out, out, *sq), parts, interpret, num_warps, "matmul_residual_weigh",
                     a.astype(dt), wt.astype(dt), residual, norm_weight)


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "interpret", "num_warps"))
def gate_up_weighed_pallas(hw: jax.Array, rows: jax.Array | None, wt_gate_up: jax.Array, *, eps: float,
                           squares: jax.Array | None = None, block_n: int = 0, interpret: bool = False,
                           num_warps: int = 0) -> jax.Array:
    """(c) on weighed rows (`gate_up_weighed_reference`: the row scale from `squares` where given, else from
    `rows`), one launch on the dot path in GATE_UP_TILING (with GATE_UP_TILING_BY_ROWS's changes); same result as
    the reference up to summation order."""
    b, k, inter = _check_gate_up(hw, wt_gate_up, "hw")
    sq = getattr(squares, "shape", None)
    if b not in DOT_ROWS or (squares is None and getattr(rows, "shape", None) != hw.shape) or (
            squares is not None and (len(sq) != 2 or sq[1] != b or not is_pow2(sq[0])
                                     or squares.dtype != jnp.float32)):
        raise _bad(f"gate_up_weighed_pallas needs {DOT_ROWS} rows and rows shaped like hw, or fp32 squares "
                   f"(power of two, rows), got hw {hw.shape}, rows {getattr(rows, 'shape', None)}, squares {sq}")
    _check_kernel_shape(b, k, inter)
    with _own_tiling({**GATE_UP_TILING, **GATE_UP_TILING_BY_ROWS.get(b, {})}):
        bn = block_n or pick_block_n(inter, b)
        kern = functools.partial(_gate_up_weighed_kernel, k=k, bk=block_k(k, b), bn=bn, inter=inter, eps=float(eps),
                                 squared=squares is not None)
        return _call(kern, jax.ShapeDtypeStruct((b, inter), hw.dtype), inter // bn, interpret, num_warps,
                     "gate_up_weighed", hw, rows if squares is None else squares, wt_gate_up.astype(hw.dtype))


@functools.partial(jax.jit, static_argnames=("block_n", "interpret", "num_warps"))
def attn_combine_residual_pallas(o_part: jax.Array, m: jax.Array, l: jax.Array, wt: jax.Array,
                                 residual: jax.Array, *, block_n: int = 0, interpret: bool = False,
                                 num_warps: int = 0) -> jax.Array:
    """(b) after a split decode attention, as one launch (the merge of the splits happens in its prologue)."""
    check_combine_args(o_part, m, l, wt, residual, kernel=True)
    b, splits, hd = o_part.shape
    heads = m.shape[2]
    n = wt.shape[0]
    bn = block_n or pick_block_n(n, b, combine=True)
    kern = functools.partial(_attn_combine_kernel, heads=heads, d=hd // heads, splits=splits, bn=bn)
    dt = residual.dtype
    return _call(kern, jax.ShapeDtypeStruct((b, n), dt), n // bn, interpret, num_warps, "attn_combine_residual",
                 o_part.astype(F32), m.astype(F32), l.astype(F32), wt.astype(dt), residual)


MAX_COMBINE_SPLITS = 16  # partials every program of the combine kernel reads: rows x S x H·d fp32


def combine_max_splits(rows: int) -> int:
    """The most attention splits `attn_combine_residual`'s kernel merges at this row count (the dot path
    unrolls the split axis)."""
    return 4 if rows in DOT_ROWS else MAX_COMBINE_SPLITS


def check_combine_args(o_part: Any, m: Any, l: Any, wt: Any, residual: Any, *, kernel: bool) -> None:
    if getattr(o_part, "ndim", None) != 3:
        raise _bad(f"o_part must be (rows, splits, heads·head_dim), got {getattr(o_part, 'shape', None)}")
    b, s, hd = o_part.shape
    if getattr(m, "ndim", None) != 3 or m.shape[:2] != (b, s) or hd % m.shape[2] or l.shape != m.shape:
        raise _bad(f"m and l must both be (rows, splits, heads) = ({b}, {s}, heads dividing {hd}), got "
                   f"{getattr(m, 'shape', None)} and {getattr(l, 'shape', None)}")
    n = _check_matrix(wt, hd, "wt")
    if residual.shape != (b, n):
        raise _bad(f"residual must be (rows, N) = {(b, n)}, got {residual.shape}")
    if not kernel:
        return
    _check_kernel_shape(b, hd, n)
    d = hd // m.shape[2]
    if not (is_pow2(s) and s <= MAX_COMBINE_SPLITS) or not (is_pow2(d) and d >= 16):
        raise _bad(f"the combine kernel needs a power-of-two split count <= {MAX_COMBINE_SPLITS} and head_dim, "
                   f"got splits {s}, head_dim {d}")
    if s > combine_max_splits(b):
        raise _bad(f"the combine kernel takes at most {combine_max_splits(b)} splits at {b} rows, got {s}")


# ------------------------------------------------------------------------------------------------ dispatchers


def _interpret() -> bool:
    return not dispatch._on_gpu()


def _record(choice: str) -> str:
    dispatch.record_choice(OP, choice)
    return choice


def norm_matmul(x: jax.Array, norm_weight: jax.Array, wt: jax.Array, *, eps: float) -> jax.Array:
    """(a): the kernel on GPU at small batch (see GPU_VERIFIED), the reference elsewhere."""
    b, k = _check_rows(x, "x")
    n = _check_matrix(wt, k, "wt")
    if _record(fused_decode_choice(b, k, n)) == PALLAS_TRITON:
        return norm_matmul_pallas(x, norm_weight, wt, eps=eps, interpret=_interpret())
    return norm_matmul_reference(x, norm_weight, wt, eps=eps)


def norm_gate_up(x: jax.Array, norm_weight: jax.Array, wt_gate_up: jax.Array, *, eps: float) -> jax.Array:
    """(c): the kernel on GPU at small batch (see GPU_VERIFIED), the reference elsewhere."""
    b, k, inter = _check_gate_up(x, wt_gate_up, "x")
    if _record(fused_decode_choice(b, k, inter)) == PALLAS_TRITON:
        return norm_gate_up_pallas(x, norm_weight, wt_gate_up, eps=eps, interpret=_interpret())
    return norm_gate_up_reference(x, norm_weight, wt_gate_up, eps=eps)


def _dot_path_choice(gpu_verified: bool, rows: int, *widths: int) -> str:
    """The kernel for 16 / 32 / 64 rows and widths it tiles where allowed (on a GPU once `gpu_verified`, or with
    MAMBA_LLAMA_UNVERIFIED_KERNELS=1), whatever the 1-D path's batch bound; else the reference."""
    ok = dispatch.kernel_allowed(gpu_verified) and rows in DOT_ROWS and kernel_shape_ok(rows, *widths)
    return PALLAS_TRITON if ok else REFERENCE


def gate_up_choice(rows: int, k: int, inter: int) -> str:
    """Which implementation `gate_up` uses: `_dot_path_choice` with GATE_UP_GPU_VERIFIED."""
    return _dot_path_choice(GATE_UP_GPU_VERIFIED, rows, k, inter)


def gate_up(h: jax.Array, wt_gate_up: jax.Array) -> jax.Array:
    """(c) without its norm (`gate_up_choice`); records its choice under "gate_up"."""
    choice = gate_up_choice(*_check_gate_up(h, wt_gate_up, "h"))
    dispatch.record_choice("gate_up", choice)
    if choice == PALLAS_TRITON:
        return gate_up_pallas(h, wt_gate_up, interpret=_interpret())
    return gate_up_reference(h, wt_gate_up)


def weighed_choice(rows: int, *widths: int) -> str:
    """Which implementation the `weighed` MLP form's two kernels use: `_dot_path_choice` with WEIGHED_GPU_VERIFIED."""
    return _dot_path_choice(WEIGHED_GPU_VERIFIED, rows, *widths)


def squares_from() -> str:
    """Where the `weighed` form takes its rows' sums of squares, as traced now (SQUARES)."""
    return _TILING["squares"]


def square_parts(n: int, rows: int) -> tuple[int, int]:
    """`matmul_residual_weigh_pallas`'s programs over N = n at `rows` rows, and the rows of its sum-of-squares
    partials: that count rounded up to a power of two (Triton's blocks; gate·up loads them all as one block)."""
    with _own_tiling(MATMUL_RESIDUAL_TILING):
        parts = n // pick_block_n(n, rows)
    return parts, pow2_at_least(parts, 1)


def matmul_residual_weigh(a: jax.Array, wt: jax.Array, residual: jax.Array,
                          norm_weight: jax.Array) -> tuple[jax.Array, ...]:
    """(b) writing the next norm's weighed rows too (`weighed_choice`), and the rows' sum-of-squares partials where
    `squares_from()` is "o"; records its choice under "o_weigh"."""
    b, k = _check_rows(a, "a")
    choice = weighed_choice(b, k, _check_matrix(wt, k, "wt"))
    dispatch.record_choice("o_weigh", choice)
    squares = squares_from() == "o"
    if choice == PALLAS_TRITON:
        return matmul_residual_weigh_pallas(a, wt, residual, norm_weight, squares=squares, interpret=_interpret())
    return matmul_residual_weigh_reference(a, wt, residual, norm_weight, squares=squares)


def gate_up_weighed(hw: jax.Array, rows: jax.Array, wt_gate_up: jax.Array, *, eps: float,
                    squares: jax.Array | None = None) -> jax.Array:
    """(c) on weighed rows (`weighed_choice`), the row scale from `squares` where given; records its choice under
    "gate_up"."""
    choice = weighed_choice(*_check_gate_up(hw, wt_gate_up, "hw"))
    dispatch.record_choice("gate_up", choice)
    if choice == PALLAS_TRITON:
        return gate_up_weighed_pallas(hw, rows, wt_gate_up, eps=eps, squares=squares, interpret=_interpret())
    return gate_up_weighed_reference(hw, rows, wt_gate_up, eps=eps, squares=squares)


def matmul_residual(a: jax.Array, wt: jax.Array, residual: jax.Array) -> jax.Array:
    """(b)/(d): the kernel on GPU at small batch (see GPU_VERIFIED), the reference elsewhere."""
    b, k = _check_rows(a, "a")
    n = _check_matrix(wt, k, "wt")
    if _record(fused_decode_choice(b, k, n)) == PALLAS_TRITON:
        return matmul_residual_pallas(a, wt, residual, interpret=_interpret())
    return matmul_residual_reference(a, wt, residual)


def attn_combine_residual(o_part: jax.Array, m: jax.Array, l: jax.Array, wt: jax.Array,
                          residual: jax.Array) -> jax.Array:
    """(b) after a split decode attention: the kernel where it tiles, else the reference."""
    check_combine_args(o_part, m, l, wt, residual, kernel=False)
    choice = fused_decode_choice(o_part.shape[0], o_part.shape[2], wt.shape[0])
    if choice == PALLAS_TRITON:
        try:
            check_combine_args(o_part, m, l, wt, residual, kernel=True)
        except KernelError:
            choice = REFERENCE
    if _record(choice) == PALLAS_TRITON:
        return attn_combine_residual_pallas(o_part, m, l, wt, residual, interpret=_interpret())
    return attn_combine_residual_reference(o_part, m, l, wt, residual)
