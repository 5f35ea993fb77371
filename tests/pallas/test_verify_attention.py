"""Pallas verify attention == `mamba_llama_jax.ops.attention.verify_attention_reference` (output and both caches),
and the reference == t successive decode steps == the model's chunk attention.

CPU: interpret mode at small shapes and the Triton lowering for an H100. GPU (`-m gpu`, on the device): compiled at
the SmolLM2 and Llama-3.2-1B head shapes. Kernel tests check that the traced function holds a `pallas_call`.
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
from mamba_llama_jax.models.llama import attend, cache_mask
from mamba_llama_jax.ops.attention import decode_attention_reference, verify_attention_reference
from pallas_kernels import dispatch
from pallas_kernels import verify_attention as va
from pallas_kernels.verify_attention import verify_attention, verify_attention_choice, verify_attention_pallas

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import lower_for_h100, on_gpu, rel  # noqa: E402


def make_inputs(b, slots, h, kv, d, t, index, *, dtype=jnp.float32, seed=0, pad=None):
    """A chunk of t tokens at slots [index, index + t) of a cache whose rows have `pad` invalid slots in front."""
    k = jax.random.split(jax.random.key(seed), 4)
    qkv = jax.random.normal(k[0], (b, t, (h + 2 * kv) * d)).astype(dtype)
    kc = jax.random.normal(k[1], (b, slots, kv, d)).astype(dtype)
    vc = jax.random.normal(k[2], (b, slots, kv, d)).astype(dtype)
    pos = jax.random.randint(k[3], (b,), 0, 4000)[:, None] + jnp.arange(t)[None, :]
    inv = 1.0 / (1e4 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = pos[..., None].astype(jnp.float32) * inv
    slot = jnp.arange(slots)[None, :]
    pad = np.zeros(b, int) if pad is None else np.asarray(pad)
    valid = ((slot >= jnp.asarray(pad)[:, None]) | (slot >= index)) & (slot < index + t)
    return qkv, kc, vc, jnp.cos(ang), jnp.sin(ang), jnp.int32(index), valid


def assert_equal_to_reference(args, h, kv, *, tol=1e-5, interpret=True, **kw):
    fn = lambda *a: verify_attention_pallas(*a, num_heads=h, num_kv_heads=kv, interpret=interpret, **kw)
    assert "pallas_call" in str(jax.make_jaxpr(fn)(*args))
    got = jax.jit(fn)(*args)
    # one compiled program, not the reference's ops compiled one by one (each case's shapes are new)
    want = jax.jit(functools.partial(verify_attention_reference, num_heads=h, num_kv_heads=kv))(*args)
    for g, w, name in zip(got, want, ("out", "k_cache", "v_cache")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel(g, w) < tol, (name, rel(g, w))


@pytest.mark.parametrize("b,slots,h,kv,d,t,index,block,dtype", [
    (2, 48, 4, 2, 32, 3, 20, 16, jnp.float32),     # g = 2, cached blocks and the chunk
    (1, 64, 9, 3, 32, 5, 0, 16, jnp.float32),      # an empty cache: the chunk attends to itself only
    (3, 64, 9, 3, 32, 4, 37, 32, jnp.float32),     # SmolLM2's grouping, left padding per row
    (1, 64, 4, 4, 32, 9, 55, 16, jnp.float32),     # MHA, k = 8, the chunk fills the cache's end
    (2, 64, 9, 3, 64, 3, 40, 0, jnp.bfloat16),     # bf16: p in two rounded parts; the planned block
])
def test_kernel_equals_reference_interpret(b, slots, h, kv, d, t, index, block, dtype):
    args = make_inputs(b, slots, h, kv, d, t, index, dtype=dtype, pad=[0, 5, 17][:b], seed=index + t)
    assert_equal_to_reference(args, h, kv, block=block, tol=1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("b,slots,h,kv,d,t,index,block,splits,dtype", [
    (1, 64, 9, 3, 32, 3, 37, 16, 4, jnp.float32),    # 3 filled blocks over 4 splits: the last split has none
    # one filled block: split 0 alone sees cached slots (this and the two slow cases below: `make test-slow`)
    pytest.param(2, 64, 4, 2, 32, 4, 5, 16, 4, jnp.float32, marks=pytest.mark.slow),
    # an empty cache: split 0's chunk keys are all there is
    pytest.param(1, 64, 4, 2, 32, 3, 0, 16, 2, jnp.float32, marks=pytest.mark.slow),
    (3, 64, 9, 3, 32, 4, 50, 16, 2, jnp.float32),    # two blocks a split, left padding per row
    pytest.param(1, 64, 4, 4, 32, 9, 55, 16, 4, jnp.float32, marks=pytest.mark.slow),  # MHA, k = 8, the cache's end
    (2, 128, 9, 3, 64, 3, 100, 16, 8, jnp.bfloat16),  # bf16
])
def test_split_kernel_equals_reference_interpret(b, slots, h, kv, d, t, index, block, splits, dtype):
    args = make_inputs(b, slots, h, kv, d, t, index, dtype=dtype, pad=[0, 5, 17][:b], seed=index + t + splits)
    assert_equal_to_reference(args, h, kv, block=block, splits=splits,
                              tol=1e-5 if dtype == jnp.float32 else 1e-2)


def test_plan_splits_and_the_planned_split_at_a_long_cache():
    assert va.plan_splits(1, 3, va.LONG_SLOTS // 2, 128) == 1  # short caches: unsplit, as measured
    assert va.plan_splits(1, 3, 4096, 128) == va.MAX_SPLITS
    assert va.plan_splits(1, 3, 1024, 128) == 8  # one block a split at a full cache
    assert va.plan_splits(16, 3, 4096, 128) == 16 and va.plan_splits(64, 8, 4096, 128) == 1  # 512 programs
    assert va.plan_splits(4, 8, 8192, 128) == 16 and va.plan_splits(40, 3, 8192, 128) == 8
    args = make_inputs(1, va.LONG_SLOTS, 4, 2, 32, 3, 700, seed=9)
    assert va.plan_splits(1, 2, va.LONG_SLOTS, 128) == 8
    assert_equal_to_reference(args, 4, 2)  # the planned 8 splits; 700 slots: 6 filled blocks
    with pytest.raises(KernelError, match="splits"):
        verify_attention_pallas(*args, num_heads=4, num_kv_heads=2, splits=9, interpret=True)


def test_a_chunk_past_the_end_writes_where_the_reference_writes():
    """index + t > slots (a caller's bug): the kernel's writes are clamped as dynamic_update_slice clamps the
    reference's, never out of bounds; both caches equal the reference's."""
    args = make_inputs(1, 32, 4, 2, 32, 4, 30, seed=7)
    got = verify_attention_pallas(*args, num_heads=4, num_kv_heads=2, interpret=True)
    want = verify_attention_reference(*args, num_heads=4, num_kv_heads=2)
    assert rel(got[1], want[1]) < 1e-6 and rel(got[2], want[2]) < 1e-6


def test_reference_is_decode_steps_one_token_at_a_time():
    """Verifying t tokens = t decode steps (each writes its token, then attends to the valid slots up to it)."""
    b, slots, h, kv, d, t, index = 2, 32, 4, 2, 16, 4, 11
    qkv, kc, vc, cos, sin, idx, valid = make_inputs(b, slots, h, kv, d, t, index, pad=[0, 3], seed=5)
    out, kc_v, vc_v = verify_attention_reference(qkv, kc, vc, cos, sin, idx, valid, num_heads=h, num_kv_heads=kv)
    for j in range(t):
        o, kc, vc = decode_attention_reference(qkv[:, j], kc, vc, cos[:, j], sin[:, j], jnp.int32(index + j),
                                               valid, num_heads=h, num_kv_heads=kv)
        assert rel(out[:, j], o) < 1e-6, j
    assert rel(kc_v, kc) == 0 and rel(vc_v, vc) == 0


def test_reference_is_the_models_chunk_attention_in_fp32():
    """Same maths as `models.llama.attend` over cache + chunk (which rounds probabilities to the compute dtype:
    a no-op in fp32)."""
    from mamba_llama_jax.models.llama import Context
    from mamba_llama_jax.ops.attention import rope_halves

    b, slots, h, kv, d, t, index = 2, 32, 4, 2, 16, 3, 9
    qkv, kc, vc, cos, sin, idx, valid = make_inputs(b, slots, h, kv, d, t, index, pad=[2, 0], seed=6)
    out, kc2, _ = verify_attention_reference(qkv, kc, vc, cos, sin, idx, valid, num_heads=h, num_kv_heads=kv)
    q = rope_halves(qkv[..., : h * d].reshape(b, t, h, d), cos[:, :, None], sin[:, :, None])
    ctx = Context(jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), bool), None, cos, sin, idx, valid, False)
    want = attend(q, kc2, vc[:, :].at[:, index:index + t].set(
        qkv[..., (h + kv) * d:].reshape(b, t, kv, d)), cache_mask(ctx, slots))
    assert rel(out, want.reshape(b, t, h * d)) < 1e-5


def test_dispatch_and_bad_args(monkeypatch):
    args = make_inputs(1, 32, 4, 2, 32, 3, 5)
    kw = dict(num_heads=4, num_kv_heads=2)
    monkeypatch.delenv(dispatch.INTERPRET_ENV, raising=False)
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    assert verify_attention_choice(*args[:5], args[6], **kw) == "reference_xla"  # CPU, no interpret mode
    verify_attention(*args, **kw)
    assert dispatch.last_choice("verify_attention") == "reference_xla"
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    assert verify_attention_choice(*args[:5], args[6], **kw) == "pallas_triton"
    got = verify_attention(*args, **kw)
    assert dispatch.last_choice("verify_attention") == "pallas_triton"
    assert rel(got[0], verify_attention_reference(*args, **kw)[0]) < 1e-5
    small = make_inputs(1, 32, 4, 2, 16, 3, 5)  # head 16: the reference, the kernel refuses it
    assert verify_attention_choice(*small[:5], small[6], **kw) == "reference_xla"
    with pytest.raises(KernelError, match="head_dim"):
        verify_attention_pallas(*small, **kw, interpret=True)
    many = make_inputs(1, 64, 16, 1, 32, 5, 5)  # 5 tokens x 16 heads a group: more rows than a program holds
    assert verify_attention_choice(*many[:5], many[6], num_heads=16, num_kv_heads=1) == "reference_xla"
    with pytest.raises(KernelError, match="rows"):
        verify_attention_pallas(*many, num_heads=16, num_kv_heads=1, interpret=True)
    with pytest.raises(KernelError, match="qkv"):
        verify_attention_choice(args[0][:, :, :-1], *args[1:5], args[6], **kw)
    with pytest.raises(KernelError, match="cos"):
        verify_attention_choice(args[0], args[1], args[2], args[3][:, :2], args[4], args[6], **kw)
    with pytest.raises(KernelError, match="block"):
        verify_attention_pallas(*args, **kw, block=24, interpret=True)
    assert va.MAX_ROWS >= 9 * 3  # SmolLM2 at k = 8: 9 tokens x 3 heads a group


@pytest.mark.parametrize("b,slots,h,kv,t", [(1, 384, 9, 3, 3), (1, 384, 9, 3, 9), (4, 4352, 9, 3, 4),
                                             (1, 512, 32, 8, 5)])
def test_kernel_lowers_to_triton(b, slots, h, kv, t):
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    d = 64
    avals = (S((b, t, (h + 2 * kv) * d), bf), S((b, slots, kv, d), bf), S((b, slots, kv, d), bf),
             S((b, t, d // 2), f32), S((b, t, d // 2), f32), S((), jnp.int32), S((b, slots), bool))
    assert "xla.gpu.triton" in lower_for_h100(functools.partial(verify_attention_pallas, num_heads=h,
                                                                num_kv_heads=kv), *avals)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("b,slots,h,kv,t,index,dtype", [
    (1, 384, 9, 3, 3, 200, jnp.bfloat16), (1, 384, 9, 3, 9, 300, jnp.bfloat16), (4, 256, 9, 3, 4, 130, jnp.float32),
    (1, 512, 32, 8, 5, 400, jnp.bfloat16), (2, 384, 9, 3, 4, 0, jnp.bfloat16),
    (1, 4096, 9, 3, 4, 3000, jnp.bfloat16), (2, 2048, 32, 8, 3, 1500, jnp.bfloat16),  # split (`plan_splits`)
])
def test_kernel_equals_reference_gpu(b, slots, h, kv, t, index, dtype):
    args = make_inputs(b, slots, h, kv, 64, t, index, dtype=dtype, pad=[0, 7, 100, 3][:b])
    assert_equal_to_reference(args, h, kv, tol=1e-2 if dtype == jnp.bfloat16 else 1e-4, interpret=False)
