"""Small-batch decode GEMVs that fuse what XLA launches separately, one Pallas launch each.

Why: at decode and small batch the step is launch-bound (~2 µs a kernel; XLA needs ~11-17 kernels per layer for
two RMSNorms, four projections, their split-K reductions, SiLU·mul and two residual adds). With these four and
the decode-attention kernel a Llama layer is five launches:
  (a) `norm_matmul`            RMSNorm prologue + x·W        (the fused q·k·v projection)
  (b) `attn_combine_residual`  merge of decode attention's per-split partial softmaxes + o-projection + residual
      (`matmul_residual` when attention ran unsplit)
  (c) `norm_gate_up`           RMSNorm prologue + x·[W_gate | W_up] + SiLU(gate)·up epilogue
  (d) `matmul_residual`        down projection + residual add
Each kernel's grid runs over blocks of output columns, so every program streams its own slice of the weight
matrix (bf16) and many SMs read at once; each program recomputes the row's RMS norm from the whole row, which
costs nothing at small batch (the row is ~1 kB). Accumulation is fp32. Rounding to the compute dtype happens
where the XLA path rounds (after the norm, after each matmul, after each elementwise op), so a kernel differs
from its reference only by summation order.

Every kernel has a pure-JAX reference of the same signature here (`*_reference`): the exact ops of the
unfused path in `inference/generate.py`, which is what runs on CPU, with MAMBA_LLAMA_FORCE_REFERENCE=1, and
for shapes the kernels do not tile. The dispatchers (`norm_matmul`, ...) choose, and record the choice under
`pallas_kernels.dispatch.last_choice("fused_decode")`.

Shapes (b rows, K input width, N output width; compute dtype = the rows' dtype):
  x, residual (b, K) / (b, N) compute dtype; norm_weight (K,) any float; weights (K, N) compute dtype.
  Kernels: rows b in 1..8 (one 1-D pass per row) or 16 / 32 / 64 (tensor-core dots); K and N multiples of 16
  (blocks are powers of two that tile them exactly: Triton tensors must be powers of two, and exact tiling
  needs no masked loads).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from pallas_kernels import dispatch
from pallas_kernels.dispatch import is_pow2
from pallas_kernels.decode_attention import merge_partials

F32 = jnp.float32
PALLAS_TRITON = dispatch.PALLAS_TRITON
REFERENCE = "reference_xla"
OP = "fused_decode"

# "0" / "off" turns the fused GEMVs off (decode attention alone, for the benchmark's comparison); an integer
# sets the largest batch they serve. Default 8 (the row-by-row kernels): on the H100 (benchmarks/results/
# generate_variants.md) they beat XLA's GEMMs at batch 1 (0.918 vs 0.983 ms/step) but lose at batch 64 (1.490 vs
# 1.231), where XLA's GEMMs are compute-efficient and the launch count no longer dominates.
FUSED_DECODE_ENV = "MAMBA_LLAMA_FUSED_DECODE"
DEFAULT_MAX_BATCH = 8
DOT_ROWS = (16, 32, 64)  # row counts served by tensor-core dots (tl.dot needs >= 16 rows, Triton powers of two)

# Compiled and compared with the reference on an H100: the gpu tests of this file passed there
# (benchmarks/results/test-gpu-decode.xml), so the kernels are the default on GPUs at small batch.
GPU_VERIFIED = True


# ------------------------------------------------------------------------------------------------- references


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`models.llama.RMSNorm` on (b, K) rows: fp32 statistics, rounded to the rows' dtype."""
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(F32)).astype(x.dtype)


def norm_matmul_reference(x: jax.Array, norm_weight: jax.Array, w: jax.Array, *, eps: float) -> jax.Array:
    """(a): RMSNorm(x) @ w, (b, N) in x.dtype."""
    dt = x.dtype
    return jnp.dot(rms_norm_reference(x, norm_weight, eps), w.astype(dt))


def matmul_residual_reference(a: jax.Array, w: jax.Array, residual: jax.Array) -> jax.Array:
    """(b)/(d): residual + a @ w, (b, N) in residual.dtype."""
    dt = residual.dtype
    return residual + jnp.dot(a.astype(dt), w.astype(dt))


def norm_gate_up_reference(x: jax.Array, norm_weight: jax.Array, w_gate_up: jax.Array, *,
                           eps: float) -> jax.Array:
    """(c): SiLU(h @ W_gate) * (h @ W_up) with h = RMSNorm(x); w_gate_up = [W_gate | W_up] (K, 2·I) -> (b, I)."""
    dt = x.dtype
    inter = w_gate_up.shape[1] // 2
    gu = jnp.dot(rms_norm_reference(x, norm_weight, eps), w_gate_up.astype(dt))
    return jax.nn.silu(gu[..., :inter]) * gu[..., inter:]


def attn_combine_residual_reference(o_part: jax.Array, m: jax.Array, l: jax.Array, w: jax.Array,
                                    residual: jax.Array) -> jax.Array:
    """(b) after a split decode attention: residual + merge(o_part, m, l) @ w.

    o_part (b, S, H·d) fp32 unnormalised per-split outputs, m / l (b, S, H) fp32 per-split running max and sum
    (`pallas_kernels.decode_attention.decode_attention_partials`)."""
    return matmul_residual_reference(merge_partials(o_part, m, l, residual.dtype), w, residual)


# ---------------------------------------------------------------------------------------------------- checks


def _block(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    blk = 1
    while blk * 2 <= cap and n % (blk * 2) == 0:
        blk *= 2
    return blk


def _bad(msg: str) -> KernelError:
    return KernelError(f"fused_decode: {msg}")


def _check_rows(x: Any, name: str, width: int | None = None) -> tuple[int, int]:
    if getattr(x, "ndim", None) != 2:
        raise _bad(f"{name} must be (rows, width), got shape {getattr(x, 'shape', None)}")
    if width is not None and x.shape[1] != width:
        raise _bad(f"{name} must have {width} columns, got {x.shape}")
    return x.shape


def _check_matrix(w: Any, k: int, name: str) -> int:
    if getattr(w, "ndim", None) != 2 or w.shape[0] != k:
        raise _bad(f"{name} must be ({k}, N) (input width first), got shape {getattr(w, 'shape', None)}")
    return w.shape[1]


def kernel_shape_ok(rows: int, *widths: int) -> bool:
    """Whether the kernels tile these sizes: rows 1..8 or 16/32/64, every width a multiple of 16."""
    return (1 <= rows <= 8 or rows in DOT_ROWS) and all(w % 16 == 0 and w > 0 for w in widths)


def max_batch() -> int:
    """Largest row count the dispatchers send to the kernels (0 = kernels off), from MAMBA_LLAMA_FUSED_DECODE."""
    v = os.environ.get(FUSED_DECODE_ENV, "").strip().lower()
    if v in ("", "1", "on", "true", "yes"):
        return DEFAULT_MAX_BATCH
    if v in ("0", "off", "false", "no"):
        return 0
    try:
        return max(0, int(v))
    except ValueError:
        raise KernelError(f"{FUSED_DECODE_ENV} must be 0/off, 1/on or a batch size, got {v!r}") from None


def _kernel_allowed() -> bool:
    if dispatch.force_reference():
        return False
    if dispatch._on_gpu():
        return GPU_VERIFIED or dispatch.unverified_allowed()
    return dispatch.interpret_kernels()


def fused_decode_choice(rows: int, *widths: int) -> str:
    """Which implementation the dispatchers use for `rows` rows and these K/N widths."""
    if not _kernel_allowed() or rows > max_batch() or not kernel_shape_ok(rows, *widths):
        return REFERENCE
    return PALLAS_TRITON


def kernels_would_run(rows: int, *widths: int) -> bool:
    return fused_decode_choice(rows, *widths) == PALLAS_TRITON


# ---------------------------------------------------------------------------------------------------- kernels
# Two code paths per kernel, picked by the (static) row count:
#   rows <= 8: every row on its own as 1-D vectors; each weight block is loaded once and reused for all rows;
#     the K loop is unrolled so all of a program's loads are independent (issued together: one memory latency).
#   rows 16/32/64: (rows, BK) x (BK, BN) tensor-core dots in a fori_loop that Triton pipelines.


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


def _gemv_rows(rows: list[list[jax.Array]], w_ref: Any, col: int | jax.Array, bk: int, bn: int) -> list[jax.Array]:
    """Per row: sum_i rows[r][i] (bk,) . W[i*bk:(i+1)*bk, col:col+bn] -> (bn,) fp32. The products are summed
    elementwise over the K blocks and reduced across threads once at the end (one reduction, not one per
    block: the dependent chain is what costs at batch 1)."""
    acc = [jnp.zeros((bk, bn), F32) for _ in rows]
    for i in range(len(rows[0])):
        wk = w_ref[pl.ds(i * bk, bk), pl.ds(col, bn)].astype(F32)
        for r, blocks in enumerate(rows):
            acc[r] = acc[r] + blocks[i][:, None] * wk
    return [jnp.sum(a, axis=0) for a in acc]


def _row_scale_dot(x_ref: Any, nw_ref: Any | None, k: int, bk: int, eps: float, dt: Any) -> Any:
    """For the dot path: a function i -> the (rows, bk) block i of x, normalised when nw_ref is given."""
    if nw_ref is None:
        return lambda i: x_ref[:, pl.ds(i * bk, bk)].astype(dt)

    def ss_body(i: Any, ss: jax.Array) -> jax.Array:
        v = x_ref[:, pl.ds(i * bk, bk)].astype(F32)
        return ss + jnp.sum(v * v, axis=1)
    rows = x_ref.shape[0]
    ss = jax.lax.fori_loop(0, k // bk, ss_body, jnp.zeros((rows,), F32))
    rs = jax.lax.rsqrt(ss / k + eps)

    def block(i: Any) -> jax.Array:
        v = x_ref[:, pl.ds(i * bk, bk)].astype(F32)
        return ((v * rs[:, None]) * nw_ref[pl.ds(i * bk, bk)].astype(F32)[None, :]).astype(dt)
    return block


def _gemv_dot(block: Any, w_ref: Any, cols: list[Any], k: int, bk: int, rows: int, bn: int,
              dt: Any) -> list[jax.Array]:
    """(rows, bn) fp32 for each column slice in `cols`: sum over K blocks of block(i) @ W[i-th rows, cols]."""
    def body(i: Any, accs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        xb = block(i)
        return tuple(a + jnp.dot(xb, w_ref[pl.ds(i * bk, bk), c].astype(dt), preferred_element_type=F32)
                     for a, c in zip(accs, cols))
    init = tuple(jnp.zeros((rows, bn), F32) for _ in cols)
    return list(jax.lax.fori_loop(0, k // bk, body, init))


def _norm_matmul_kernel(x_ref, nw_ref, w_ref, o_ref, *, k: int, bk: int, bn: int, eps: float):
    j = pl.program_id(0)
    dt = o_ref.dtype
    rows = x_ref.shape[0]
    if rows in DOT_ROWS:
        cols = pl.ds(j * bn, bn)
        (acc,) = _gemv_dot(_row_scale_dot(x_ref, nw_ref, k, bk, eps, dt), w_ref, [cols], k, bk, rows, bn, dt)
        o_ref[:, cols] = acc.astype(dt)
        return
    xs = [_norm_rows_1d(x_ref, nw_ref, r, k, bk, eps, dt) for r in range(rows)]
    for r, acc in enumerate(_gemv_rows(xs, w_ref, j * bn, bk, bn)):
        o_ref[r, pl.ds(j * bn, bn)] = acc.astype(dt)


def _norm_gate_up_kernel(x_ref, nw_ref, w_ref, o_ref, *, k: int, bk: int, bn: int, inter: int, eps: float):
    j = pl.program_id(0)
    dt = o_ref.dtype
    rows = x_ref.shape[0]

    def swiglu(g: jax.Array, u: jax.Array) -> jax.Array:  # jax.nn.silu(g) * u with the XLA path's roundings
        g, u = _r(g, dt), _r(u, dt)
        s = _r(1.0 / (1.0 + jnp.exp(-g)), dt)
        return (_r(g * s, dt) * u).astype(dt)

    if rows in DOT_ROWS:
        cg, cu = pl.ds(j * bn, bn), pl.ds(inter + j * bn, bn)
        g, u = _gemv_dot(_row_scale_dot(x_ref, nw_ref, k, bk, eps, dt), w_ref, [cg, cu], k, bk, rows, bn, dt)
        o_ref[:, cg] = swiglu(g, u)
        return
    xs = [_norm_rows_1d(x_ref, nw_ref, r, k, bk, eps, dt) for r in range(rows)]
    gs = _gemv_rows(xs, w_ref, j * bn, bk, bn)
    us = _gemv_rows(xs, w_ref, inter + j * bn, bk, bn)
    for r in range(rows):
        o_ref[r, pl.ds(j * bn, bn)] = swiglu(gs[r], us[r])


def _matmul_residual_kernel(a_ref, w_ref, res_ref, o_ref, *, k: int, bk: int, bn: int):
    j = pl.program_id(0)
    dt = o_ref.dtype
    rows = a_ref.shape[0]
    if rows in DOT_ROWS:
        cols = pl.ds(j * bn, bn)
        (acc,) = _gemv_dot(_row_scale_dot(a_ref, None, k, bk, 0.0, dt), w_ref, [cols], k, bk, rows, bn, dt)
        o_ref[:, cols] = (_r(acc, dt) + res_ref[:, cols].astype(F32)).astype(dt)
        return
    xs = [[a_ref[r, pl.ds(i * bk, bk)].astype(F32) for i in range(k // bk)] for r in range(rows)]
    for r, acc in enumerate(_gemv_rows(xs, w_ref, j * bn, bk, bn)):
        cols = pl.ds(j * bn, bn)
        o_ref[r, cols] = (_r(acc, dt) + res_ref[r, cols].astype(F32)).astype(dt)


def _attn_combine_kernel(op_ref, m_ref, l_ref, w_ref, res_ref, o_ref, *, heads: int, d: int, splits: int, bn: int):
    """Every program merges the splits' partial softmaxes of every head (cheap: rows x S x H·d fp32, read from
    L2 by all programs) and multiplies the merged, rounded attention output with its columns of W_o."""
    j = pl.program_id(0)
    dt = o_ref.dtype
    rows = op_ref.shape[0]
    cols = pl.ds(j * bn, bn)
    if rows in DOT_ROWS:
        # splits <= 4 here (>= 48 programs already at 16 rows): the split axis is unrolled, all tensors 2-D
        acc = jnp.zeros((rows, bn), F32)
        for hh in range(heads):
            ms = [m_ref[:, s, hh] for s in range(splits)]
            mx = ms[0]
            for v in ms[1:]:
                mx = jnp.maximum(mx, v)
            num = jnp.zeros((rows, d), F32)
            den = jnp.zeros((rows,), F32)
            for s in range(splits):
                wt = jnp.exp(ms[s] - mx)
                den = den + wt * l_ref[:, s, hh]
                num = num + wt[:, None] * op_ref[:, s, pl.ds(hh * d, d)]
            a = (num / jnp.maximum(den, 1e-30)[:, None]).astype(dt)
            acc = acc + jnp.dot(a, w_ref[pl.ds(hh * d, d), cols].astype(dt), preferred_element_type=F32)
        o_ref[:, cols] = (_r(acc, dt) + res_ref[:, cols].astype(F32)).astype(dt)
        return
    sl = pl.ds(0, splits)
    acc = [jnp.zeros((d, bn), F32) for _ in range(rows)]  # reduced over d once, at the end (as `_gemv_rows`)
    for hh in range(heads):
        wk = w_ref[pl.ds(hh * d, d), cols].astype(F32)
        for r in range(rows):
            mh = m_ref[r, sl, hh]  # (S,)
            wt = jnp.exp(mh - jnp.max(mh))
            den = jnp.sum(wt * l_ref[r, sl, hh])
            num = jnp.sum(wt[:, None] * op_ref[r, sl, pl.ds(hh * d, d)], axis=0)  # (d,)
            a = _r(num / jnp.maximum(den, 1e-30), dt)
            acc[r] = acc[r] + a[:, None] * wk
    for r in range(rows):
        o_ref[r, cols] = (_r(jnp.sum(acc[r], axis=0), dt) + res_ref[r, cols].astype(F32)).astype(dt)


# --------------------------------------------------------------------------------------------- pallas wrappers


def pick_block_n(n: int, rows: int) -> int:
    """Output columns per program: 16 (as many programs as possible, each reading 32-byte row segments of W:
    whole DRAM sectors; the N of a tensor-core dot may be 16 too). SmolLM2 at batch 1: 60 programs for q·k·v,
    96 for gate·up, 36 for o and down."""
    del rows
    return _block(n, 16)


def _compiler_params(interpret: bool, num_warps: int, num_stages: int) -> Any:
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _check_kernel_shape(rows: int, *widths: int) -> None:
    if not kernel_shape_ok(rows, *widths):
        raise _bad(f"the Pallas kernels need 1..8 or {DOT_ROWS} rows and widths that are multiples of 16, got "
                   f"{rows} rows and widths {widths}; use the *_reference functions (or the dispatchers)")


def _call(kernel: Any, out: jax.ShapeDtypeStruct, grid: int, interpret: bool, num_warps: int, name: str,
          *args: Any) -> jax.Array:
    rows = out.shape[0]
    return pl.pallas_call(kernel, grid=(grid,), out_shape=out, interpret=interpret, name=name,
                          compiler_params=_compiler_params(interpret, num_warps, 3 if rows in DOT_ROWS else 1),
                          )(*args)


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "interpret", "num_warps"))
def norm_matmul_pallas(x: jax.Array, norm_weight: jax.Array, w: jax.Array, *, eps: float, block_n: int = 0,
                       interpret: bool = False, num_warps: int = 4) -> jax.Array:
    """(a) as one launch; same result as `norm_matmul_reference` up to summation order."""
    b, k = _check_rows(x, "x")
    n = _check_matrix(w, k, "w")
    _check_kernel_shape(b, k, n)
    bn = block_n or pick_block_n(n, b)
    bk = _block(k, 128 if b in DOT_ROWS else 64)
    kern = functools.partial(_norm_matmul_kernel, k=k, bk=bk, bn=bn, eps=float(eps))
    return _call(kern, jax.ShapeDtypeStruct((b, n), x.dtype), n // bn, interpret, num_warps, "norm_matmul",
                 x, norm_weight, w.astype(x.dtype))


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "interpret", "num_warps"))
def norm_gate_up_pallas(x: jax.Array, norm_weight: jax.Array, w_gate_up: jax.Array, *, eps: float,
                        block_n: int = 0, interpret: bool = False, num_warps: int = 4) -> jax.Array:
    """(c) as one launch; same result as `norm_gate_up_reference` up to summation order."""
    b, k = _check_rows(x, "x")
    n2 = _check_matrix(w_gate_up, k, "w_gate_up")
    inter = n2 // 2
    _check_kernel_shape(b, k, inter)
    bn = block_n or pick_block_n(inter, b)
    bk = _block(k, 128 if b in DOT_ROWS else 64)
    kern = functools.partial(_norm_gate_up_kernel, k=k, bk=bk, bn=bn, inter=inter, eps=float(eps))
    return _call(kern, jax.ShapeDtypeStruct((b, inter), x.dtype), inter // bn, interpret, num_warps,
                 "norm_gate_up", x, norm_weight, w_gate_up.astype(x.dtype))


@functools.partial(jax.jit, static_argnames=("block_n", "interpret", "num_warps"))
def matmul_residual_pallas(a: jax.Array, w: jax.Array, residual: jax.Array, *, block_n: int = 0,
                           interpret: bool = False, num_warps: int = 4) -> jax.Array:
    """(b)/(d) as one launch; same result as `matmul_residual_reference` up to summation order."""
    b, k = _check_rows(a, "a")
    n = _check_matrix(w, k, "w")
    _check_rows(residual, "residual", n)
    if residual.shape[0] != b:
        raise _bad(f"residual must have a's {b} rows, got {residual.shape}")
    _check_kernel_shape(b, k, n)
    bn = block_n or pick_block_n(n, b)
    bk = _block(k, 128)
    kern = functools.partial(_matmul_residual_kernel, k=k, bk=bk, bn=bn)
    dt = residual.dtype
    return _call(kern, jax.ShapeDtypeStruct((b, n), dt), n // bn, interpret, num_warps, "matmul_residual",
                 a.astype(dt), w.astype(dt), residual)


@functools.partial(jax.jit, static_argnames=("block_n", "interpret", "num_warps"))
def attn_combine_residual_pallas(o_part: jax.Array, m: jax.Array, l: jax.Array, w: jax.Array,
                                 residual: jax.Array, *, block_n: int = 0, interpret: bool = False,
                                 num_warps: int = 4) -> jax.Array:
    """(b) after a split decode attention, as one launch (the merge of the splits happens in its prologue)."""
    check_combine_args(o_part, m, l, w, residual, kernel=True)
    b, splits, hd = o_part.shape
    heads = m.shape[2]
    n = w.shape[1]
    bn = block_n or pick_block_n(n, b)
    kern = functools.partial(_attn_combine_kernel, heads=heads, d=hd // heads, splits=splits, bn=bn)
    dt = residual.dtype
    return _call(kern, jax.ShapeDtypeStruct((b, n), dt), n // bn, interpret, num_warps, "attn_combine_residual",
                 o_part.astype(F32), m.astype(F32), l.astype(F32), w.astype(dt), residual)


MAX_COMBINE_SPLITS = 16  # partials every program of the combine kernel reads: rows x S x H·d fp32


def combine_max_splits(rows: int) -> int:
    """The most attention splits `attn_combine_residual`'s kernel merges at this row count (the dot path
    unrolls the split axis)."""
    return 4 if rows in DOT_ROWS else MAX_COMBINE_SPLITS


def check_combine_args(o_part: Any, m: Any, l: Any, w: Any, residual: Any, *, kernel: bool) -> None:
    if getattr(o_part, "ndim", None) != 3:
        raise _bad(f"o_part must be (rows, splits, heads·head_dim), got {getattr(o_part, 'shape', None)}")
    b, s, hd = o_part.shape
    if getattr(m, "ndim", None) != 3 or m.shape[:2] != (b, s) or hd % m.shape[2] or l.shape != m.shape:
        raise _bad(f"m and l must both be (rows, splits, heads) = ({b}, {s}, heads dividing {hd}), got "
                   f"{getattr(m, 'shape', None)} and {getattr(l, 'shape', None)}")
    n = _check_matrix(w, hd, "w")
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


def norm_matmul(x: jax.Array, norm_weight: jax.Array, w: jax.Array, *, eps: float) -> jax.Array:
    """(a): the kernel on GPU at small batch (see GPU_VERIFIED), the reference elsewhere."""
    b, k = _check_rows(x, "x")
    n = _check_matrix(w, k, "w")
    if _record(fused_decode_choice(b, k, n)) == PALLAS_TRITON:
        return norm_matmul_pallas(x, norm_weight, w, eps=eps, interpret=_interpret())
    return norm_matmul_reference(x, norm_weight, w, eps=eps)


def norm_gate_up(x: jax.Array, norm_weight: jax.Array, w_gate_up: jax.Array, *, eps: float) -> jax.Array:
    """(c): the kernel on GPU at small batch (see GPU_VERIFIED), the reference elsewhere."""
    b, k = _check_rows(x, "x")
    n2 = _check_matrix(w_gate_up, k, "w_gate_up")
    if n2 % 2:
        raise _bad(f"w_gate_up must hold [W_gate | W_up] (an even number of columns), got {w_gate_up.shape}")
    if _record(fused_decode_choice(b, k, n2 // 2)) == PALLAS_TRITON:
        return norm_gate_up_pallas(x, norm_weight, w_gate_up, eps=eps, interpret=_interpret())
    return norm_gate_up_reference(x, norm_weight, w_gate_up, eps=eps)


def matmul_residual(a: jax.Array, w: jax.Array, residual: jax.Array) -> jax.Array:
    """(b)/(d): the kernel on GPU at small batch (see GPU_VERIFIED), the reference elsewhere."""
    b, k = _check_rows(a, "a")
    n = _check_matrix(w, k, "w")
    if _record(fused_decode_choice(b, k, n)) == PALLAS_TRITON:
        return matmul_residual_pallas(a, w, residual, interpret=_interpret())
    return matmul_residual_reference(a, w, residual)


def attn_combine_residual(o_part: jax.Array, m: jax.Array, l: jax.Array, w: jax.Array,
                          residual: jax.Array) -> jax.Array:
    """(b) after a split decode attention: the kernel where it tiles, else the reference."""
    check_combine_args(o_part, m, l, w, residual, kernel=False)
    choice = fused_decode_choice(o_part.shape[0], o_part.shape[2], w.shape[1])
    if choice == PALLAS_TRITON:
        try:
            check_combine_args(o_part, m, l, w, residual, kernel=True)
        except KernelError:
            choice = REFERENCE
    if _record(choice) == PALLAS_TRITON:
        return attn_combine_residual_pallas(o_part, m, l, w, residual, interpret=_interpret())
    return attn_combine_residual_reference(o_part, m, l, w, residual)
