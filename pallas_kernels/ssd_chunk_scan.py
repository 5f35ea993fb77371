"""Chunked SSD (Mamba2) scan as Pallas kernels (Triton lowering on GPU; interpret mode on CPU).

Reference: `mamba_llama_jax.ops.ssd.ssd_chunked` (same signature, same maths; see that module for the legend and
the recurrence). This file adds `interpret`, `block_p` and `num_warps` keywords only.

Structure. Both kernels run one program per (batch row, head[, block of head dims]) and walk the chunks of the
sequence *inside* the program with the state (p, n) held on chip, so the inter-chunk state passing costs no extra
launch and no round trip of the states through memory:

* forward, per chunk: dt' = softplus(dt + dt_bias) and cum = cumsum(dt'·A) in fp32; intra-chunk output
  y = ((C Bᵀ) ∘ L ∘ dt') x on tensor cores, L_ij = exp(cum_i − cum_j) on the causal, same-document triangle;
  inter-chunk correction y += exp(cum_i) · C S_prev; then S ← exp(cum_last) S + Σ_j exp(cum_last − cum_j) dt'_j
  x_j B_jᵀ. Only the chunk-boundary states are written (for the backward) and only when a gradient is wanted.
* backward, walking the chunks in reverse with G = ∂L/∂S_end on chip: recomputes the chunk from the saved boundary
  state, produces dx, dB, dC, d dt (through softplus, inside the kernel), per-position pieces of dA and dD, and the
  gradient of the initial state. The per-head dB/dC are summed over the heads of a group outside the kernel.

Only non-positive numbers are exponentiated (masked entries become −inf before `exp`); padded positions (l not a
multiple of the chunk) get dt' = 0, so they neither decay nor feed the state. The result does not depend on the
chunk size except through round-off, so `chunk_size` is a tiling choice here (64 suits the GPU's registers best).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import check_ssd_args, doc_index, ssd_kernel_operands
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32


def _softplus(v: jax.Array) -> jax.Array:
    # max(v, 0) + log1p(exp(-|v|)): the exponent is never positive, so no overflow.
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _dot(a: jax.Array, b: jax.Array, ca: int = 1, cb: int = 0) -> jax.Array:
    """a·b contracting a's dim `ca` with b's dim `cb`, fp32 accumulation (tensor cores for bf16 operands)."""
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=F32)


# ------------------------------------------------------------------------------------------------------ forward


def _fwd_kernel(x_ref, dt_ref, A_ref, bias_ref, D_ref, B_ref, C_ref, doc_ref, init_ref,  # inputs
                y_ref, st_ref,  # outputs
                *, Q: int, P: int, l: int, nc: int, rep: int, softplus: bool, has_seg: bool, save: bool):
    bi = pl.program_id(0)
    hi = pl.program_id(1)
    p0 = pl.program_id(2) * P
    gi = hi // rep
    cd = x_ref.dtype  # operand dtype of the matrix products
    A = A_ref[hi]
    bias = bias_ref[hi]
    Dh = D_ref[hi]
    t = jax.lax.broadcasted_iota(jnp.int32, (Q,), 0)
    ti = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    tj = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    causal = ti >= tj

    def body(c, carry):
        S, doc_prev = carry
        q0 = c * Q
        rows = pl.ds(q0, Q)
        dtv = dt_ref[bi, rows, hi].astype(F32) + bias
        dtp = _softplus(dtv) if softplus else dtv
        dtp = jnp.where(q0 + t < l, dtp, 0.0)
        cum = jnp.cumsum(dtp * A)
        cum_last = jnp.sum(jnp.where(t == Q - 1, cum, 0.0))
        x = x_ref[bi, rows, hi, pl.ds(p0, P)]
        Bc = B_ref[bi, rows, gi, :]
        Cc = C_ref[bi, rows, gi, :]
        if has_seg:
            d = doc_ref[bi, rows]
            doc_last = jnp.max(d)
            mask = causal & (d[:, None] == d[None, :])
            e_in = jnp.where(d == doc_prev, jnp.exp(cum), 0.0)
            w = jnp.where(d == doc_last, jnp.exp(cum_last - cum), 0.0)
            alpha = jnp.where(doc_last == doc_prev, jnp.exp(cum_last), 0.0)
        else:
            doc_last = doc_prev
            mask = causal
            e_in = jnp.exp(cum)
            w = jnp.exp(cum_last - cum)
            alpha = jnp.exp(cum_last)
        if save:
            st_ref[bi, c, hi, pl.ds(p0, P), :] = S
        CB = _dot(Cc, Bc, 1, 1)
        L = jnp.exp(jnp.where(mask, cum[:, None] - cum[None, :], -jnp.inf))
        M = CB * L * dtp[None, :]
        y = _dot(M.astype(cd), x)
        y = y + e_in[:, None] * _dot(Cc, S.astype(cd), 1, 1)
        y = y + Dh * x.astype(F32)
        y_ref[bi, rows, hi, pl.ds(p0, P)] = y.astype(y_ref.dtype)
        xw = (x.astype(F32) * (w * dtp)[:, None]).astype(cd)
        S = alpha * S + _dot(xw, Bc, 0, 0)
        return S, doc_last

    S0 = init_ref[bi, hi, pl.ds(p0, P), :]
    S, _ = jax.lax.fori_loop(0, nc, body, (S0, jnp.int32(0)))
    st_ref[bi, st_ref.shape[1] - 1, hi, pl.ds(p0, P), :] = S


# ----------------------------------------------------------------------------------------------------- backward


def _bwd_kernel(x_ref, dt_ref, A_ref, bias_ref, D_ref, B_ref, C_ref, doc_ref, st_ref, dy_ref, dfin_ref,  # in
                dx_ref, dB_ref, dC_ref, ddt_ref, dadt_ref, dD_ref, dinit_ref,  # out
                *, Q: int, P: int, l: int, nc: int, rep: int, softplus: bool, has_seg: bool):
    bi = pl.program_id(0)
    hi = pl.program_id(1)
    p0 = pl.program_id(2) * P
    gi = hi // rep
    cd = x_ref.dtype
    A = A_ref[hi]
    bias = bias_ref[hi]
    Dh = D_ref[hi]
    t = jax.lax.broadcasted_iota(jnp.int32, (Q,), 0)
    ti = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    tj = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    causal = ti >= tj
    hp = (bi, hi, pl.program_id(2))  # partial sums over head-dim blocks go to their own slot

    def body(k, G):
        c = nc - 1 - k
        q0 = c * Q
        rows = pl.ds(q0, Q)
        dtv = dt_ref[bi, rows, hi].astype(F32) + bias
        dtp = _softplus(dtv) if softplus else dtv
        valid = q0 + t < l
        dtp = jnp.where(valid, dtp, 0.0)
        cum = jnp.cumsum(dtp * A)
        cum_last = jnp.sum(jnp.where(t == Q - 1, cum, 0.0))
        x = x_ref[bi, rows, hi, pl.ds(p0, P)]
        dy = dy_ref[bi, rows, hi, pl.ds(p0, P)].astype(cd)
        Bc = B_ref[bi, rows, gi, :]
        Cc = C_ref[bi, rows, gi, :]
        S_prev = st_ref[bi, c, hi, pl.ds(p0, P), :]
        S_end = st_ref[bi, c + 1, hi, pl.ds(p0, P), :]
        if has_seg:
            d = doc_ref[bi, rows]
            doc_prev = doc_ref[bi, jnp.maximum(q0 - 1, 0)]
            doc_last = jnp.max(d)
            mask = causal & (d[:, None] == d[None, :])
            e_in = jnp.where(d == doc_prev, jnp.exp(cum), 0.0)
            w = jnp.where(d == doc_last, jnp.exp(cum_last - cum), 0.0)
            alpha = jnp.where(doc_last == doc_prev, jnp.exp(cum_last), 0.0)
        else:
            mask = causal
            e_in = jnp.exp(cum)
            w = jnp.exp(cum_last - cum)
            alpha = jnp.exp(cum_last)
        xf = x.astype(F32)
        dyf = dy.astype(F32)
        # intra-chunk part
        CB = _dot(Cc, Bc, 1, 1)
        L = jnp.exp(jnp.where(mask, cum[:, None] - cum[None, :], -jnp.inf))
        CBL = CB * L
        M = CBL * dtp[None, :]
        dM = _dot(dy, x, 1, 1)  # dM_ij = dy_i · x_j
        W = dM * M
        dcum = jnp.sum(W, axis=1) - jnp.sum(W, axis=0)
        ddtp = jnp.sum(dM * CBL, axis=0)
        dx = _dot(M.astype(cd), dy, 0, 0)
        dML = dM * L
        dC = _dot((dML * dtp[None, :]).astype(cd), Bc)
        dB = _dot(dML.astype(cd), Cc, 0, 0) * dtp[:, None]
        # correction from the previous chunks' state
        y_off = e_in[:, None] * _dot(Cc, S_prev.astype(cd), 1, 1)
        dcum = dcum + jnp.sum(dyf * y_off, axis=1)
        dC = dC + e_in[:, None] * _dot(dy, S_prev.astype(cd))
        dS_prev = _dot((dyf * e_in[:, None]).astype(cd), Cc, 0, 0)
        # this chunk's contribution to the state it hands on
        Gc = G.astype(cd)
        GB = _dot(Bc, Gc, 1, 1)  # row j: G B_j
        xGB = jnp.sum(xf * GB, axis=1)
        wd = w * dtp
        dx = dx + wd[:, None] * GB
        ddtp = ddtp + w * xGB
        dcum = dcum - wd * xGB
        dcum = dcum + jnp.where(t == Q - 1, jnp.sum(G * S_end), 0.0)
        dB = dB + wd[:, None] * _dot(x, Gc)
        dS_prev = dS_prev + alpha * G
        # through cum = cumsum(dt'·A): d(dt'·A)_k = Σ_{m≥k} dcum_m
        da = jnp.sum(dcum) - jnp.cumsum(dcum) + dcum
        ddtp = ddtp + A * da
        if softplus:
            ddtp = ddtp * jax.nn.sigmoid(dtv)
        ddtp = jnp.where(valid, ddtp, 0.0)
        dx = dx + Dh * dyf
        dx_ref[bi, rows, hi, pl.ds(p0, P)] = dx.astype(dx_ref.dtype)
        dB_ref[hp[0], rows, hp[1], hp[2], :] = dB
        dC_ref[hp[0], rows, hp[1], hp[2], :] = dC
        ddt_ref[hp[0], rows, hp[1], hp[2]] = ddtp
        dadt_ref[hp[0], rows, hp[1], hp[2]] = da * dtp
        dD_ref[hp[0], rows, hp[1], hp[2]] = jnp.sum(dyf * xf, axis=1)
        return dS_prev

    G = jax.lax.fori_loop(0, nc, body, dfin_ref[bi, hi, pl.ds(p0, P), :])
    dinit_ref[bi, hi, pl.ds(p0, P), :] = G


# ---------------------------------------------------------------------------------------------------- wrappers


def _pad_l(a: jax.Array, lp: int, mode: str = "constant") -> jax.Array:
    l = a.shape[1]
    if l == lp:
        return a
    widths = [(0, 0)] * a.ndim
    widths[1] = (0, lp - l)
    return jnp.pad(a, widths, mode=mode)


def _defaults(num_warps: int | None, Q: int) -> int:
    return num_warps if num_warps is not None else (4 if Q <= 64 else 8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _ssd_core(x, dt, A, B, C, D, bias, init, doc, cfg):
    return _ssd_fwd_impl(x, dt, A, B, C, D, bias, init, doc, cfg, save=False)[:2]


def _ssd_fwd_impl(x, dt, A, B, C, D, bias, init, doc, cfg, *, save: bool):
    Q, P, softplus, has_seg, interpret, num_warps, num_stages = cfg[:7]
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = -(-l // Q)
    lp = nc * Q
    xs, dts, Bs, Cs = (_pad_l(a, lp) for a in (x, dt, B, C))
    docs = _pad_l(doc, lp, "edge")
    ns = nc + 1 if save else 1
    kern = functools.partial(_fwd_kernel, Q=Q, P=P, l=l, nc=nc, rep=h // g, softplus=softplus, has_seg=has_seg,
                             save=save)
    y, st = triton_call(
        kern,
        grid=(b, h, p // P),
        out_shape=(jax.ShapeDtypeStruct((b, lp, h, p), x.dtype), jax.ShapeDtypeStruct((b, ns, h, p, n), F32)),
        interpret=interpret, num_warps=_defaults(num_warps, Q), num_stages=num_stages,
        name="ssd_chunk_scan_fwd",
    )(xs, dts, A, bias, D, Bs, Cs, docs, init)
    y = y[:, :l] if lp != l else y
    return y, st[:, -1], st


def _ssd_core_fwd(x, dt, A, B, C, D, bias, init, doc, cfg):
    y, fin, st = _ssd_fwd_impl(x, dt, A, B, C, D, bias, init, doc, cfg, save=True)
    return (y, fin), (x, dt, A, B, C, D, bias, doc, st)


def _ssd_core_bwd(cfg, res, cts):
    x, dt, A, B, C, D, bias, doc, st = res
    dy, dfin = cts
    Q, _, softplus, has_seg, interpret, num_warps, num_stages, P, bwd_warps = cfg
    # the backward's own head-dim block: smaller blocks give more programs (the grid is only b*h otherwise),
    # paid for by dB/dC/d dt partial sums over the blocks, written per block and summed here
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = st.shape[1] - 1
    lp = nc * Q
    xs, dts, Bs, Cs, dys = (_pad_l(a, lp) for a in (x, dt, B, C, dy))
    docs = _pad_l(doc, lp, "edge")
    npb = p // P
    kern = functools.partial(_bwd_kernel, Q=Q, P=P, l=l, nc=nc, rep=h // g, softplus=softplus, has_seg=has_seg)
    outs = triton_call(
        kern,
        grid=(b, h, npb),
        out_shape=(
            jax.ShapeDtypeStruct((b, lp, h, p), x.dtype),  # dx
            jax.ShapeDtypeStruct((b, lp, h, npb, n), F32),  # dB per head
            jax.ShapeDtypeStruct((b, lp, h, npb, n), F32),  # dC per head
            jax.ShapeDtypeStruct((b, lp, h, npb), F32),  # d dt
            jax.ShapeDtypeStruct((b, lp, h, npb), F32),  # da·dt' (summed: dA)
            jax.ShapeDtypeStruct((b, lp, h, npb), F32),  # dy·x (summed: dD)
            jax.ShapeDtypeStruct((b, h, p, n), F32),  # d initial state
        ),
        interpret=interpret, num_warps=_defaults(bwd_warps, Q), num_stages=num_stages,
        name="ssd_chunk_scan_bwd",
    )(xs, dts, A, bias, D, Bs, Cs, docs, st, dys, dfin.astype(F32))
    dx, dBh, dCh, ddt, dadt, dDp, dinit = outs
    dx = dx[:, :l]
    dBh = dBh[:, :l].sum(3).reshape(b, l, g, h // g, n).sum(3)
    dCh = dCh[:, :l].sum(3).reshape(b, l, g, h // g, n).sum(3)
    ddt = ddt[:, :l].sum(3)
    dA = dadt.sum((0, 1, 3))
    dD = dDp.sum((0, 1, 3))
    dbias = ddt.sum((0, 1))
    return (dx, ddt.astype(dt.dtype), dA.astype(A.dtype), dBh.astype(B.dtype), dCh.astype(C.dtype),
            dD.astype(D.dtype), dbias.astype(bias.dtype), dinit, None)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def ssd_chunk_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                   D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
                   initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                   chunk_size: int = 64, interpret: bool = False, block_p: int | None = None,
                   num_warps: int | None = None, num_stages: int = 2, bwd_block_p: int | None = None,
                   bwd_num_warps: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Pallas chunked SSD: returns (y (b,l,h,p) in x.dtype, final state (b,h,p,n) fp32); differentiable in every
    array argument. Shapes are checked by `pallas_kernels.dispatch.check_ssd_args`; call through
    `pallas_kernels.dispatch.ssd` unless you want this kernel unconditionally."""
    check_ssd_args(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=initial_state, segment_ids=segment_ids,
                   chunk_size=chunk_size, block_p=block_p)
    check_ssd_args(x, dt, A, B, C, chunk_size=chunk_size, block_p=bwd_block_p)
    b, l, h, p = x.shape
    B, C, A32, D32, bias, init = ssd_kernel_operands(x, A, B, C, D, dt_bias, initial_state)
    has_seg = segment_ids is not None
    doc = doc_index(segment_ids, b, l)
    P = block_p or p
    cfg = (chunk_size, P, bool(dt_softplus), has_seg, bool(interpret), num_warps, num_stages, bwd_block_p or p,
           bwd_num_warps)
    y, fin = _ssd_core(x, dt, A32, B, C, D32, bias, init, doc, cfg)
    return y, fin
