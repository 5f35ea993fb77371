"""One Mamba2 decode step between its two projections as one Pallas launch (Triton on GPU; interpret mode on CPU).

Reference: `mamba_llama_jax.models.mamba.mamba2_decode_reference` (same signature and maths, which are
`Mamba2.__call__`'s at one token: conv step, SiLU, the SSD state update, D skip, gated RMSNorm). This file adds
`interpret` and `num_warps` keywords only.

Why: at decode a Mamba2 layer is launch-bound. In XLA its step between in_proj and out_proj is ~10 small kernels
(masking, softplus, the 4-tap conv, SiLU, the GQA repeat of x and B, the state update, y, the conv-window shift,
the gated norm), as many launches as the whole attention layer's decode in `fused_decode`. Here it is one.

Layout: grid (batch, heads). A program owns one head of one row: it convolves the head's channels (x and B of
its group, its own C; 4 taps from the cached window), updates the head's (P, N) fp32 state, computes y and the
gated RMSNorm (grouped per head, so a program holds whole groups), and writes the head's new window entries. The
x and B channels of a group are shared by `rep` heads (GQA): every one of them computes them, only the group's
first head writes their window (the new window is a separate output, so no program reads what another wrote).
Every exponent taken is dt'·A <= 0 (A <= 0, dt' >= 0); softplus is max(v, 0) + log1p(exp(-|v|)).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.models.mamba import mamba2_decode_reference
from pallas_kernels import dispatch
from pallas_kernels.dispatch import is_pow2
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32
PALLAS_TRITON = dispatch.PALLAS_TRITON
REFERENCE = "reference_xla"

# Its `-m gpu` tests passed on an H200 (session 10) and again on an H100 (session 16), where the speculative
# benchmark that had died of a CUDA launch failure in session 10 (then also profiled) ran through with it on
# (benchmarks/results/test-gpu.md).
GPU_VERIFIED = True


def softplus(v: jax.Array) -> jax.Array:
    """softplus as the kernels take it, max(v, 0) + log1p(exp(-|v|)): no overflow for large v."""
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _kernel(zx_ref, conv_ref, ssm_ref, w_ref, cb_ref, dtb_ref, a_ref, d_ref, nw_ref, mask_ref,  # inputs
            y_ref, conv_out_ref, ssm_out_ref,  # outputs
            *, d_inner: int, d_xb: int, n: int, width: int, rep: int, eps: float):
    bi, hh = pl.program_id(0), pl.program_id(1)
    g = hh // rep
    real = mask_ref[bi] != 0
    conv_dim = d_inner + 2 * d_xb
    dtype = y_ref.dtype

    def segment(c0: Any, owner: Any) -> jax.Array:
        """The conv + SiLU of channels [c0, c0 + n), rounded to the compute dtype as the model rounds it; the
        channels' new window written where `owner`."""
        u = zx_ref[bi, pl.ds(d_inner + c0, n)]
        u = jnp.where(real, u, jnp.zeros_like(u))
        hist = [conv_ref[bi, pl.ds(c0, n), k] for k in range(width)]
        acc = cb_ref[pl.ds(c0, n)].astype(F32)
        for k in range(width - 1):  # tap k reads the (k+1)-th cached input: the window's oldest drops out
            acc = acc + hist[k + 1].astype(F32) * w_ref[pl.ds(c0, n), k].astype(F32)
        acc = acc + u.astype(F32) * w_ref[pl.ds(c0, n), width - 1].astype(F32)

        @pl.when(owner)
        def _write():
            for k in range(width):
                new = u if k == width - 1 else hist[k + 1].astype(u.dtype)
                conv_out_ref[bi, pl.ds(c0, n), k] = jnp.where(real, new, hist[k].astype(u.dtype)).astype(
                    conv_out_ref.dtype)

        return (acc * jax.nn.sigmoid(acc)).astype(dtype).astype(F32)

    first = hh % rep == 0
    x = segment(g * n, first)
    Bv = segment(d_xb + g * n, first)
    Cv = segment(2 * d_xb + hh * n, hh >= 0)
    dtv = zx_ref[bi, pl.ds(d_inner + conv_dim + hh, 1)].astype(F32) + dtb_ref[pl.ds(hh, 1)].astype(F32)
    dt = jnp.where(real, softplus(dtv), 0.0)  # (1,)
    S = jnp.exp(dt * a_ref[pl.ds(hh, 1)])[:, None] * ssm_ref[bi, hh, :, :] + (dt * x)[:, None] * Bv[None, :]
    ssm_out_ref[bi, hh, :, :] = S
    y = jnp.sum(S * Cv[None, :], axis=1) + d_ref[pl.ds(hh, 1)] * x
    y = y.astype(dtype).astype(F32)  # the model rounds the scan's output before the gated norm
    z = zx_ref[bi, pl.ds(hh * n, n)].astype(F32)
    gz = y * (z * jax.nn.sigmoid(z))
    gz = gz * jax.lax.rsqrt(jnp.mean(gz * gz) + eps) * nw_ref[pl.ds(hh * n, n)].astype(F32)
    y_ref[bi, pl.ds(hh * n, n)] = gz.astype(dtype)


def check_layer_args(zxbcdt: Any, conv: Any, ssm: Any, conv_w: Any, conv_b: Any, dt_bias: Any, A: Any, D: Any,
                     norm_w: Any, *, d_inner: int, d_xb: int, op: str, tokens: bool) -> int:
    """The shape checks a Mamba2 step between the projections needs (this kernel's and `mamba_chunk`'s): raises
    KernelError (prefixed with `op`) naming the first bad argument; returns the batch size. zxbcdt is (batch, width)
    or, with `tokens`, (batch, t, width)."""
    def bad(msg: str) -> KernelError:
        return KernelError(f"{op}: {msg}")

    if getattr(ssm, "ndim", None) != 4:
        raise bad(f"ssm must be (batch, heads, head_dim, d_state), got {getattr(ssm, 'shape', None)}")
    b, h, p, n = ssm.shape
    if p != n or d_inner != h * n or d_xb <= 0 or d_inner % d_xb or d_xb % n:
        raise bad(f"a MambaInLlama Mamba2 step needs head_dim = d_state and d_inner = heads·d_state with d_xb a "
                  f"multiple of d_state dividing d_inner; got ssm {ssm.shape}, d_inner {d_inner}, d_xb {d_xb}")
    conv_dim = d_inner + 2 * d_xb
    need = d_inner + conv_dim + h
    shape = getattr(zxbcdt, "shape", None)
    if getattr(zxbcdt, "ndim", None) != 2 + tokens or shape[0] != b or shape[-1] < need:
        rows = f"({b}, t, >= {need})" if tokens else f"({b}, >= {need})"
        raise bad(f"zxbcdt must be (batch, {'t, ' if tokens else ''}>= d_inner + conv channels + heads) = {rows} "
                  f"(columns past the heads' dt are ignored), got {shape}")
    if getattr(conv, "ndim", None) != 3 or conv.shape[:2] != (b, conv_dim):
        raise bad(f"conv must be (batch, {conv_dim}, d_conv), got {getattr(conv, 'shape', None)}")
    width = conv.shape[2]
    if conv_w.shape != (conv_dim, width) or (conv_b is not None and conv_b.shape != (conv_dim,)):
        raise bad(f"conv_w must be ({conv_dim}, {width}) and conv_b ({conv_dim},) or None, got {conv_w.shape} and "
                  f"{None if conv_b is None else conv_b.shape}")
    for name, a, want in (("dt_bias", dt_bias, (h,)), ("A", A, (h,)), ("D", D, (h,)), ("norm_w", norm_w, (d_inner,))):
        if a.shape != want:
            raise bad(f"{name} must be {want}, got {a.shape}")
    return b


def check_args(zxbcdt: Any, conv: Any, ssm: Any, conv_w: Any, conv_b: Any, dt_bias: Any, A: Any, D: Any,
               norm_w: Any, mask: Any, *, d_inner: int, d_xb: int, kernel: bool = True) -> None:
    """Raises KernelError naming the first bad argument (shapes only). `kernel=False`: what the reference needs."""
    b = check_layer_args(zxbcdt, conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w, d_inner=d_inner, d_xb=d_xb,
                         op="mamba_decode", tokens=False)
    if mask.shape != (b,):
        raise KernelError(f"mamba_decode: mask must be {(b,)}, got {mask.shape}")
    n = ssm.shape[-1]
    if kernel and not (is_pow2(n) and n >= 16):
        raise KernelError(f"mamba_decode: d_state ({n}) must be a power of two >= 16 for the Pallas kernel; use "
                          "mamba_llama_jax.models.mamba.mamba2_decode_reference for other sizes")


@functools.partial(jax.jit, static_argnames=("d_inner", "d_xb", "eps", "interpret", "num_warps"))
def mamba2_decode_pallas(zxbcdt: jax.Array, conv: jax.Array, ssm: jax.Array, conv_w: jax.Array,
                         conv_b: jax.Array | None, dt_bias: jax.Array, A: jax.Array, D: jax.Array,
                         norm_w: jax.Array, mask: jax.Array, *, d_inner: int, d_xb: int, eps: float,
                         interpret: bool = False, num_warps: int = 4) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel (module docstring): (gated-normed y (b, d_inner) in zxbcdt's dtype, the new conv window
    (b, channels, d_conv) in conv's dtype, the new state (b, h, p, n) fp32)."""
    check_args(zxbcdt, conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w, mask, d_inner=d_inner, d_xb=d_xb)
    b, h, _, n = ssm.shape
    conv_dim = d_inner + 2 * d_xb
    kern = functools.partial(_kernel, d_inner=d_inner, d_xb=d_xb, n=n, width=conv.shape[2], rep=d_inner // d_xb,
                             eps=float(eps))
    return triton_call(
        kern, grid=(b, h),
        out_shape=(jax.ShapeDtypeStruct((b, d_inner), zxbcdt.dtype), jax.ShapeDtypeStruct(conv.shape, conv.dtype),
                   jax.ShapeDtypeStruct(ssm.shape, F32)),
        interpret=interpret, num_warps=num_warps, num_stages=1, name="mamba2_decode",
    )(zxbcdt, conv, ssm.astype(F32), conv_w, jnp.zeros((conv_dim,), F32) if conv_b is None else conv_b,
      dt_bias, A.astype(F32), D.astype(F32), norm_w, mask.astype(jnp.int32))


def kernel_would_run(d_state: int) -> bool:
    """Whether `mamba2_decode` will take the kernel for a layer of this state size (for `prepare_for_inference`)."""
    return dispatch.kernel_allowed(GPU_VERIFIED) and is_pow2(d_state) and d_state >= 16


def mamba2_decode(zxbcdt: jax.Array, conv: jax.Array, ssm: jax.Array, conv_w: jax.Array, conv_b: jax.Array | None,
                  dt_bias: jax.Array, A: jax.Array, D: jax.Array, norm_w: jax.Array, mask: jax.Array, *,
                  d_inner: int, d_xb: int, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel where allowed (GPU once verified, interpret mode in tests), the reference elsewhere; records the
    choice (`pallas_kernels.dispatch.last_choice("mamba2_decode")`)."""
    args = (zxbcdt, conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w, mask)
    check_args(*args, d_inner=d_inner, d_xb=d_xb, kernel=False)
    choice = PALLAS_TRITON if kernel_would_run(ssm.shape[-1]) else REFERENCE
    dispatch.record_choice("mamba2_decode", choice)
    if choice == PALLAS_TRITON:
        return mamba2_decode_pallas(*args, d_inner=d_inner, d_xb=d_xb, eps=eps, interpret=not dispatch._on_gpu())
    return mamba2_decode_reference(*args, d_inner=d_inner, d_xb=d_xb, eps=eps)
