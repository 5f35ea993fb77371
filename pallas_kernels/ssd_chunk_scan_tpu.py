"""Chunked SSD (Mamba2) scan for TPU: Pallas kernels lowered through Mosaic (`jax.experimental.pallas.tpu`).

Same signature, maths and result as `mamba_llama_jax.ops.ssd.ssd_chunked` (legend and recurrence there) and the
same algorithm as the GPU kernel `pallas_kernels.ssd_chunk_scan`; this file adds `interpret` only. Status:
correctness-only. It equals the reference in Pallas's TPU interpret mode on CPU, and libtpu's Mosaic compiler
accepts it for TPU v4, v5e, v5p and v6e (ahead-of-time compiles on a CPU host, see the tests), but it has never
run nor been timed on a TPU, so the dispatcher picks it only with MAMBA_LLAMA_UNVERIFIED_KERNELS=1.

Why the layout differs from the GPU kernel. Mosaic blocks must have their last two dimensions divisible by
(8, 128) or equal to the array's, and a block is DMA'd to VMEM by the pipeline that the grid describes. So:

* the wrapper moves heads in front of the sequence: x, dy, y (b, h, l, p) and B, C (b, g, l, n); a (chunk, p)
  or (chunk, n) block then has full-size last dimensions, whatever p, n and the head count are;
* per-position scalars (dt, document starts) travel as rows (.., chunks, 1, chunk): a (1, chunk) block equals
  the array's last two dimensions, again for any chunk size (a (chunk, 1) column would pad to 128 lanes);
* the grid is (batch, head, chunk) with the chunk axis last and "arbitrary": the (p, n) fp32 state lives in a
  VMEM scratch carried from one chunk to the next (the backward walks the chunks in reverse with the state
  gradient in VMEM), while batch and head are "parallel" (megacore may split them);
* Mosaic has no cumsum, so cumulative sums are masked row reductions of a (chunk, chunk) broadcast (exact fp32,
  on the VPU), and a row becomes a column by a reduction over the diagonal; the only matrix transposes are 2-D
  fp32 ones before a matrix product, the pattern Pallas's own TPU attention backward uses.

Per chunk (forward): dt' = softplus(dt + dt_bias), masked to 0 past the sequence end; cum = cumsum(dt'·A) in
fp32; y = ((C Bᵀ) ∘ L ∘ dt') x on the MXU with L_ij = exp(cum_i − cum_j) on the causal same-document triangle;
y += exp(cum_i)·C S_prev for positions still in the document that entered the chunk; S ← exp(cum_last) S +
Σ_j exp(cum_last − cum_j) dt'_j x_j B_jᵀ. Every exponent is ≤ 0: differences of the cumsum are clamped at 0
(they can round a hair above), and the sums of dt'·A are never positive. The backward recomputes each chunk
from the chunk-boundary state saved by the forward; B/C gradients come per head and are summed over each
group's heads outside the kernel, and dA, dD are accumulated per (batch, head) inside it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mamba_llama_jax.errors import KernelError
from pallas_kernels.dispatch import check_ssd_args, is_pow2, ssd_kernel_operands

F32 = jnp.float32
TPU_CHUNK = 128  # the MXU's edge on v5e (v6e's is 256): the (chunk x chunk) products fill it
_MAX_L = 1 << 24  # document counts are carried in fp32 inside the kernel: exact below 2**24


# ------------------------------------------------------------------------------------------------- arguments


def check_tpu_args(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                   D: jax.Array | None = None, dt_bias: jax.Array | None = None,
                   initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                   chunk_size: int = TPU_CHUNK) -> None:
    """Raises KernelError for arguments the TPU kernel cannot take (shapes only: nothing is traced)."""
    check_ssd_args(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=initial_state, segment_ids=segment_ids,
                   chunk_size=max(chunk_size, 1), kernel=False)
    _, l, _, p = x.shape
    n = B.shape[3]
    if not (is_pow2(chunk_size) and 16 <= chunk_size <= 256):
        raise KernelError(f"ssd (tpu): chunk_size must be a power of two in [16, 256], got {chunk_size} "
                          f"(128 or 256 fill the MXU)")
    if p % 16 or n % 16:
        # (16, 128) is the bf16 VMEM tile: head_dim and state size become second-minor dimensions of the
        # transposed operands, so they must fill whole sublane groups
        raise KernelError(f"ssd (tpu): head_dim ({p}) and state size ({n}) must be multiples of 16 for the TPU "
                          "kernel; use mamba_llama_jax.ops.ssd.ssd_chunked (or pallas_kernels.dispatch.ssd)")
    for name, v in (("x", x), ("B", B), ("C", C)):
        if v.dtype not in (jnp.float32, jnp.bfloat16):
            raise KernelError(f"ssd (tpu): {name} must be float32 or bfloat16 on TPU (no float16 MXU path), "
                              f"got {v.dtype}")
    if l >= _MAX_L:
        raise KernelError(f"ssd (tpu): sequence length {l} must be below {_MAX_L}")


# -------------------------------------------------------------------------------------------- in-kernel helpers


def _softplus(v: jax.Array) -> jax.Array:
    # max(v, 0) + log1p(exp(-|v|)): the exponent is never positive
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _sigmoid(v: jax.Array) -> jax.Array:
    e = jnp.exp(-jnp.abs(v))  # exponent <= 0 on both branches
    return jnp.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _mm(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """a·b (or a·bᵀ) on the MXU with fp32 accumulation. fp32 operands ask for HIGHEST precision, so the fp32
    path matches the fp32 reference whatever number of bf16 passes Mosaic's default would take."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    prec = jax.lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


class _Tri:
    """Index grids of a (Q, Q) tile and the row/column conversions built on them."""

    def __init__(self, Q: int):
        self.Q = Q
        self.i = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
        self.j = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
        self.lane = jax.lax.broadcasted_iota(jnp.int32, (1, Q), 1)
        self.sub = jax.lax.broadcasted_iota(jnp.int32, (Q, 1), 0)
        self.diag = self.i == self.j
        self.causal = self.i >= self.j

    def cumsum_col(self, row: jax.Array) -> jax.Array:
        """(1,Q) row -> (Q,1) column of inclusive prefix sums."""
        return jnp.sum(jnp.where(self.causal, row, 0.0), axis=1, keepdims=True)

    def suffix_row(self, col: jax.Array) -> jax.Array:
        """(Q,1) column -> (1,Q) row of inclusive suffix sums: out_k = Σ_{m≥k} col_m."""
        return jnp.sum(jnp.where(self.causal, col, 0.0), axis=0, keepdims=True)

    def to_row(self, col: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(self.diag, col, 0.0), axis=0, keepdims=True)

    def to_col(self, row: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(self.diag, row, 0.0), axis=1, keepdims=True)

    def last(self, row: jax.Array) -> jax.Array:
        """(1,Q) -> (1,1): the entry at position Q-1 (a masked sum: no unaligned lane slice)."""
        return jnp.sum(jnp.where(self.lane == self.Q - 1, row, 0.0), axis=1, keepdims=True)


def _chunk_terms(tri: _Tri, dt_row, starts_row, c, *, A, bias, l: int, softplus: bool):
    """The chunk's decays and document masks, shared by forward and backward.

    Returns dtv (dt + bias, row), dtp (dt', row), dtp_c (column), cum_c, cum_r (cumsum of dt'·A as column and
    row), cum_last (1,1), L (Q,Q) masked decays, e_in (column: weight of the entering state at each position),
    w (column: weight of each position's input in the state handed on) and alpha (1,1: decay of the entering
    state across the whole chunk, 0 when a document starts inside it)."""
    Q = tri.Q
    dtv = dt_row + bias
    dtp = _softplus(dtv) if softplus else dtv
    dtp = jnp.where(c * Q + tri.lane < l, dtp, 0.0)  # padding: no decay, no input
    cum_c = tri.cumsum_col(dtp * A)
    cum_r = tri.to_row(cum_c)  # the same numbers as cum_c, so cum_i - cum_i is exactly 0
    cum_last = tri.last(cum_r)
    dtp_c = tri.to_col(dtp)
    decay_in = jnp.exp(cum_c)
    decay_out = jnp.exp(jnp.minimum(cum_last - cum_c, 0.0))
    decay_all = jnp.exp(cum_last)
    if starts_row is None:
        mask = tri.causal
        e_in, w, alpha = decay_in, decay_out, decay_all
    else:
        # rd: documents begun inside the chunk up to and including each position (small exact integers)
        rd_c = tri.cumsum_col(starts_row)
        rd_r = tri.to_row(rd_c)
        rd_last = tri.last(rd_r)
        mask = tri.causal & (rd_c == rd_r)
        e_in = jnp.where(rd_c == 0.0, decay_in, 0.0)
        w = jnp.where(rd_c == rd_last, decay_out, 0.0)
        alpha = jnp.where(rd_last == 0.0, decay_all, 0.0)
    L = jnp.where(mask, jnp.exp(jnp.minimum(cum_c - cum_r, 0.0)), 0.0)
    return dtv, dtp, dtp_c, cum_c, cum_r, cum_last, L, e_in, w, alpha


# ------------------------------------------------------------------------------------------------------ forward


def _fwd_kernel(*refs, Q: int, l: int, nc: int, softplus: bool, has_seg: bool, save: bool):
    refs = list(refs)
    A_ref, bias_ref, D_ref, x_ref, dt_ref, B_ref, C_ref = refs[:7]
    starts_ref = refs[7] if has_seg else None
    init_ref, y_ref, fin_ref = refs[7 + has_seg:10 + has_seg]
    st_ref = refs[10 + has_seg] if save else None
    S_scr = refs[-1]
    hi = pl.program_id(1)
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        S_scr[...] = init_ref[...]

    S = S_scr[...]
    if save:
        st_ref[...] = S  # the state entering this chunk, for the backward
    tri = _Tri(Q)
    _, dtp, dtp_c, _, _, _, L, e_in, w, alpha = _chunk_terms(
        tri, dt_ref[...], None if starts_ref is None else starts_ref[...], c, A=A_ref[hi], bias=bias_ref[hi],
        l=l, softplus=softplus)
    x = x_ref[...]
    Bc = B_ref[...]
    Cc = C_ref[...]
    cd = x.dtype  # operand dtype of the matrix products
    M = _mm(Cc, Bc, trans_b=True) * L * dtp
    y = _mm(M.astype(cd), x)
    y = y + e_in * _mm(Cc, S.astype(cd), trans_b=True)
    y = y + D_ref[hi] * x.astype(F32)
    y_ref[...] = y.astype(y_ref.dtype)
    xw = x.astype(F32) * (w * dtp_c)
    S_new = alpha * S + _mm(xw.T.astype(cd), Bc)
    S_scr[...] = S_new

    @pl.when(c == nc - 1)
    def _():
        fin_ref[...] = S_new


# ----------------------------------------------------------------------------------------------------- backward


def _bwd_kernel(*refs, Q: int, l: int, nc: int, softplus: bool, has_seg: bool):
    refs = list(refs)
    A_ref, bias_ref, D_ref, x_ref, dt_ref, B_ref, C_ref = refs[:7]
    starts_ref = refs[7] if has_seg else None
    k = 7 + has_seg
    st_ref, fin_ref, dy_ref, dfin_ref = refs[k:k + 4]
    dx_ref, dB_ref, dC_ref, ddt_ref, dad_ref, dinit_ref = refs[k + 4:k + 10]
    G_scr, Snext_scr = refs[k + 10:k + 12]
    hi = pl.program_id(1)
    step = pl.program_id(2)
    c = nc - 1 - step  # the chunks are walked in reverse

    @pl.when(step == 0)
    def _():
        G_scr[...] = dfin_ref[...]
        Snext_scr[...] = fin_ref[...]
        dad_ref[...] = jnp.zeros_like(dad_ref)

    G = G_scr[...]  # ∂loss/∂(state leaving this chunk)
    S_end = Snext_scr[...]  # the state leaving this chunk (the previous step's entering state)
    S_prev = st_ref[...]
    A = A_ref[hi]
    tri = _Tri(Q)
    dtv, dtp, dtp_c, _, _, _, L, e_in, w, alpha = _chunk_terms(
        tri, dt_ref[...], None if starts_ref is None else starts_ref[...], c, A=A, bias=bias_ref[hi], l=l,
        softplus=softplus)
    x = x_ref[...]
    dy = dy_ref[...]
    Bc = B_ref[...]
    Cc = C_ref[...]
    cd = x.dtype
    xf = x.astype(F32)
    dyf = dy.astype(F32)
    # intra-chunk part
    CBL = _mm(Cc, Bc, trans_b=True) * L
    M = CBL * dtp
    dM = _mm(dy, x, trans_b=True)  # dM_ij = dy_i · x_j
    W = dM * M
    dcum = jnp.sum(W, axis=1, keepdims=True) - tri.to_col(jnp.sum(W, axis=0, keepdims=True))
    ddtp = jnp.sum(dM * CBL, axis=0, keepdims=True)
    dx = _mm(M.T.astype(cd), dy)
    dML = dM * L
    dC = _mm((dML * dtp).astype(cd), Bc)
    dB = _mm(dML.T.astype(cd), Cc) * dtp_c
    # the entering state's read-out
    Sp = S_prev.astype(cd)
    y_off = e_in * _mm(Cc, Sp, trans_b=True)
    dcum = dcum + jnp.sum(dyf * y_off, axis=1, keepdims=True)
    dC = dC + e_in * _mm(dy, Sp)
    dS_prev = _mm((dyf * e_in).T.astype(cd), Cc)
    # this chunk's contribution to the state it hands on
    Gc = G.astype(cd)
    GB = _mm(Bc, Gc, trans_b=True)  # row j: G B_j
    xGB = jnp.sum(xf * GB, axis=1, keepdims=True)
    wd = w * dtp_c
    dx = dx + wd * GB
    ddtp = ddtp + tri.to_row(w * xGB)
    dcum = dcum - wd * xGB
    dcum = dcum + jnp.where(tri.sub == Q - 1, jnp.sum(G * S_end, keepdims=True), 0.0)
    dB = dB + wd * _mm(x, Gc)
    dS_prev = dS_prev + alpha * G
    # through cum = cumsum(dt'·A): ∂(dt'·A)_k = Σ_{m≥k} ∂cum_m
    da = tri.suffix_row(dcum)
    ddtp = ddtp + A * da
    if softplus:
        ddtp = ddtp * _sigmoid(dtv)
    ddtp = jnp.where(c * Q + tri.lane < l, ddtp, 0.0)
    dx = dx + D_ref[hi] * dyf
    dx_ref[...] = dx.astype(dx_ref.dtype)
    dB_ref[...] = dB
    dC_ref[...] = dC
    ddt_ref[...] = ddtp
    # dA and dD of this (batch, head): partial sums in lanes 0 and 1 of row 0
    sub8 = jax.lax.broadcasted_iota(jnp.int32, dad_ref.shape, 0)
    lane8 = jax.lax.broadcasted_iota(jnp.int32, dad_ref.shape, 1)
    dA_c = jnp.sum(da * dtp, keepdims=True)
    dD_c = jnp.sum(dyf * xf, keepdims=True)
    dad_ref[...] += jnp.where(sub8 == 0, jnp.where(lane8 == 0, dA_c, jnp.where(lane8 == 1, dD_c, 0.0)), 0.0)
    G_scr[...] = dS_prev
    Snext_scr[...] = S_prev

    @pl.when(step == nc - 1)
    def _():
        dinit_ref[...] = dS_prev


# ---------------------------------------------------------------------------------------------------- wrappers


def _pad_l(a: jax.Array, lp: int) -> jax.Array:
    if a.shape[1] == lp:
        return a
    widths = [(0, 0)] * a.ndim
    widths[1] = (0, lp - a.shape[1])
    return jnp.pad(a, widths)


def _heads_first(a: jax.Array, lp: int) -> jax.Array:
    """(b, l, h, d) -> (b, h, lp, d), zero-padded along the sequence."""
    return jnp.swapaxes(_pad_l(a, lp), 1, 2)


def _rows(a: jax.Array, Q: int, lp: int) -> jax.Array:
    """(b, l, h) -> (b, h, chunks, 1, Q) fp32 rows."""
    b, _, h = a.shape
    return jnp.swapaxes(_pad_l(a.astype(F32), lp), 1, 2).reshape(b, h, lp // Q, 1, Q)


def _starts(segment_ids: jax.Array, Q: int, lp: int) -> jax.Array:
    """(b, chunks, 1, Q) fp32: 1 where a new document begins (never at position 0, never in the padding)."""
    s = segment_ids
    st = jnp.concatenate([jnp.zeros((s.shape[0], 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    return _pad_l(st.astype(F32), lp).reshape(s.shape[0], lp // Q, 1, Q)


def _interpret_arg(interpret):
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def _specs(b, h, g, nc, Q, p, n, has_seg, reverse: bool):
    """BlockSpecs of the inputs both kernels share: scalars in SMEM, then x, dt rows, B, C[, starts]."""
    rep = h // g
    ch = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    specs = [smem, smem, smem,
             pl.BlockSpec((None, None, Q, p), lambda bi, hi, c: (bi, hi, ch(c), 0)),
             pl.BlockSpec((None, None, None, 1, Q), lambda bi, hi, c: (bi, hi, ch(c), 0, 0)),
             pl.BlockSpec((None, None, Q, n), lambda bi, hi, c: (bi, hi // rep, ch(c), 0)),
             pl.BlockSpec((None, None, Q, n), lambda bi, hi, c: (bi, hi // rep, ch(c), 0))]
    if has_seg:
        specs.append(pl.BlockSpec((None, None, 1, Q), lambda bi, hi, c: (bi, ch(c), 0, 0)))
    return specs, ch


def _state_spec(p, n):
    return pl.BlockSpec((None, None, p, n), lambda bi, hi, c: (bi, hi, 0, 0))


_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _fwd_call(xt, dtr, A, bias, D, Bt, Ct, starts, init, cfg, *, l: int, save: bool):
    Q, softplus, has_seg, interpret = cfg
    b, h, lp, p = xt.shape
    g, n = Bt.shape[1], Bt.shape[3]
    nc = lp // Q
    in_specs, _ = _specs(b, h, g, nc, Q, p, n, has_seg, reverse=False)
    in_specs.append(_state_spec(p, n))
    out_shape = [jax.ShapeDtypeStruct((b, h, lp, p), xt.dtype), jax.ShapeDtypeStruct((b, h, p, n), F32)]
    out_specs = [pl.BlockSpec((None, None, Q, p), lambda bi, hi, c: (bi, hi, c, 0)), _state_spec(p, n)]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, p, n), F32))
        out_specs.append(pl.BlockSpec((None, None, None, p, n), lambda bi, hi, c: (bi, hi, c, 0, 0)))
    args = [A, bias, D, xt, dtr, Bt, Ct] + ([starts] if has_seg else []) + [init]
    kern = functools.partial(_fwd_kernel, Q=Q, l=l, nc=nc, softplus=softplus, has_seg=has_seg, save=save)
    outs = pl.pallas_call(
        kern, grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((p, n), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=_interpret_arg(interpret), name="ssd_chunk_scan_tpu_fwd",
    )(*args)
    return outs


def _prepare(x, dt, B, C, segment_ids, Q):
    b, l, h, p = x.shape
    lp = -(-l // Q) * Q
    xt = _heads_first(x, lp)
    Bt, Ct = _heads_first(B, lp), _heads_first(C, lp)
    dtr = _rows(dt, Q, lp)
    starts = None if segment_ids is None else _starts(segment_ids, Q, lp)
    return xt, dtr, Bt, Ct, starts, lp


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _ssd_core(x, dt, A, B, C, D, bias, init, segment_ids, cfg):
    xt, dtr, Bt, Ct, starts, _ = _prepare(x, dt, B, C, segment_ids, cfg[0])
    y, fin = _fwd_call(xt, dtr, A, bias, D, Bt, Ct, starts, init, cfg, l=x.shape[1], save=False)
    return jnp.swapaxes(y, 1, 2)[:, :x.shape[1]], fin


def _ssd_core_fwd(x, dt, A, B, C, D, bias, init, segment_ids, cfg):
    xt, dtr, Bt, Ct, starts, _ = _prepare(x, dt, B, C, segment_ids, cfg[0])
    y, fin, st = _fwd_call(xt, dtr, A, bias, D, Bt, Ct, starts, init, cfg, l=x.shape[1], save=True)
    res = (xt, dtr, A, Bt, Ct, D, bias, starts, st, fin)
    return (jnp.swapaxes(y, 1, 2)[:, :x.shape[1]], fin), res


def _ssd_core_bwd(cfg, res, cts):
    xt, dtr, A, Bt, Ct, D, bias, starts, st, fin = res
    Q, softplus, has_seg, interpret = cfg
    dy, dfin = cts
    b, h, lp, p = xt.shape
    g, n = Bt.shape[1], Bt.shape[3]
    nc = lp // Q
    l = dy.shape[1]
    dyt = _heads_first(dy.astype(xt.dtype), lp)
    in_specs, ch = _specs(b, h, g, nc, Q, p, n, has_seg, reverse=True)
    in_specs += [pl.BlockSpec((None, None, None, p, n), lambda bi, hi, c: (bi, hi, ch(c), 0, 0)),  # states
                 _state_spec(p, n),  # final state
                 pl.BlockSpec((None, None, Q, p), lambda bi, hi, c: (bi, hi, ch(c), 0)),  # dy
                 _state_spec(p, n)]  # d final state
    seq = lambda d: pl.BlockSpec((None, None, Q, d), lambda bi, hi, c: (bi, hi, ch(c), 0))
    out_specs = [seq(p), seq(n), seq(n),
                 pl.BlockSpec((None, None, None, 1, Q), lambda bi, hi, c: (bi, hi, ch(c), 0, 0)),
                 pl.BlockSpec((None, None, 8, 128), lambda bi, hi, c: (bi, hi, 0, 0)),
                 _state_spec(p, n)]
    out_shape = [jax.ShapeDtypeStruct((b, h, lp, p), xt.dtype),  # dx
                 jax.ShapeDtypeStruct((b, h, lp, n), F32),  # dB per head
                 jax.ShapeDtypeStruct((b, h, lp, n), F32),  # dC per head
                 jax.ShapeDtypeStruct((b, h, nc, 1, Q), F32),  # d dt
                 jax.ShapeDtypeStruct((b, h, 8, 128), F32),  # [0, 0]: dA, [0, 1]: dD partials
                 jax.ShapeDtypeStruct((b, h, p, n), F32)]  # d initial state
    args = [A, bias, D, xt, dtr, Bt, Ct] + ([starts] if has_seg else []) + [st, fin, dyt, dfin.astype(F32)]
    kern = functools.partial(_bwd_kernel, Q=Q, l=l, nc=nc, softplus=softplus, has_seg=has_seg)
    dxt, dBh, dCh, ddt, dad, dinit = pl.pallas_call(
        kern, grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((p, n), F32), pltpu.VMEM((p, n), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=_interpret_arg(interpret), name="ssd_chunk_scan_tpu_bwd",
    )(*args)
    dx = jnp.swapaxes(dxt, 1, 2)[:, :l]
    per_group = lambda a: jnp.swapaxes(a, 1, 2)[:, :l].reshape(b, l, g, h // g, n).sum(3).astype(xt.dtype)
    ddt = jnp.swapaxes(ddt.reshape(b, h, lp), 1, 2)[:, :l]
    dA = dad[:, :, 0, 0].sum(0)
    dD = dad[:, :, 0, 1].sum(0)
    dbias = ddt.sum((0, 1))
    # every primal here is fp32 except x, B, C (x's dtype); the caller's casts map gradients back
    return (dx, ddt, dA, per_group(dBh), per_group(dCh), dD, dbias, dinit, None)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def ssd_chunk_scan_tpu(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                       D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
                       initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                       chunk_size: int = TPU_CHUNK,
                       interpret: bool | pltpu.InterpretParams = False) -> tuple[jax.Array, jax.Array]:
    """Mosaic (TPU) chunked SSD: returns (y (b,l,h,p) in x.dtype, final state (b,h,p,n) fp32), differentiable
    in every array argument. `interpret=True` (or a `pltpu.InterpretParams`) runs Pallas's TPU interpret mode,
    which works on CPU. Call through `pallas_kernels.dispatch.ssd` unless you want this kernel unconditionally."""
    check_tpu_args(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=initial_state, segment_ids=segment_ids,
                   chunk_size=chunk_size)
    B, C, A32, D32, bias, init = ssd_kernel_operands(x, A, B, C, D, dt_bias, initial_state)
    cfg = (chunk_size, bool(dt_softplus), segment_ids is not None, interpret)
    # dt enters as fp32 (the kernel reads it so); the cast's transpose returns d dt in dt's own dtype
    return _ssd_core(x, dt.astype(F32), A32, B, C, D32, bias, init, segment_ids, cfg)
