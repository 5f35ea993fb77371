"""The fused Mamba2 verify-chunk step (`pallas_kernels/mamba_chunk.py`) == its reference, and the reference == t
decode steps (`mamba2_decode_reference`) token by token.

CPU: interpret mode at small shapes (GQA groups, t = 1..9, with and without a conv bias, fp32 and bf16), the Triton
lowering for an H100 at the SmolLM2 hybrid's and a 1B hybrid's shapes, argument errors and the dispatcher. GPU
(`-m gpu`, on the device): compiled at those shapes. Kernel tests check that a `pallas_call` was traced.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.models.mamba import mamba2_chunk_reference, mamba2_decode_reference
from pallas_kernels import dispatch
from pallas_kernels import mamba_chunk as mc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import has_pallas_call, lower_for_h100, needs_gpu, rel  # noqa: E402
from test_mamba_decode import make_args as decode_args  # noqa: E402

NAMES = ("y", "conv_in", "x", "dt", "B", "conv", "ssm")


def make_args(b, t, h, n, groups, *, width=4, dtype=jnp.float32, bias=True, seed=0, pad_cols=0):
    """A decode step's random arguments (test_mamba_decode) with in_proj's output for t tokens instead of one;
    `pad_cols` zero columns after the heads' dt (inference copies pad in_proj's output)."""
    args, kw = decode_args(b, h, n, groups, width=width, dtype=dtype, bias=bias, seed=seed)
    zx = jax.random.normal(jax.random.key(seed + 100), (b, t, args[0].shape[1])).astype(dtype)
    zx = jnp.pad(zx, ((0, 0), (0, 0), (0, pad_cols)))
    return (zx,) + args[1:-1], kw  # no mask: a verify chunk's tokens are real


def assert_kernel_equals_reference(args, kw, *, tol, interpret=True):
    fn = lambda *a: mc.mamba2_chunk_pallas(*a, **kw, interpret=interpret)
    assert has_pallas_call(fn, *args)
    got = jax.jit(fn)(*args)
    # one compiled program, not the reference's ops compiled one by one (each case's shapes are new)
    want = jax.jit(functools.partial(mamba2_chunk_reference, **kw))(*args)
    for g, w, name in zip(got, want, NAMES):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel(g, w) < tol, (name, rel(g, w))


def test_reference_is_decode_steps_token_by_token():
    """t chunk steps = t decode steps: the same outputs per token, the same window and state at the end."""
    args, kw = make_args(2, 4, 4, 16, 2, seed=1)
    zx, conv, ssm, *rest = args
    y, conv_in, x, dt, B, window, final = mamba2_chunk_reference(*args, **kw)
    for j in range(zx.shape[1]):
        yj, conv, ssm = mamba2_decode_reference(zx[:, j], conv, ssm, *rest, jnp.ones((2,), bool), **kw)
        assert rel(y[:, j], yj) < 1e-5, j
    assert rel(window, conv) == 0 and rel(final, ssm) < 1e-5
    d_inner, d_xb = kw["d_inner"], kw["d_xb"]
    assert rel(conv_in, zx[..., d_inner:2 * d_inner + 2 * d_xb]) == 0


@pytest.mark.parametrize("b,t,h,n,groups,bias,dtype,pad", [
    (2, 4, 4, 16, 2, True, jnp.float32, 0),       # GQA (2 heads a group), a verify chunk
    (1, 1, 4, 16, 4, False, jnp.float32, 0),      # one token (a draft step), no GQA, no conv bias
    (3, 9, 6, 16, 2, True, jnp.float32, 7),       # k = 8, 3 heads a group, in_proj padding columns
    (2, 3, 4, 32, 1, True, jnp.bfloat16, 0),      # bf16, one group for all heads
])
def test_kernel_equals_reference_interpret(b, t, h, n, groups, bias, dtype, pad):
    args, kw = make_args(b, t, h, n, groups, bias=bias, dtype=dtype, seed=t, pad_cols=pad)
    assert_kernel_equals_reference(args, kw, tol=1e-5 if dtype == jnp.float32 else 2e-2)


def test_dispatch_and_bad_args(monkeypatch):
    args, kw = make_args(1, 3, 4, 16, 2)
    shape_kw = dict(d_inner=kw["d_inner"], d_xb=kw["d_xb"])
    monkeypatch.delenv(dispatch.INTERPRET_ENV, raising=False)
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    assert mc.mamba2_chunk_choice(*args, **shape_kw) == "reference_xla"
    mc.mamba2_chunk(*args, **kw)
    assert dispatch.last_choice("mamba2_chunk") == "reference_xla"
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    got = mc.mamba2_chunk(*args, **kw)
    assert dispatch.last_choice("mamba2_chunk") == "pallas_triton"
    assert rel(got[0], mamba2_chunk_reference(*args, **kw)[0]) < 1e-5
    long_args, _ = make_args(1, mc.MAX_TOKENS + 1, 4, 16, 2)  # more tokens than the kernel unrolls
    assert mc.mamba2_chunk_choice(*long_args, **shape_kw) == "reference_xla"
    with pytest.raises(KernelError, match="unrolls"):
        mc.mamba2_chunk_pallas(*long_args, **kw, interpret=True)
    small, small_kw = make_args(1, 2, 4, 8, 2)  # d_state 8: below the kernel's tile
    assert mc.mamba2_chunk_choice(*small, d_inner=small_kw["d_inner"], d_xb=small_kw["d_xb"]) == "reference_xla"
    with pytest.raises(KernelError, match="zxbcdt"):
        mc.mamba2_chunk_choice(args[0][:, :, :10], *args[1:], **shape_kw)
    with pytest.raises(KernelError, match="conv must be"):
        mc.mamba2_chunk_choice(args[0], args[1][:, :-1], *args[2:], **shape_kw)
    with pytest.raises(KernelError, match="dt_bias"):
        mc.mamba2_chunk_choice(*args[:5], args[5][:-1], *args[6:], **shape_kw)


@pytest.mark.parametrize("b,t,h,groups,n,conv_dtype", [
    (1, 3, 9, 3, 64, jnp.bfloat16),    # SmolLM2's 50 % hybrid at k = 2
    (1, 1, 9, 3, 64, jnp.bfloat16),    # a draft step
    (1, 5, 32, 8, 64, jnp.bfloat16),   # a Llama-3.2-1B hybrid at k = 4
])
def test_kernel_lowers_to_triton(b, t, h, groups, n, conv_dtype):
    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    d_inner, d_xb = h * n, groups * n
    conv_dim = d_inner + 2 * d_xb
    width = d_inner + conv_dim + h + 7
    avals = (S((b, t, width), conv_dtype), S((b, conv_dim, 4), conv_dtype), S((b, h, n, n), f32),
             S((conv_dim, 4), conv_dtype), S((conv_dim,), conv_dtype), S((h,), conv_dtype), S((h,), f32),
             S((h,), conv_dtype), S((d_inner,), conv_dtype))
    fn = functools.partial(mc.mamba2_chunk_pallas, d_inner=d_inner, d_xb=d_xb, eps=1e-5)
    assert "xla.gpu.triton" in lower_for_h100(fn, *avals)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,t,h,groups,n,dtype", [
    (1, 3, 9, 3, 64, jnp.bfloat16), (4, 4, 9, 3, 64, jnp.float32), (1, 1, 9, 3, 64, jnp.bfloat16),
    (1, 5, 32, 8, 64, jnp.bfloat16),
])
def test_kernel_equals_reference_gpu(b, t, h, groups, n, dtype):
    args, kw = make_args(b, t, h, groups=groups, n=n, dtype=dtype, seed=b + t, pad_cols=7)
    assert_kernel_equals_reference(args, kw, tol=1e-4 if dtype == jnp.float32 else 2e-2, interpret=False)
