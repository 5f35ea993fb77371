"""Mamba1 selective scan as Pallas kernels, forward and backward (Triton lowering on GPU; interpret mode on CPU).

Reference: `mamba_llama_jax.ops.scan.selective_scan` (same signature, same maths; see that module for the legend
and the recurrence). This file adds tiling keywords only: `chunk_size`, `block_d`, `num_warps`, `prefetch` and
their `bwd_` twins, `num_stages`, `interpret`.

Layout. The channel axis d is viewed as (g, rep) — group of B/C, channel inside the group — so a program's block of
channels is a (G, R) tile: either R = rep and G whole groups, or G = 1 and R channels of one group. B_t and C_t
then load as (G, n) rows and broadcast over R, and the B/C gradients reduce over R with a plain sum: no gathers.
rep and n are padded to sizes Triton can tile (padded channels have u = 0, padded state entries B = C = A = 0, so
both stay exactly zero). The grid is (batch, group blocks, channel blocks of a group).

Forward. Each program walks the sequence with its fp32 state (G, R, n) on chip, T = `chunk_size` steps per loop
iteration, unrolled. Inside: dt' = softplus(dt + dt_bias), decay exp(dt'·A) (A <= 0 and dt' >= 0, so the exponent
is non-positive; with delta_softplus=False that is the caller's contract, as in the reference), D skip,
y · silu(z). Where a packed document starts the decay is multiplied by 0. The steps' loads do not depend on the
state, but every y store passes through a layout change (a shared-memory round trip behind a CTA barrier) and no
load is moved across a barrier: so the loads of `prefetch` steps are issued first, then those steps computed.
With a gradient wanted the state entering every chunk is written out, (b, l/T + 1, d, n) fp32: at T = 16 that is
one fp32 per channel and position.

Backward. Walks the chunks in reverse with G = ∂L/∂h (the carry from the future) on chip; per chunk it recomputes
the T states from the saved boundary (kept as T + 1 separate values of the unrolled code, so nothing is indexed
dynamically), then steps back through them, reloading each step's inputs (`bwd_prefetch` steps at a time) rather
than keeping them live: dz, du, d dt (through softplus), dB and dC per position as (G, n) partials per channel
block (summed over the blocks of a group outside), dA, dD, d dt_bias accumulated on chip over the whole sequence
(one write per program, summed over the batch outside), and finally ∂L/∂h_0.

Padded positions (l not a multiple of T) get dt' = 0 and u = 0: decay 1, no input, so the state passes through
unchanged and the final state is the one at l.

Defaults (block 32 channels, 4 warps, T 16, prefetch 4 / 2) come from compiling for sm_90 off the device (TTIR from
this lowering, Triton 3.9 + ptxas): forward 96 registers, backward 168 (~250 with segments or a padded tail), no
spills; larger blocks or prefetch groups spill in the backward. Timings are for the device benchmark to settle.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.ssd import segment_starts
from pallas_kernels.dispatch import is_pow2
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32
# True since `pytest -m gpu tests/pallas/test_selective_scan.py` passed on the H100 (4/4, gradients included;
# benchmarks/results/test-gpu-kernels.xml): GPUs pick the kernel by default.
GPU_VERIFIED = True

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
DEFAULT_CHUNK = 16  # a (d, n) fp32 state saved every 16 steps: at n = 16, one fp32 per channel and position
DEFAULT_BLOCK_D = 32
DEFAULT_WARPS = 4
DEFAULT_PREFETCH, DEFAULT_BWD_PREFETCH = 4, 2  # steps whose loads are issued together (more: more registers)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _pow2_divisor(v: int, cap: int) -> int:
    """The largest power of two <= cap dividing v."""
    p = 1
    while p * 2 <= cap and v % (p * 2) == 0:
        p *= 2
    return p


# ------------------------------------------------------------------------------------------------- argument checks


def check_selective_scan_args(u: Any, delta: Any, A: Any, B: Any, C: Any, *, D: Any = None, z: Any = None,
                              delta_bias: Any = None, initial_state: Any = None, segment_ids: Any = None,
                              kernel: bool = True, chunk_size: int = DEFAULT_CHUNK, block_d: int | None = None,
                              bwd_block_d: int | None = None, num_warps: int | None = None,
                              bwd_num_warps: int | None = None) -> None:
    """Raises KernelError naming the first bad argument; looks at shapes and dtypes only, before anything is
    traced. `kernel=False` checks only what the reference needs too."""
    def bad(msg: str) -> KernelError:
        return KernelError(f"selective_scan: {msg}")

    if getattr(u, "ndim", None) != 3:
        raise bad(f"u must be (batch, length, channels), got shape {getattr(u, 'shape', None)}")
    b, l, d = u.shape
    if min(b, l, d) < 1:
        raise bad(f"u has an empty axis: {u.shape}")
    if getattr(delta, "shape", None) != (b, l, d):
        raise bad(f"delta must be (batch, length, channels) = {(b, l, d)}, got {getattr(delta, 'shape', None)}")
    if getattr(A, "ndim", None) != 2 or A.shape[0] != d or A.shape[1] < 1:
        raise bad(f"A must be (channels, state) with channels = {d}, got {getattr(A, 'shape', None)}")
    n = A.shape[1]
    if getattr(B, "ndim", None) != 4 or B.shape[:2] != (b, l) or B.shape[3] != n:
        raise bad(f"B must be (batch, length, groups, state) with batch, length = {(b, l)} and state = {n} (A's), "
                  f"got {getattr(B, 'shape', None)}")
    if getattr(C, "shape", None) != B.shape:
        raise bad(f"C must have B's shape {B.shape}, got {getattr(C, 'shape', None)}")
    g = B.shape[2]
    if g < 1 or d % g:
        raise bad(f"the groups of B/C ({g}) must divide the channels ({d})")
    for name, v, shape in (("D", D, (d,)), ("delta_bias", delta_bias, (d,)), ("z", z, (b, l, d)),
                           ("initial_state", initial_state, (b, d, n))):
        if v is not None and getattr(v, "shape", None) != shape:
            raise bad(f"{name} must have shape {shape}, got {getattr(v, 'shape', None)}")
    if segment_ids is not None:
        if getattr(segment_ids, "shape", None) != (b, l):
            raise bad(f"segment_ids must be (batch, length) = {(b, l)}, got {getattr(segment_ids, 'shape', None)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise bad(f"segment_ids must be integers, got {segment_ids.dtype}")
    for name, v in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if v is not None and v.dtype not in _FLOATS:
            raise bad(f"{name} must be float32, bfloat16 or float16, got {v.dtype}")
    if not kernel:
        return
    if not isinstance(chunk_size, int) or not 1 <= chunk_size <= 64:
        raise bad(f"chunk_size must be an integer in [1, 64] (steps unrolled per loop iteration), got {chunk_size}")
    for name, v in (("block_d", block_d), ("bwd_block_d", bwd_block_d)):
        if v is not None and not (isinstance(v, int) and is_pow2(v) and v <= 1024):
            raise bad(f"{name} must be a power of two <= 1024 (channels per program), got {v}")
    for name, v in (("num_warps", num_warps), ("bwd_num_warps", bwd_num_warps)):
        if v is not None and v not in (1, 2, 4, 8, 16):
            raise bad(f"{name} must be 1, 2, 4, 8 or 16, got {v}")


# ---------------------------------------------------------------------------------------------------- tiling plan


def padded_group(rep: int) -> int:
    """Channels per group after padding: a power of two when small, else a multiple of 8 (so blocks of >= 8
    channels tile it). 1152 -> 1152 (tiled by 64 or 128), 12 -> 16, 20 -> 24, 9 -> 16."""
    if is_pow2(rep):
        return rep
    if rep < 8:
        return _next_pow2(rep)
    if _pow2_divisor(rep, 8) < 8:
        rep = -(-rep // 8) * 8
    return _next_pow2(rep) if rep <= 16 else rep


def plan_blocks(g: int, rep_p: int, block_d: int) -> tuple[int, int]:
    """(G, R): groups and channels-of-a-group per program, G·R <= block_d, both powers of two tiling (g, rep_p)."""
    if is_pow2(rep_p) and rep_p <= block_d:
        return _pow2_divisor(g, block_d // rep_p), rep_p
    return 1, _pow2_divisor(rep_p, block_d)


class _Cfg(NamedTuple):
    """Static configuration of one call (hashable: custom_vjp's non-differentiable argument)."""
    T: int
    l: int  # true length: positions >= l are padding
    fwd: tuple[int, int, int]  # (G, R, num_warps)
    bwd: tuple[int, int, int]
    softplus: bool
    has_z: bool
    has_seg: bool
    interpret: bool
    num_stages: int
    prefetch: int
    bwd_prefetch: int


# ---------------------------------------------------------------------------------------------------- kernel bodies


def _softplus(v: jax.Array) -> jax.Array:
    # max(v, 0) + log1p(exp(-|v|)): the exponent is never positive, so no overflow.
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


class _Step(NamedTuple):
    dtv: jax.Array  # dt + bias (G, R), before softplus
    dtp: jax.Array  # dt' (G, R), 0 at padded positions
    u: jax.Array  # (G, R)
    B: jax.Array  # (G, n)
    C: jax.Array  # (G, n)
    keep: Any  # scalar: 0 where a document starts, else 1 (None without segments)


def _load_step(refs, idx, t, bias, cfg: _Cfg) -> _Step:
    u_ref, dt_ref, keep_ref, B_ref, C_ref = refs
    bi, gs, rs = idx
    dtv = dt_ref[bi, t, gs, rs].astype(F32) + bias
    dtp = _softplus(dtv) if cfg.softplus else dtv
    if u_ref.shape[1] != cfg.l:  # padded tail: no decay, no input
        dtp = jnp.where(t < cfg.l, dtp, 0.0)
    keep = keep_ref[bi, t] if cfg.has_seg else None
    return _Step(dtv, dtp, u_ref[bi, t, gs, rs].astype(F32), B_ref[bi, t, gs, :].astype(F32),
                 C_ref[bi, t, gs, :].astype(F32), keep)


def _decay(s: _Step, A: jax.Array) -> jax.Array:
    a = jnp.exp(s.dtp[:, :, None] * A)
    return a if s.keep is None else a * s.keep


def _advance(h: jax.Array, s: _Step, A: jax.Array) -> jax.Array:
    return _decay(s, A) * h + (s.dtp * s.u)[:, :, None] * s.B[:, None, :]


def _fwd_kernel(u_ref, dt_ref, z_ref, keep_ref, A_ref, bias_ref, D_ref, B_ref, C_ref, h0_ref,  # inputs
                y_ref, st_ref,  # outputs
                *, cfg: _Cfg, nc: int, save: bool):
    G, R, _ = cfg.fwd
    bi = pl.program_id(0)
    gs = pl.ds(pl.program_id(1) * G, G)
    rs = pl.ds(pl.program_id(2) * R, R)
    A = A_ref[gs, rs, :]
    bias = bias_ref[gs, rs]
    Dv = D_ref[gs, rs]
    refs = (u_ref, dt_ref, keep_ref, B_ref, C_ref)

    def chunk(c, h):
        if save:
            st_ref[bi, c, gs, rs, :] = h
        # The loads of `prefetch` steps first, then their compute: each y store goes through a layout change (a
        # CTA barrier) and no load is moved across a barrier, so loads interleaved with the steps would each wait
        # out their latency; grouped, one group's loads are in flight together.
        for k0 in range(0, cfg.T, cfg.prefetch):
            ts = [c * cfg.T + k for k in range(k0, min(cfg.T, k0 + cfg.prefetch))]
            steps = [_load_step(refs, (bi, gs, rs), t, bias, cfg) for t in ts]
            zs = [z_ref[bi, t, gs, rs] for t in ts] if cfg.has_z else [None] * len(ts)
            for t, s, zt in zip(ts, steps, zs):
                h = _advance(h, s, A)
                y = jnp.sum(h * s.C[:, None, :], axis=2) + Dv * s.u
                if cfg.has_z:
                    zt = zt.astype(F32)
                    y = y * (zt * jax.nn.sigmoid(zt))
                y_ref[bi, t, gs, rs] = y.astype(y_ref.dtype)
        return h

    h = jax.lax.fori_loop(0, nc, chunk, h0_ref[bi, gs, rs, :])
    st_ref[bi, st_ref.shape[1] - 1, gs, rs, :] = h


def _bwd_kernel(u_ref, dt_ref, z_ref, keep_ref, A_ref, bias_ref, D_ref, B_ref, C_ref, st_ref, dy_ref,
                dfin_ref,  # inputs
                du_ref, ddt_ref, dz_ref, dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref, dh0_ref,  # outputs
                *, cfg: _Cfg, nc: int):
    G, R, _ = cfg.bwd
    T = cfg.T
    bi = pl.program_id(0)
    gs = pl.ds(pl.program_id(1) * G, G)
    rb = pl.program_id(2)  # the slot of this channel block in the dB/dC partial sums
    rs = pl.ds(rb * R, R)
    A = A_ref[gs, rs, :]
    bias = bias_ref[gs, rs]
    Dv = D_ref[gs, rs]
    refs = (u_ref, dt_ref, keep_ref, B_ref, C_ref)

    def chunk(k, carry):
        gh, dA_acc, dD_acc, dbias_acc = carry  # gh = ∂L/∂h_t flowing back from steps > t
        c = nc - 1 - k
        hs = [st_ref[bi, c, gs, rs, :]]
        for kk in range(T):  # recompute the chunk's states from its saved boundary
            hs.append(_advance(hs[-1], _load_step(refs, (bi, gs, rs), c * T + kk, bias, cfg), A))
        loaded = {}
        for kk in reversed(range(T)):
            t = c * T + kk
            if kk not in loaded:
                # Loaded again rather than kept from the recompute (only the T + 1 states stay live),
                # `bwd_prefetch` steps at a time ahead of their use: the stores below pass through CTA barriers,
                # which no load crosses, so one group's loads are in flight together.
                for j in range(max(0, kk + 1 - cfg.bwd_prefetch), kk + 1):
                    tj = c * T + j
                    loaded[j] = (_load_step(refs, (bi, gs, rs), tj, bias, cfg), dy_ref[bi, tj, gs, rs],
                                 z_ref[bi, tj, gs, rs] if cfg.has_z else None)
            s, dout, zt = loaded.pop(kk)
            h_t, h_prev = hs[kk + 1], hs[kk]
            dout = dout.astype(F32)
            if cfg.has_z:
                zt = zt.astype(F32)
                sz = jax.nn.sigmoid(zt)
                y = jnp.sum(h_t * s.C[:, None, :], axis=2) + Dv * s.u
                dz_ref[bi, t, gs, rs] = (dout * y * sz * (1.0 + zt * (1.0 - sz))).astype(dz_ref.dtype)
                dy = dout * zt * sz
            else:
                dy = dout
            Gt = gh + dy[:, :, None] * s.C[:, None, :]  # ∂L/∂h_t
            dC_ref[bi, t, rb, gs, :] = jnp.sum(dy[:, :, None] * h_t, axis=1)
            GB = jnp.sum(Gt * s.B[:, None, :], axis=2)
            du_ref[bi, t, gs, rs] = (s.dtp * GB + Dv * dy).astype(du_ref.dtype)
            dB_ref[bi, t, rb, gs, :] = jnp.sum((s.dtp * s.u)[:, :, None] * Gt, axis=1)
            a = _decay(s, A)
            da = Gt * h_prev * a  # ∂L/∂(dt'·A), elementwise
            dA_acc = dA_acc + s.dtp[:, :, None] * da
            dD_acc = dD_acc + dy * s.u
            ddt = s.u * GB + jnp.sum(da * A, axis=2)
            if cfg.softplus:
                ddt = ddt * jax.nn.sigmoid(s.dtv)
            if u_ref.shape[1] != cfg.l:
                ddt = jnp.where(t < cfg.l, ddt, 0.0)
            dbias_acc = dbias_acc + ddt
            ddt_ref[bi, t, gs, rs] = ddt.astype(ddt_ref.dtype)
            gh = a * Gt
        return gh, dA_acc, dD_acc, dbias_acc

    zeros2 = jnp.zeros((G, R), F32)
    init = (dfin_ref[bi, gs, rs, :], jnp.zeros(A.shape, F32), zeros2, zeros2)
    gh, dA_acc, dD_acc, dbias_acc = jax.lax.fori_loop(0, nc, chunk, init)
    dh0_ref[bi, gs, rs, :] = gh
    dA_ref[bi, gs, rs, :] = dA_acc
    dD_ref[bi, gs, rs] = dD_acc
    dbias_ref[bi, gs, rs] = dbias_acc


# ----------------------------------------------------------------------------------------------- pallas calls + vjp


def _fwd_call(u, dt, z, keep, A, bias, D, B, C, h0, cfg: _Cfg, *, save: bool):
    b, lp, g, rep = u.shape
    n = A.shape[-1]
    nc = lp // cfg.T
    G, R, warps = cfg.fwd
    kern = functools.partial(_fwd_kernel, cfg=cfg, nc=nc, save=save)
    y, st = triton_call(
        kern,
        grid=(b, g // G, rep // R),
        out_shape=(jax.ShapeDtypeStruct((b, lp, g, rep), u.dtype),
                   jax.ShapeDtypeStruct((b, nc + 1 if save else 1, g, rep, n), F32)),
        interpret=cfg.interpret, num_warps=warps, num_stages=cfg.num_stages,
        name="selective_scan_fwd",
    )(u, dt, z, keep, A, bias, D, B, C, h0)
    return y, st


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _scan_core(u, dt, z, keep, A, bias, D, B, C, h0, cfg):
    y, st = _fwd_call(u, dt, z, keep, A, bias, D, B, C, h0, cfg, save=False)
    return y, st[:, -1]


def _scan_core_fwd(u, dt, z, keep, A, bias, D, B, C, h0, cfg):
    y, st = _fwd_call(u, dt, z, keep, A, bias, D, B, C, h0, cfg, save=True)
    return (y, st[:, -1]), (u, dt, z, keep, A, bias, D, B, C, st)


def _scan_core_bwd(cfg: _Cfg, res, cts):
    u, dt, z, keep, A, bias, D, B, C, st = res
    dy, dfin = cts
    b, lp, g, rep = u.shape
    n = A.shape[-1]
    nc = lp // cfg.T
    G, R, warps = cfg.bwd
    nrb = rep // R
    kern = functools.partial(_bwd_kernel, cfg=cfg, nc=nc)
    zshape = z.shape if cfg.has_z else (1, 1, 1, 1)  # z is a placeholder without gating: nothing to write
    du, ddt, dz, dBp, dCp, dAp, dDp, dbp, dh0 = triton_call(
        kern,
        grid=(b, g // G, nrb),
        out_shape=(
            jax.ShapeDtypeStruct(u.shape, u.dtype),  # du
            jax.ShapeDtypeStruct(u.shape, dt.dtype),  # d delta (through softplus)
            jax.ShapeDtypeStruct(zshape, z.dtype),  # dz
            jax.ShapeDtypeStruct((b, lp, nrb, g, n), F32),  # dB, partial per channel block of a group
            jax.ShapeDtypeStruct((b, lp, nrb, g, n), F32),  # dC, likewise
            jax.ShapeDtypeStruct((b, g, rep, n), F32),  # dA per batch row
            jax.ShapeDtypeStruct((b, g, rep), F32),  # dD per batch row
            jax.ShapeDtypeStruct((b, g, rep), F32),  # d delta_bias per batch row
            jax.ShapeDtypeStruct((b, g, rep, n), F32),  # d initial state
        ),
        interpret=cfg.interpret, num_warps=warps, num_stages=cfg.num_stages,
        name="selective_scan_bwd",
    )(u, dt, z, keep, A, bias, D, B, C, st, dy, dfin.astype(F32))
    if not cfg.has_z:
        dz = jnp.zeros_like(z)
    dB = dBp.sum(2).astype(B.dtype)
    dC = dCp.sum(2).astype(C.dtype)
    return du, ddt, dz, None, dAp.sum(0), dbp.sum(0), dDp.sum(0), dB, dC, dh0


_scan_core.defvjp(_scan_core_fwd, _scan_core_bwd)


def _pad(a: jax.Array, widths: dict[int, int], value: float = 0.0) -> jax.Array:
    """Pads the end of the given axes (no copy when nothing to pad)."""
    if not any(widths.values()):
        return a
    pw = [(0, widths.get(i, 0)) for i in range(a.ndim)]
    return jnp.pad(a, pw, constant_values=value)


def selective_scan_pallas(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                          D: jax.Array | None = None, z: jax.Array | None = None,
                          delta_bias: jax.Array | None = None, delta_softplus: bool = True,
                          initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                          chunk_size: int = DEFAULT_CHUNK, block_d: int | None = None,
                          num_warps: int | None = None, bwd_block_d: int | None = None,
                          bwd_num_warps: int | None = None, num_stages: int = 1,
                          prefetch: int = DEFAULT_PREFETCH, bwd_prefetch: int = DEFAULT_BWD_PREFETCH,
                          interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Pallas Mamba1 selective scan: y (b,l,d) in u.dtype and the final state (b,d,n) fp32, differentiable in
    every array argument. Same arguments as `mamba_llama_jax.ops.scan.selective_scan`, plus tiling: `chunk_size`
    steps per loop iteration (and between saved states), `block_d` channels per program (power of two), warps
    per program, steps whose loads are issued together (`prefetch`); the `bwd_` ones for the backward. Call
    through `pallas_kernels.dispatch.selective_scan` unless you want this kernel unconditionally."""
    check_selective_scan_args(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                              segment_ids=segment_ids, chunk_size=chunk_size, block_d=block_d,
                              bwd_block_d=bwd_block_d, num_warps=num_warps, bwd_num_warps=bwd_num_warps)
    for name, v in (("prefetch", prefetch), ("bwd_prefetch", bwd_prefetch)):
        if not isinstance(v, int) or v < 1:
            raise KernelError(f"selective_scan: {name} must be a positive integer (steps), got {v}")
    b, l, d = u.shape
    n = A.shape[1]
    g = B.shape[2]
    rep = d // g
    rep_p, n_p = padded_group(rep), _next_pow2(n)
    T = chunk_size
    lp = -(-l // T) * T
    pad_l, pad_r, pad_n = lp - l, rep_p - rep, n_p - n

    def chan(a):  # (b, l, d) -> (b, lp, g, rep_p)
        return _pad(a.reshape(b, l, g, rep), {1: pad_l, 3: pad_r})

    def per_chan(a, fill=0.0):  # (d,) -> (g, rep_p) fp32
        v = jnp.full((d,), fill, F32) if a is None else a.astype(F32)
        return _pad(v.reshape(g, rep), {1: pad_r})

    u4, dt4 = chan(u), chan(delta)
    z4 = chan(z) if z is not None else jnp.zeros((1, 1, 1, 1), u.dtype)
    if segment_ids is not None:
        keep = _pad(1.0 - segment_starts(segment_ids, b, l).astype(F32), {1: pad_l}, 1.0)
    else:
        keep = jnp.ones((1, 1), F32)
    A3 = _pad(A.astype(F32).reshape(g, rep, n), {1: pad_r, 2: pad_n})
    Bp, Cp = (_pad(a, {1: pad_l, 3: pad_n}) for a in (B, C))
    h0 = jnp.zeros((b, d, n), F32) if initial_state is None else initial_state.astype(F32)
    h0 = _pad(h0.reshape(b, g, rep, n), {2: pad_r, 3: pad_n})

    def plan(blk, warps):
        G, R = plan_blocks(g, rep_p, blk or DEFAULT_BLOCK_D)
        return G, R, warps or DEFAULT_WARPS

    cfg = _Cfg(T=T, l=l, fwd=plan(block_d, num_warps), bwd=plan(bwd_block_d or block_d, bwd_num_warps or num_warps),
               softplus=bool(delta_softplus), has_z=z is not None, has_seg=segment_ids is not None,
               interpret=bool(interpret), num_stages=int(num_stages), prefetch=min(prefetch, T),
               bwd_prefetch=min(bwd_prefetch, T))
    y4, fin = _scan_core(u4, dt4, z4, keep, A3, per_chan(delta_bias), per_chan(D), Bp, Cp, h0, cfg)
    y = y4[:, :l, :, :rep].reshape(b, l, d)
    fin = fin[:, :, :rep, :n].reshape(b, d, n)
    return y, fin
