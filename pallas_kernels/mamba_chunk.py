"""A verify chunk's t Mamba2 steps between the two projections as one Pallas launch: `mamba_decode` for t tokens.

Reference: `mamba_llama_jax.models.mamba.mamba2_chunk_reference` (same signature and maths: `Mamba2.multistep_gated`
— per token the conv step, SiLU, the SSD state update, D skip, gated RMSNorm — and the arrays a `MambaChunk` keeps
for the commit). This file adds `interpret` and `num_warps`.

Why: a speculative round runs this for every Mamba layer of the target's verify (t = k + 1 tokens) and of every draft
step of a Mamba draft (t = 1 or 2); in XLA it is ~10 small kernels (the split and softplus, the conv over window ++
chunk, SiLU, the GQA repeats, the multistep-verify kernel, the window update, the gated norm), at batch 1 all
launch-bound. Here it is one, so a verify's Mamba layer is three launches (RMSNorm + in_proj, this, out_proj +
residual), as a decode step's.

Layout: grid (batch, heads), as `mamba_decode`. A program owns one head of one row and walks the t tokens in order
(t is static and small, so the loop is unrolled): the conv of the head's channels from the cached window and the
chunk's earlier inputs (kept in registers), SiLU, dt' = softplus(dt + dt_bias), the state update, y with the D
skip, the gated norm; per token it writes y and what the commit needs (x and B of its head, dt', the conv inputs of
the channels it owns), and at the end the state and the new conv window. x and B channels of a group are computed
by each of its `rep` heads; only the group's first head writes their conv inputs and window.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.models.mamba import mamba2_chunk_reference
from pallas_kernels import dispatch
from pallas_kernels.dispatch import is_pow2
from pallas_kernels.mamba_decode import check_layer_args, softplus
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32
PALLAS_TRITON = dispatch.PALLAS_TRITON
REFERENCE = "reference_xla"
MAX_TOKENS = 16  # the token loop is unrolled: a verify chunk (k + 1) or a draft step

# Its `-m gpu` tests passed on an H100 (session 16, benchmarks/results/test-gpu.md).
GPU_VERIFIED = True


def _kernel(zx_ref, conv_ref, ssm_ref, w_ref, cb_ref, dtb_ref, a_ref, d_ref, nw_ref,  # inputs
            y_ref, cin_ref, x_ref, dt_ref, b_ref, conv_out_ref, ssm_out_ref,  # outputs
            *, d_inner: int, d_xb: int, n: int, width: int, rep: int, t: int, eps: float):
    bi, hh = pl.program_id(0), pl.program_id(1)
    g = hh // rep
    conv_dim = d_inner + 2 * d_xb
    dtype = y_ref.dtype
    first = hh % rep == 0

    def segment(c0: Any, owner: Any) -> list[jax.Array]:
        """Conv + SiLU of channels [c0, c0 + n) for every token, rounded to the compute dtype as the model rounds
        it; where `owner`, the channels' conv inputs and new window are written."""
        win = [conv_ref[bi, pl.ds(c0, n), k] for k in range(1, width)]  # the cached window's newest width-1
        ws = [w_ref[pl.ds(c0, n), k].astype(F32) for k in range(width)]
        bias = cb_ref[pl.ds(c0, n)].astype(F32)
        us, outs = [], []
        for j in range(t):
            u = zx_ref[bi, j, pl.ds(d_inner + c0, n)]
            acc = bias
            for k in range(width - 1):  # tap k: the (k+1)-th newest-but-one input; the last tap: this token
                acc = acc + win[k].astype(F32) * ws[k]
            acc = acc + u.astype(F32) * ws[width - 1]
            win = win[1:] + [u]
            us.append(u)
            outs.append((acc * jax.nn.sigmoid(acc)).astype(dtype).astype(F32))

        @pl.when(owner)
        def _write():
            for j, u in enumerate(us):
                cin_ref[bi, j, pl.ds(c0, n)] = u.astype(cin_ref.dtype)
            tail = [conv_ref[bi, pl.ds(c0, n), k] for k in range(width)] + us  # old window ++ the chunk
            for k in range(width):
                conv_out_ref[bi, pl.ds(c0, n), k] = tail[len(tail) - width + k].astype(conv_out_ref.dtype)

        return outs

    xs = segment(g * n, first)
    Bs = segment(d_xb + g * n, first)
    Cs = segment(2 * d_xb + hh * n, hh >= 0)
    a = a_ref[pl.ds(hh, 1)]
    dskip = d_ref[pl.ds(hh, 1)]
    dtb = dtb_ref[pl.ds(hh, 1)].astype(F32)
    nw = nw_ref[pl.ds(hh * n, n)].astype(F32)
    S = ssm_ref[bi, hh, :, :]
    for j in range(t):
        dt = softplus(zx_ref[bi, j, pl.ds(d_inner + conv_dim + hh, 1)].astype(F32) + dtb)  # (1,)
        x, Bv, Cv = xs[j], Bs[j], Cs[j]
        S = jnp.exp(dt * a)[:, None] * S + (dt * x)[:, None] * Bv[None, :]
        y = jnp.sum(S * Cv[None, :], axis=1) + dskip * x
        y = y.astype(dtype).astype(F32)  # the model rounds the SSD output before the gated norm
        z = zx_ref[bi, j, pl.ds(hh * n, n)].astype(F32)
        gz = y * (z * jax.nn.sigmoid(z))
        gz = gz * jax.lax.rsqrt(jnp.mean(gz * gz) + eps) * nw
        y_ref[bi, j, pl.ds(hh * n, n)] = gz.astype(dtype)
        x_ref[bi, j, hh, :] = x.astype(x_ref.dtype)
        b_ref[bi, j, hh, :] = Bv.astype(b_ref.dtype)
        dt_ref[bi, j, pl.ds(hh, 1)] = dt
    ssm_out_ref[bi, hh, :, :] = S


def check_args(zxbcdt: Any, conv: Any, ssm: Any, conv_w: Any, conv_b: Any, dt_bias: Any, A: Any, D: Any,
               norm_w: Any, *, d_inner: int, d_xb: int, kernel: bool = True) -> None:
    """Raises KernelError naming the first bad argument (shapes only). `kernel=False`: what the reference needs."""
    check_layer_args(zxbcdt, conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w, d_inner=d_inner, d_xb=d_xb,
                     op="mamba_chunk", tokens=True)
    if not kernel:
        return
    n = ssm.shape[-1]
    if not (is_pow2(n) and n >= 16):
        raise KernelError(f"mamba_chunk: d_state ({n}) must be a power of two >= 16 for the Pallas kernel")
    if not 1 <= zxbcdt.shape[1] <= MAX_TOKENS:
        raise KernelError(f"mamba_chunk: the kernel unrolls 1..{MAX_TOKENS} tokens, got {zxbcdt.shape[1]}")


@functools.partial(jax.jit, static_argnames=("d_inner", "d_xb", "eps", "interpret", "num_warps"))
def mamba2_chunk_pallas(zxbcdt: jax.Array, conv: jax.Array, ssm: jax.Array, conv_w: jax.Array,
                        conv_b: jax.Array | None, dt_bias: jax.Array, A: jax.Array, D: jax.Array, norm_w: jax.Array,
                        *, d_inner: int, d_xb: int, eps: float, interpret: bool = False,
                        num_warps: int = 4) -> tuple[jax.Array, ...]:
    """The kernel (module docstring); returns what `mamba2_chunk_reference` returns."""
    check_args(zxbcdt, conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w, d_inner=d_inner, d_xb=d_xb)
    b, t, _ = zxbcdt.shape
    _, h, _, n = ssm.shape
    conv_dim = d_inner + 2 * d_xb
    kern = functools.partial(_kernel, d_inner=d_inner, d_xb=d_xb, n=n, width=conv.shape[2], rep=d_inner // d_xb,
                             t=t, eps=float(eps))
    S = jax.ShapeDtypeStruct
    dt = zxbcdt.dtype
    return triton_call(
        kern, grid=(b, h),
        out_shape=(S((b, t, d_inner), dt), S((b, t, conv_dim), conv.dtype), S((b, t, h, n), dt), S((b, t, h), F32),
                   S((b, t, h, n), dt), S(conv.shape, conv.dtype), S(ssm.shape, F32)),
        interpret=interpret, num_warps=num_warps, num_stages=1, name="mamba2_chunk",
    )(zxbcdt, conv, ssm.astype(F32), conv_w, jnp.zeros((conv_dim,), F32) if conv_b is None else conv_b,
      dt_bias, A.astype(F32), D.astype(F32), norm_w)


def mamba2_chunk_choice(zxbcdt: Any, conv: Any, ssm: Any, conv_w: Any, conv_b: Any, dt_bias: Any, A: Any, D: Any,
                        norm_w: Any, *, d_inner: int, d_xb: int) -> str:
    """Which implementation `mamba2_chunk` would use (raises KernelError for bad arguments)."""
    args = (zxbcdt, conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w)
    check_args(*args, d_inner=d_inner, d_xb=d_xb, kernel=False)
    if not dispatch.kernel_allowed(GPU_VERIFIED):
        return REFERENCE
    try:
        check_args(*args, d_inner=d_inner, d_xb=d_xb, kernel=True)
    except KernelError:
        return REFERENCE
    return PALLAS_TRITON


def mamba2_chunk(zxbcdt: jax.Array, conv: jax.Array, ssm: jax.Array, conv_w: jax.Array, conv_b: jax.Array | None,
                 dt_bias: jax.Array, A: jax.Array, D: jax.Array, norm_w: jax.Array, *, d_inner: int, d_xb: int,
                 eps: float) -> tuple[jax.Array, ...]:
    """The kernel where allowed (GPU once verified, interpret mode in tests) and shapes fit, the reference
    elsewhere; records the choice (`pallas_kernels.dispatch.last_choice("mamba2_chunk")`)."""
    args = (zxbcdt, conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w)
    choice = mamba2_chunk_choice(*args, d_inner=d_inner, d_xb=d_xb)
    dispatch.record_choice("mamba2_chunk", choice)
    if choice == PALLAS_TRITON:
        return mamba2_chunk_pallas(*args, d_inner=d_inner, d_xb=d_xb, eps=eps, interpret=not dispatch._on_gpu())
    return mamba2_chunk_reference(*args, d_inner=d_inner, d_xb=d_xb, eps=eps)
