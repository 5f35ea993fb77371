"""Pallas decode attention == `mamba_llama_jax.ops.attention.decode_attention_reference`: output and both caches.

CPU: interpret mode at tiny shapes. GPU (`-m gpu`, on the device): compiled through Triton at SmolLM2's head
shapes. Every kernel test checks that the traced function holds a `pallas_call`, so a silent fallback to the
reference cannot pass as the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.attention import decode_attention_reference
from pallas_kernels import dispatch
from pallas_kernels.decode_attention import decode_attention, decode_attention_choice, decode_attention_pallas


def make_inputs(b, slots, h, kv, d, index, *, dtype=jnp.float32, seed=0, pad=None):
    k = jax.random.split(jax.random.key(seed), 6)
    qkv = jax.random.normal(k[0], (b, (h + 2 * kv) * d)).astype(dtype)
    kc = jax.random.normal(k[1], (b, slots, kv, d)).astype(dtype)
    vc = jax.random.normal(k[2], (b, slots, kv, d)).astype(dtype)
    pos = jax.random.randint(k[3], (b,), 0, 4000).astype(jnp.float32)
    inv = 1.0 / (1e4 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = pos[:, None] * inv
    slot = jnp.arange(slots)[None, :]
    # left padding of different lengths per row (pad[r] slots invalid); the new token (slot `index`) is real
    pad = np.zeros(b, int) if pad is None else np.asarray(pad)
    valid = ((slot >= jnp.asarray(pad)[:, None]) | (slot == index)) & (slot <= index)
    return qkv, kc, vc, jnp.cos(ang), jnp.sin(ang), jnp.int32(index), valid


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def assert_equal_to_reference(args, h, kv, *, window=0, tol=1e-5, interpret=True, **kw):
    fn = lambda *a: decode_attention_pallas(*a, num_heads=h, num_kv_heads=kv, window=window, interpret=interpret,
                                            **kw)
    assert "pallas_call" in str(jax.make_jaxpr(fn)(*args))
    got = jax.jit(fn)(*args)
    want = decode_attention_reference(*args, num_heads=h, num_kv_heads=kv, window=window)
    for g, w, name in zip(got, want, ("out", "k_cache", "v_cache")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel(g, w) < tol, (name, rel(g, w))
    # the cache outside the written slot is untouched, the written slot holds the new k/v
    idx = int(args[5])
    np.testing.assert_array_equal(np.asarray(got[2][:, idx], np.float32),
                                  np.asarray(args[0][:, (h + kv) * args[1].shape[-1]:], np.float32)
                                  .reshape(got[2][:, idx].shape))


@pytest.mark.parametrize("b,slots,h,kv,d,index,window,splits", [
    (2, 32, 4, 2, 16, 0, 0, 1),      # first slot: attends to itself only
    (2, 48, 4, 2, 16, 37, 0, 1),     # several blocks, dynamic bound
    (1, 64, 6, 2, 16, 50, 48, 1),    # static window shorter than the cache
    (1, 64, 3, 3, 16, 63, 0, 4),     # MHA (g = 1), split over the sequence, last slot
    (3, 64, 9, 3, 32, 21, 0, 2),     # SmolLM2's grouping (g = 3), splits with an empty tail
])
def test_kernel_equals_reference_interpret(b, slots, h, kv, d, index, window, splits):
    args = make_inputs(b, slots, h, kv, d, index, pad=[0, 5, 17][:b], seed=index)
    assert_equal_to_reference(args, h, kv, window=window, splits=splits, block=16)


def test_kernel_bf16_interpret():
    args = make_inputs(2, 32, 4, 2, 16, 20, dtype=jnp.bfloat16, pad=[3, 0])
    assert_equal_to_reference(args, 4, 2, tol=1e-2, block=16)


def test_dispatch_cpu_uses_reference_and_bad_args_raise(monkeypatch):
    args = make_inputs(1, 32, 4, 2, 16, 5)
    kw = dict(num_heads=4, num_kv_heads=2)
    assert decode_attention_choice(*args[:5], args[6], **kw) == "reference_xla"
    out = decode_attention(*args, **kw)
    assert dispatch.last_choice("decode_attention") == "reference_xla"
    want = decode_attention_reference(*args, **kw)
    np.testing.assert_allclose(out[0], want[0])
    with pytest.raises(KernelError, match="qkv"):
        decode_attention_choice(args[0][:, :-1], *args[1:5], args[6], **kw)
    with pytest.raises(KernelError, match="num_kv_heads"):
        decode_attention_choice(*args[:5], args[6], num_heads=4, num_kv_heads=3)


def _gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("b,slots,index,dtype", [
    (1, 384, 200, jnp.bfloat16), (64, 384, 300, jnp.bfloat16), (1, 4352, 4200, jnp.bfloat16),
    (4, 256, 130, jnp.float32),
])
def test_kernel_equals_reference_gpu(b, slots, index, dtype):
    args = make_inputs(b, slots, 9, 3, 64, index, dtype=dtype, pad=[0, 7, 100, 3] * (b // 4) or [11])
    assert_equal_to_reference(args, 9, 3, tol=1e-2 if dtype == jnp.bfloat16 else 1e-4, interpret=False)
