"""Chunked SSD (Mamba2) scan forward as a Mosaic GPU (Hopper) Pallas kernel; backward through the Triton kernel.

Reference: `mamba_llama_jax.ops.ssd.ssd_chunked`; the Triton-lowered sibling is `pallas_kernels.ssd_chunk_scan`
(same signature bar its tuning keywords, same maths). This file answers the issue's "Triton lowering and/or
Mosaic GPU on Hopper — measure which wins" with the Mosaic GPU side of the forward.

GPU_VERIFIED: its `-m gpu` test passed on an H200 (2026-12-04, jax 0.11.2: benchmarks/results/test-gpu-mgpu.xml):
compiled for sm_90, forward and gradients equal to the Triton kernel's. On CPU it equals the reference in Mosaic
GPU interpret mode, and its whole lowering runs through `jax.export(..., platforms=("cuda",))`. Its forward beat
the Triton kernel's by 1.25-1.39x (benchmarks/results/scan_mgpu.md), so `dispatch.ssd` takes it on Hopper.

Structure.

* XLA pre-pass (one fused elementwise + cumsum launch, ~16 B per position and head written): dt' =
  softplus(dt + dt_bias) (dt + dt_bias without softplus), zero on the positions that pad l up to a multiple of the
  chunk; cum = the within-chunk cumsum of dt'·A; and the per-position factors the kernel would otherwise need a
  cumsum and 1-D scalar broadcasts for: e_in = exp(cum) (decay from the chunk start), wd = exp(cum_last − cum)·dt'
  (weight of x_j B_jᵀ in the state handed on). Laid out (b, h, chunks, rows, Q) fp32 so one TMA per chunk brings
  them in. Mosaic GPU (jax 0.11/0.12) has no lowering for cumsum, hence the pre-pass. With segment ids the
  pre-pass also zeroes e_in / wd across document starts and adds a row with the document number (fp32, exact).
* Kernel: `plgpu.kernel`, grid (b, h), one warpgroup per program; the chunks are walked in a `fori_loop` with the
  (p, n) fp32 state S held in registers (the wgmma accumulator layout) the whole time. x, B, C of a chunk and its
  vector rows come in by TMA into swizzled shared memory (128-byte swizzle when head_dim, state >= 64), double
  buffered (chunk c+1 is fetched while chunk c computes). Lane lowering semantics, explicit WGMMA row/column
  layouts for the per-position vectors. Per chunk, four wgmma products (bf16/f16 operands, fp32 accumulators):
      CB = C Bᵀ                (Q×n · n×Q)     and   Y0 = C S_prevᵀ (Q×n · n×p, S_prev in x's dtype in SMEM)
      M  = CB ∘ L ∘ dt'_j,     L_ij = exp(cum_i − cum_j) on the causal (same-document) triangle, −inf → 0 elsewhere
      y  = M x + e_in ∘ Y0 + D x
      S  ← alpha S + (x ∘ wd)ᵀ B,   alpha = exp(cum_last) = e_in at the last row
  and y goes out by TMA. Only non-positive numbers are exponentiated (the masked differences become −inf first).
* `plgpu.kernel` binds `mpmd_map` (named `ssd_chunk_scan_mgpu_fwd`), not `pallas_call`: jaxpr checks look for that.
  `interpret=True` passes `plgpu.InterpretGPUParams()` (what `plgpu.force_gpu_interpret_mode` sets) to the kernel.
* Backward: `jax.custom_vjp` whose backward is the VJP of the Triton kernel (`ssd_chunk_scan`), i.e. the Triton
  forward is re-run to save its chunk-boundary states, then the Triton backward. Only the forward is Mosaic GPU.

Limits (each raises `KernelError` naming it): chunk_size 64 or 128 and head_dim a multiple of 64 (wgmma's M is
64 rows per warpgroup); state size a power of two >= 16; x must be bfloat16 or float16 on the GPU (tf32 wgmma
has no transposed operands, which the x Bᵀ and M x products need). float32 x is accepted in interpret mode only,
where it checks the maths. segment_ids are supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from pallas_kernels.dispatch import check_ssd_args, doc_index, ssd_kernel_operands

F32 = jnp.float32
GPU_VERIFIED = True  # compiled and equal to the Triton kernel on an H200 (test-gpu-mgpu.xml)
KERNEL_NAME = "ssd_chunk_scan_mgpu_fwd"
_ROW_CUM, _ROW_DTP, _ROW_EIN, _ROW_WD, _ROW_DOC = range(5)


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


def interpret_available() -> bool:
    """Whether this JAX has Mosaic GPU interpret mode (runs the kernel on a CPU)."""
    try:
        plgpu = _plgpu()
    except ImportError:
        return False
    return hasattr(plgpu, "force_gpu_interpret_mode") and hasattr(plgpu, "InterpretGPUParams")


SMEM_LIMIT = 227 * 1024  # per block on H100/H200


def smem_bytes(Q: int, p: int, n: int, itemsize: int, rows: int) -> int:
    """Shared memory of one program (the scratch list in `_mgpu_forward`), barriers aside."""
    tiles = 2 * Q * p + 4 * Q * n + Q * Q + Q * p + p * n + Q * p  # x, B, C (double buffered), M, x∘wd, S, y
    return tiles * itemsize + 2 * rows * Q * 4 + p * n * 4


def check_mgpu_args(x: jax.Array, B: jax.Array, chunk_size: int, interpret: bool) -> None:
    """The Mosaic GPU kernel's own limits, on top of `check_ssd_args` (raises KernelError)."""
    p, n = x.shape[3], B.shape[3]
    if chunk_size not in (64, 128):
        raise KernelError(f"ssd (mosaic gpu): chunk_size must be 64 or 128 (wgmma tiles of 64 rows), got "
                          f"{chunk_size}")
    if p % 64:
        raise KernelError(f"ssd (mosaic gpu): head_dim ({p}) must be a multiple of 64 (the state update is a "
                          "wgmma with head_dim rows); use pallas_kernels.ssd_chunk_scan (Triton) for it")
    if n > 256:
        raise KernelError(f"ssd (mosaic gpu): state size ({n}) must be <= 256 (a wgmma's N)")
    need = smem_bytes(chunk_size, p, n, jnp.dtype(x.dtype).itemsize, 5)
    if need > SMEM_LIMIT and x.dtype != F32:  # float32 runs in interpret mode only, where shared memory is free
        raise KernelError(f"ssd (mosaic gpu): chunk {chunk_size}, head_dim {p}, state {n} need {need} bytes of "
                          f"shared memory (> {SMEM_LIMIT} on Hopper); use chunk_size=64")
    if x.dtype == F32 and not interpret:
        raise KernelError("ssd (mosaic gpu): x must be bfloat16 or float16 on the GPU (tf32 wgmma has no "
                          "transposed operands); cast x/B/C, or use pallas_kernels.ssd_chunk_scan (Triton)")


# ---------------------------------------------------------------------------------------------------- pre-pass


def _chunk_vectors(dt, A, bias, doc, *, Q: int, nc: int, softplus: bool, has_seg: bool) -> jax.Array:
    """(b, h, nc, rows, Q) fp32: cum, dt', e_in, wd (and the document number with segments); see the module doc."""
    b, l, h = dt.shape
    lp = nc * Q
    dtv = dt.astype(F32) + bias[None, None, :]
    dtp = jax.nn.softplus(dtv) if softplus else dtv
    dtp = jnp.pad(dtp, ((0, 0), (0, lp - l), (0, 0)))  # padded positions: dt' = 0, no decay, no input
    dtp = dtp.transpose(0, 2, 1).reshape(b, h, nc, Q)
    cum = jnp.cumsum(dtp * A[None, :, None, None], axis=-1)
    cum_last = cum[..., -1:]
    e_in = jnp.exp(cum)
    w = jnp.exp(cum_last - cum)
    rows = [cum, dtp]
    if has_seg:
        d = jnp.pad(doc, ((0, 0), (0, lp - l)), mode="edge").reshape(b, 1, nc, Q)
        prev = jnp.concatenate([jnp.zeros((b, 1, 1, 1), d.dtype), d[:, :, :-1, -1:]], axis=2)  # doc before chunk
        e_in = jnp.where(d == prev, e_in, 0.0)
        w = jnp.where(d == d[..., -1:], w, 0.0)
        rows += [e_in, w * dtp, jnp.broadcast_to(d.astype(F32), (b, h, nc, Q))]
    else:
        rows += [e_in, w * dtp]
    return jnp.stack(rows, axis=3)


# ------------------------------------------------------------------------------------------------------ kernel


def _swizzle(cd, p: int, n: int, Q: int) -> int:
    """One swizzle (bytes) for every operand tile: a wgmma needs its two operands' swizzles equal."""
    return min(128, jnp.dtype(cd).itemsize * min(p, n, Q))


def _kernel_body(x_ref, B_ref, C_ref, v_ref, D_ref, init_ref,  # GMEM inputs
                 y_ref, fin_ref,  # GMEM outputs
                 x_s, B_s, C_s, v_s, M_s, xw_s, Sc_s, y_s, S_s, bars,  # scratch
                 *, Q: int, nc: int, rep: int, has_seg: bool):
    plgpu = _plgpu()
    bi = jax.lax.axis_index("b")
    hi = jax.lax.axis_index("h")
    gi = hi // rep
    cd = x_s.dtype
    x_bar, B_bar, C_bar, v_bar, s_bar = bars
    WG = plgpu.Layout.WGMMA
    ROW, COL = WG.reduce(1), WG.reduce(0)  # a vector along a tile's rows / along its columns

    def fetch(c, slot):
        rows = pl.ds(c * Q, Q)
        plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi], x_s.at[slot], x_bar.at[slot])
        plgpu.copy_gmem_to_smem(B_ref.at[bi, rows, gi], B_s.at[slot], B_bar.at[slot])
        plgpu.copy_gmem_to_smem(C_ref.at[bi, rows, gi], C_s.at[slot], C_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, c], v_s.at[slot], v_bar.at[slot])

    fetch(0, 0)
    plgpu.copy_gmem_to_smem(init_ref.at[bi, hi], S_s, s_bar)
    plgpu.barrier_wait(s_bar)
    S0 = plgpu.load(S_s, layout=WG)
    Sc_s[...] = S0.astype(cd)
    plgpu.commit_smem()
    Dh = D_ref[hi]
    ti = plgpu.broadcasted_iota(jnp.int32, (Q, Q), 0, layout=WG)
    tj = plgpu.broadcasted_iota(jnp.int32, (Q, Q), 1, layout=WG)
    causal = ti >= tj

    def body(c, S):
        slot = jax.lax.rem(c, 2)

        @pl.when(c + 1 < nc)
        def _prefetch():
            fetch(c + 1, 1 - slot)

        for bar in (x_bar, B_bar, C_bar, v_bar):
            plgpu.barrier_wait(bar.at[slot])
        xs, Bs, Cs, vs = x_s.at[slot], B_s.at[slot], C_s.at[slot], v_s.at[slot]

        def cb_and_carry_in(acc_cb, acc_in):
            plgpu.wgmma(acc_cb, Cs, Bs.T)
            plgpu.wgmma(acc_in, Cs, Sc_s.T)
            return acc_cb[...], acc_in[...]

        CB, Y0 = pl.run_scoped(cb_and_carry_in, plgpu.ACC((Q, Q), F32), plgpu.ACC((Q, x_s.shape[-1]), F32))
        cum_i = jax.lax.broadcast_in_dim(plgpu.load(vs.at[_ROW_CUM], layout=ROW), (Q, Q), (0,))
        cum_j = plgpu.layout_cast(jax.lax.broadcast_in_dim(plgpu.load(vs.at[_ROW_CUM], layout=COL), (Q, Q), (1,)), WG)
        dtp_j = plgpu.layout_cast(jax.lax.broadcast_in_dim(plgpu.load(vs.at[_ROW_DTP], layout=COL), (Q, Q), (1,)), WG)
        mask = causal
        if has_seg:
            doc_i = jax.lax.broadcast_in_dim(plgpu.load(vs.at[_ROW_DOC], layout=ROW), (Q, Q), (0,))
            doc_j = plgpu.layout_cast(
                jax.lax.broadcast_in_dim(plgpu.load(vs.at[_ROW_DOC], layout=COL), (Q, Q), (1,)), WG)
            mask = mask & (doc_i == doc_j)
        L = jnp.exp(jnp.where(mask, cum_i - cum_j, -jnp.inf))
        M_s[...] = (CB * L * dtp_j).astype(cd)
        x = xs[...].astype(F32)
        P = x.shape[1]
        e_in = jax.lax.broadcast_in_dim(plgpu.load(vs.at[_ROW_EIN], layout=ROW), (Q, P), (0,))
        y0 = e_in * Y0 + Dh * x
        plgpu.commit_smem()

        def intra(acc):
            plgpu.wgmma(acc, M_s, xs)
            return acc[...]

        # (a zero-started accumulator plus y0 in registers, not ACC.init(y0): run_state's functional wgmma has
        # no Mosaic GPU interpret rule)
        y = y0 + pl.run_scoped(intra, plgpu.ACC((Q, P), F32))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's y has left y_s
        y_s[...] = y.astype(y_s.dtype)
        wd = jax.lax.broadcast_in_dim(plgpu.load(vs.at[_ROW_WD], layout=ROW), (Q, P), (0,))
        xw_s[...] = (x * wd).astype(cd)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s, y_ref.at[bi, pl.ds(c * Q, Q), hi])
        alpha = vs[_ROW_EIN, Q - 1]

        def state(acc):
            plgpu.wgmma(acc, xw_s.T, Bs)
            return acc[...]

        S = alpha * S + pl.run_scoped(state, plgpu.ACC(S.shape, F32))
        Sc_s[...] = S.astype(cd)  # x's dtype copy for the next chunk's C S_prevᵀ
        plgpu.commit_smem()
        return S

    S = jax.lax.fori_loop(0, nc, body, S0)
    S_s[...] = S
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(S_s, fin_ref.at[bi, hi])
    plgpu.wait_smem_to_gmem(0)


def _mgpu_forward(x, dt, A, B, C, D, bias, init, doc, cfg):
    Q, softplus, has_seg, interpret = cfg
    plgpu = _plgpu()
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = -(-l // Q)
    lp = nc * Q
    vec = _chunk_vectors(dt, A, bias, doc, Q=Q, nc=nc, softplus=softplus, has_seg=has_seg)
    if lp != l:
        pad = lambda a: jnp.pad(a, [(0, 0), (0, lp - l)] + [(0, 0)] * (a.ndim - 2))
        x, B, C = pad(x), pad(B), pad(C)
    cd = x.dtype
    swz = _swizzle(cd, p, n, Q)
    tiled = (plgpu.TilingTransform((8, swz // jnp.dtype(cd).itemsize)), plgpu.SwizzleTransform(swz))
    swz32 = min(128, 4 * n)
    tiled32 = (plgpu.TilingTransform((8, swz32 // 4)), plgpu.SwizzleTransform(swz32))
    S, Bar = plgpu.SMEM, plgpu.Barrier
    scratch = [
        S((2, Q, p), cd, transforms=tiled),  # x, double buffered
        S((2, Q, n), cd, transforms=tiled),  # B
        S((2, Q, n), cd, transforms=tiled),  # C
        S((2, vec.shape[3], Q), F32),  # cum, dt', e_in, wd (, doc)
        S((Q, Q), cd, transforms=tiled),  # M = CB ∘ L ∘ dt'
        S((Q, p), cd, transforms=tiled),  # x ∘ wd
        S((p, n), cd, transforms=tiled),  # S_prev in x's dtype
        S((Q, p), x.dtype, transforms=tiled),  # y on its way out
        S((p, n), F32, transforms=tiled32),  # initial / final state
        (Bar(num_barriers=2), Bar(num_barriers=2), Bar(num_barriers=2), Bar(num_barriers=2), Bar()),
    ]
    kw = {}
    if interpret:
        kw["interpret"] = plgpu.InterpretGPUParams()
    body = functools.partial(_kernel_body, Q=Q, nc=nc, rep=h // g, has_seg=has_seg)

    def ssd_chunk_scan_mgpu_fwd(*refs):  # named: the kernel's name in profiles and the jaxpr
        return body(*refs)

    kern = plgpu.kernel(
        ssd_chunk_scan_mgpu_fwd,
        out_type=(jax.ShapeDtypeStruct((b, lp, h, p), x.dtype), jax.ShapeDtypeStruct((b, h, p, n), F32)),
        scratch_types=scratch,
        grid=(b, h),
        grid_names=("b", "h"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **kw,
    )
    y, fin = kern(x, B, C, vec, D, init)
    return (y[:, :l] if lp != l else y), fin


# ---------------------------------------------------------------------------------------------- autodiff glue


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _ssd_core(x, dt, A, B, C, D, bias, init, doc, cfg):
    return _mgpu_forward(x, dt, A, B, C, D, bias, init, doc, cfg)


def _core_fwd(x, dt, A, B, C, D, bias, init, doc, cfg):
    return _mgpu_forward(x, dt, A, B, C, D, bias, init, doc, cfg), (x, dt, A, B, C, D, bias, init, doc)


def _core_bwd(cfg, res, cts):
    from pallas_kernels.ssd_chunk_scan import ssd_chunk_scan  # the Triton kernel's fwd + bwd
    Q, softplus, has_seg, interpret = cfg
    x, dt, A, B, C, D, bias, init, doc = res
    seg = doc if has_seg else None  # document numbers change exactly where the segment ids do

    def triton(x, dt, A, B, C, D, bias, init):
        return ssd_chunk_scan(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=softplus, initial_state=init,
                              segment_ids=seg, chunk_size=Q, interpret=interpret)

    _, vjp = jax.vjp(triton, x, dt, A, B, C, D, bias, init)
    return (*vjp(cts), None)


_ssd_core.defvjp(_core_fwd, _core_bwd)


def ssd_chunk_scan_mgpu(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                        D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
                        initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                        chunk_size: int = 64, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD, forward by the Mosaic GPU kernel: (y (b,l,h,p) in x.dtype, final state (b,h,p,n) fp32).

    Differentiable in every array argument through a `jax.custom_vjp` whose backward is the Triton kernel's
    (`pallas_kernels.ssd_chunk_scan`: its forward re-run to save the chunk states, then its backward); only the
    forward is Mosaic GPU. `interpret=True` runs the kernel in Mosaic GPU interpret mode (CPU; jax >= 0.11) and
    the Triton backward in Pallas interpret mode. Limits: `check_ssd_args` and `check_mgpu_args` (KernelError).
    """
    check_ssd_args(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=initial_state, segment_ids=segment_ids,
                   chunk_size=chunk_size)
    check_mgpu_args(x, B, chunk_size, interpret)
    if interpret and not interpret_available():
        raise KernelError("ssd (mosaic gpu): this JAX has no Mosaic GPU interpret mode "
                          "(plgpu.force_gpu_interpret_mode); run on a Hopper GPU or upgrade jax")
    b, l, h, p = x.shape
    B, C, A32, D32, bias, init = ssd_kernel_operands(x, A, B, C, D, dt_bias, initial_state)
    doc = doc_index(segment_ids, b, l)
    cfg = (chunk_size, bool(dt_softplus), segment_ids is not None, bool(interpret))
    return _ssd_core(x, dt, A32, B, C, D32, bias, init, doc, cfg)
