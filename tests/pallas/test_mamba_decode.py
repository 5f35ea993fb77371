"""The fused Mamba2 decode step (`pallas_kernels/mamba_decode.py`) == its reference == `Mamba2.__call__` at one token.

CPU: the reference against the mixer itself, the kernel in interpret mode at tiny shapes (GQA groups, padding
rows, with and without a conv bias, fp32 and bf16), its lowering to Triton IR for an H100 at the SmolLM2 hybrid's
shapes (what the Triton lowering rejects shows here without a GPU), argument errors and the dispatcher. GPU
(`-m gpu`, on the device): compiled at the SmolLM2 hybrid's shapes. Kernel tests check that a `pallas_call` was
traced, so a silent fallback to the reference cannot pass as the kernel.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import LlamaConfig, MambaConfig
from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.models.llama import Context
from mamba_llama_jax.models.mamba import Mamba2, mamba2_decode_reference
from pallas_kernels import dispatch
from pallas_kernels import mamba_decode as md

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import has_pallas_call, lower_for_h100, needs_gpu, rel  # noqa: E402


def make_args(b, h, n, groups, *, width=4, dtype=jnp.float32, bias=True, mask=None, seed=0, param_dtype=jnp.float32):
    """Random step arguments for h heads of size n, x/B in `groups` groups; `mask` (b,) bools (default all real).
    `param_dtype`: the conv weights and bias, dt_bias, D and the norm weight (a model built with param_dtype=bf16
    hands them over as they are; A = -exp(A_log) is always fp32)."""
    d_inner, d_xb = h * n, groups * n
    conv_dim = d_inner + 2 * d_xb
    k = jax.random.split(jax.random.key(seed), 10)
    zx = jax.random.normal(k[0], (b, d_inner + conv_dim + h)).astype(dtype)
    conv = jax.random.normal(k[1], (b, conv_dim, width)).astype(dtype)
    ssm = jax.random.normal(k[2], (b, h, n, n))
    conv_w = jax.random.normal(k[3], (conv_dim, width)) * 0.5
    conv_b = jax.random.normal(k[4], (conv_dim,)) * 0.1 if bias else None
    dt_bias = jax.random.normal(k[5], (h,)) - 1.0
    A = -jnp.exp(jax.random.normal(k[6], (h,)))
    D = jax.random.normal(k[7], (h,))
    norm_w = 1.0 + 0.1 * jax.random.normal(k[8], (d_inner,))
    mask = jnp.ones((b,), bool) if mask is None else jnp.asarray(mask)
    pd = lambda a: None if a is None else a.astype(param_dtype)
    conv_w, conv_b, dt_bias, D, norm_w = map(pd, (conv_w, conv_b, dt_bias, D, norm_w))
    return (zx, conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w, mask), dict(d_inner=d_inner, d_xb=d_xb, eps=1e-5)


def test_reference_is_the_mixers_own_decode_step():
    """`mamba2_decode_reference` between in_proj and out_proj == `Mamba2.__call__` on one token with a cache,
    output and both caches, also for a padded row (its cache stays as it was)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, dtype="float32", param_dtype="float32")
    mixer = Mamba2(cfg, MambaConfig(variant="mamba2"), rngs=nnx.Rngs(0))
    b = 3
    k = jax.random.split(jax.random.key(1), 4)
    cache = mixer.init_cache(b, 8)
    cache = type(cache)(jax.random.normal(k[0], cache.conv.shape), jax.random.normal(k[1], cache.ssm.shape))
    x = jax.random.normal(k[2], (b, 1, 64))
    mask = jnp.asarray([[True], [False], [True]])
    zeros = jnp.zeros((b, 1, cfg.head_dim // 2))
    ctx = Context(jnp.zeros((b, 1), jnp.int32), mask, None, zeros, zeros, jnp.int32(3), None, False)
    want, want_cache = mixer(x, ctx, cache)
    bias = None if mixer.conv1d.bias is None else mixer.conv1d.bias[...]
    y, conv, ssm = mamba2_decode_reference(
        mixer.in_proj(x)[:, 0], cache.conv, cache.ssm, mixer.conv1d.weight[...], bias, mixer.dt_bias[...],
        -jnp.exp(mixer.A_log[...]), mixer.D[...], mixer.norm.weight[...], mask[:, 0], d_inner=mixer.d_inner,
        d_xb=mixer.d_xb, eps=mixer.mcfg.norm_eps)
    np.testing.assert_allclose(np.asarray(mixer.out_proj(y[:, None])), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(conv), np.asarray(want_cache.conv))
    np.testing.assert_allclose(np.asarray(ssm), np.asarray(want_cache.ssm), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ssm[1]), np.asarray(cache.ssm[1]))  # the padded row: unchanged


@pytest.mark.parametrize("b,h,n,groups,bias,dtype,tol", [
    (1, 4, 16, 2, True, jnp.float32, 1e-5),      # GQA: 2 heads per x/B group
    (3, 4, 16, 4, False, jnp.float32, 1e-5),     # one head per group, no conv bias
    (2, 6, 32, 2, True, jnp.float32, 1e-5),      # 3 heads per group, larger state
    (3, 4, 16, 2, True, jnp.bfloat16, 2e-2),     # bf16 inputs and caches
    (3, 4, 16, 2, True, "bf16 params", 2e-2),    # ... and bf16 parameters (a model built with param_dtype=bf16)
])
def test_kernel_equals_reference_interpret(b, h, n, groups, bias, dtype, tol):
    mask = [True, False, True][:b]
    pdt = jnp.bfloat16 if dtype == "bf16 params" else jnp.float32
    dtype = jnp.bfloat16 if dtype == "bf16 params" else dtype
    args, kw = make_args(b, h, n, groups, dtype=dtype, bias=bias, mask=mask, seed=b + h, param_dtype=pdt)
    fn = functools.partial(md.mamba2_decode_pallas, interpret=True, **kw)
    assert has_pallas_call(fn, *args)
    got = jax.jit(fn)(*args)
    # one compiled program, not the reference's ops compiled one by one (each case's shapes are new)
    want = jax.jit(functools.partial(mamba2_decode_reference, **kw))(*args)
    for g, w, name in zip(got, want, ("y", "conv", "ssm")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel(g, w) < tol, (name, rel(g, w))
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))  # moved, not mixed


def test_columns_past_dt_are_ignored():
    """in_proj's output padded with columns past the heads' dt (inference copies pad in_proj to the fused GEMVs'
    tile) gives the unpadded result, through the kernel and the reference."""
    args, kw = make_args(2, 4, 16, 2, mask=[True, False])
    padded = jnp.concatenate([args[0], 1e3 * jnp.ones((2, 12), args[0].dtype)], axis=1)
    want = mamba2_decode_reference(*args, **kw)
    for fn in (mamba2_decode_reference, functools.partial(md.mamba2_decode_pallas, interpret=True)):
        got = fn(padded, *args[1:], **kw)
        for g, w, name in zip(got, want, ("y", "conv", "ssm")):
            assert rel(g, w) < 1e-5, (name, rel(g, w))


def test_bad_arguments_raise():
    args, kw = make_args(1, 4, 16, 2)
    with pytest.raises(KernelError, match="zxbcdt must be"):
        md.mamba2_decode(args[0][:, :-1], *args[1:], **kw)
    with pytest.raises(KernelError, match="mask must be"):
        md.mamba2_decode(*args[:-1], jnp.ones((2,), bool), **kw)
    with pytest.raises(KernelError, match="head_dim = d_state"):
        md.mamba2_decode(*args, d_inner=kw["d_inner"], d_xb=24, eps=1e-5)
    odd, kw_odd = make_args(1, 2, 12, 1)
    with pytest.raises(KernelError, match="power of two"):
        md.mamba2_decode_pallas(*odd, interpret=True, **kw_odd)
    md.mamba2_decode(*odd, **kw_odd)  # the reference takes any size


def test_dispatch(monkeypatch):
    args, kw = make_args(2, 4, 16, 2, mask=[True, False])
    want = mamba2_decode_reference(*args, **kw)
    monkeypatch.delenv(dispatch.INTERPRET_ENV, raising=False)
    md.mamba2_decode(*args, **kw)
    assert dispatch.last_choice("mamba2_decode") == md.REFERENCE and not md.kernel_would_run(16)
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    assert md.kernel_would_run(16) and not md.kernel_would_run(12)
    got = md.mamba2_decode(*args, **kw)
    assert dispatch.last_choice("mamba2_decode") == md.PALLAS_TRITON
    assert all(rel(g, w) < 1e-5 for g, w in zip(got, want))
    monkeypatch.delenv(dispatch.INTERPRET_ENV)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)  # a GPU: the kernel once verified there, else the reference
    monkeypatch.setattr(md, "GPU_VERIFIED", True)
    assert md.kernel_would_run(16)
    monkeypatch.setattr(md, "GPU_VERIFIED", False)
    assert not md.kernel_would_run(16)
    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    assert md.kernel_would_run(16)


F32, BF16 = jnp.float32, jnp.bfloat16
SMOLLM2_HYBRID = dict(h=9, n=64, groups=3)  # d_inner 576, d_xb 192: the 50 % hybrid's Mamba2 layers
LLAMA1B_HYBRID = dict(h=32, n=64, groups=8)  # d_inner 2048, d_xb 512: a Llama-3.2-1B hybrid's


@pytest.mark.parametrize("b,shape,pdt", [(1, SMOLLM2_HYBRID, F32), (64, SMOLLM2_HYBRID, F32),
                                         (1, LLAMA1B_HYBRID, F32), (1, SMOLLM2_HYBRID, BF16)])
def test_kernel_lowers_to_triton_at_real_hybrid_shapes(b, shape, pdt):
    args, kw = make_args(b, dtype=jnp.bfloat16, param_dtype=pdt, **shape)
    avals = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    mod = lower_for_h100(lambda *a: md.mamba2_decode_pallas(*a, **kw), *avals)
    assert "xla.gpu.triton" in mod


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,shape,pdt", [(1, SMOLLM2_HYBRID, F32), (4, SMOLLM2_HYBRID, F32),
                                         (64, SMOLLM2_HYBRID, F32), (1, LLAMA1B_HYBRID, F32),
                                         (1, SMOLLM2_HYBRID, BF16)])  # bf16 params: bench_speculative's models
def test_kernel_equals_reference_gpu(b, shape, pdt):
    mask = [r % 5 != 3 for r in range(b)]
    args, kw = make_args(b, dtype=jnp.bfloat16, mask=mask, seed=b, param_dtype=pdt, **shape)
    fn = functools.partial(md.mamba2_decode_pallas, **kw)
    assert has_pallas_call(fn, *args)
    got = jax.jit(fn)(*args)
    want = jax.jit(functools.partial(mamba2_decode_reference, **kw))(*args)
    for g, w, name in zip(got, want, ("y", "conv", "ssm")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel(g, w) < 2e-2, (name, rel(g, w))
