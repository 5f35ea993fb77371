"""Greedy LM head + argmax in one kernel (`pallas_kernels/lm_head_argmax.py`) == argmax over the reference logits.

CPU: interpret mode at small shapes (ids exactly, ties to the lowest id, row padding and row groups), the lowering
for an H100 at SmolLM2's shape, bad arguments, the dispatcher and the greedy decode path wired through it. GPU
(`-m gpu`, on the device): compiled at SmolLM2's shape, bf16, against fp64 logits.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import LlamaConfig
from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.models.llama import LlamaLM
from pallas_kernels import dispatch
from pallas_kernels import lm_head_argmax as lm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import has_pallas_call, lower_for_h100, on_gpu  # noqa: E402


def rows_and_head(b, vocab, k, dtype=jnp.float32, seed=0):
    kh, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kh, (b, k)).astype(dtype), jax.random.normal(kw, (vocab, k)).astype(dtype)


@pytest.mark.parametrize("b,vocab,k", [(1, 512, 64), (3, 1024, 96), (16, 256, 128), (64, 512, 64),
                                       (128, 256, 64)])
def test_interpret_ids_equal_reference(b, vocab, k):
    h, wt = rows_and_head(b, vocab, k, seed=b)
    got = lm.lm_head_argmax_pallas(h, wt, interpret=True)
    assert got.shape == (b,) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(lm.lm_head_argmax_reference(h, wt)))


def test_ties_go_to_the_lowest_id_across_and_within_blocks():
    h, wt = rows_and_head(2, 512, 64)
    wt, h = np.array(wt), np.array(h)
    v, u = wt[0] * 0 + 1.0, np.linspace(-1, 1, 64)
    for i in (133, 7, 5):  # row 0's best: ids 5 and 7 in block 0, 133 in block 1 (blocks of 128)
        wt[i] = v
    for i in (300, 200):  # row 1's best: ids 200 and 300, in blocks 1 and 2
        wt[i] = u
    h[0], h[1] = 10 * v, 10 * u
    got = np.asarray(lm.lm_head_argmax_pallas(jnp.asarray(h), jnp.asarray(wt), interpret=True))
    np.testing.assert_array_equal(got, [5, 200])
    np.testing.assert_array_equal(got, np.asarray(lm.lm_head_argmax_reference(jnp.asarray(h), jnp.asarray(wt))))


def test_plan_and_bad_arguments():
    assert lm.plan(1, 49152, 576) == (16, 128, 64)
    assert lm.plan(64, 49152, 576) == (64, 128, 64)
    assert lm.plan(256, 128256, 2048) == (256, 128, 64)
    assert lm.plan(96, 49152, 576) is None  # above 64 rows only in groups of 64
    assert lm.plan(4, 49152 + 8, 576) is None  # no power-of-two block of >= 16 ids tiles V
    h, wt = rows_and_head(2, 256, 64)
    with pytest.raises(KernelError, match="width 64 but wt rows have 32"):
        lm.lm_head_argmax_pallas(h, wt[:, :32], interpret=True)
    with pytest.raises(KernelError, match=r"h must be \(b, K\)"):
        lm.lm_head_argmax(h[0], wt)
    with pytest.raises(KernelError, match="no tiling"):
        lm.lm_head_argmax_pallas(jnp.zeros((96, 64)), wt, interpret=True)


def test_lowers_for_an_h100_at_smollm2_shape():
    for b in (1, 64):
        txt = lower_for_h100(lambda h, w: lm.lm_head_argmax_pallas(h, w),
                             jax.ShapeDtypeStruct((b, 576), jnp.bfloat16), jax.ShapeDtypeStruct((49152, 576), jnp.bfloat16))
        assert "lm_head_argmax" in txt


def test_dispatcher_records_and_falls_back(monkeypatch):
    h, wt = rows_and_head(2, 256, 64)
    monkeypatch.delenv(dispatch.INTERPRET_ENV, raising=False)
    monkeypatch.setenv(lm.KERNEL_ENV, "1")
    assert lm.choice(2, 256, 64) == (lm.PALLAS_TRITON if on_gpu() and lm.GPU_VERIFIED else lm.REFERENCE)
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    assert lm.choice(2, 256, 64) == lm.PALLAS_TRITON and lm.choice(96, 256, 64) == lm.REFERENCE
    monkeypatch.delenv(lm.KERNEL_ENV)
    assert lm.choice(2, 256, 64) == lm.REFERENCE  # opt-in
    monkeypatch.setenv(lm.KERNEL_ENV, "1")
    assert has_pallas_call(lambda a, b: lm.lm_head_argmax(a, b), h, wt)
    assert dispatch.last_choice(lm.OP) == lm.PALLAS_TRITON
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert not has_pallas_call(lambda a, b: lm.lm_head_argmax(a, b), h, wt)
    assert dispatch.last_choice(lm.OP) == lm.REFERENCE


# a tiny tied model whose vocabulary the kernel tiles
TIED = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, dtype="float32", tie_word_embeddings=True)


def reference_ids_then_kernel(monkeypatch, model, prompts, n):
    """`model`'s plain greedy ids on the reference path; then the environment that routes greedy ids through the
    kernel in interpret mode, with jax's caches and the op's recorded choice cleared."""
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    jax.clear_caches()
    want = Generator(model).run(prompts, SamplingConfig(max_new_tokens=n)).ids()
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV)
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    monkeypatch.setenv(lm.KERNEL_ENV, "1")
    jax.clear_caches()
    dispatch.forget_choices(lm.OP)
    return want


# 71 s on 2 cores (2026-12-07): `make test-slow`; the speculative loop through the kernel stays in the default run
@pytest.mark.slow
def test_greedy_generation_through_the_kernel_equals_the_reference_path(monkeypatch):
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    model = LlamaLM(TIED, rngs=nnx.Rngs(0))
    prompts = [[5, 6, 7, 8], [100, 3]]
    want = reference_ids_then_kernel(monkeypatch, model, prompts, 6)
    got = Generator(model).run(prompts, SamplingConfig(max_new_tokens=6)).ids()
    assert dispatch.last_choice(lm.OP) == lm.PALLAS_TRITON
    assert got == want
    jax.clear_caches()


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("b", [1, 16, 64])
def test_kernel_equals_reference_gpu(b):
    h, wt = rows_and_head(b, 49152, 576, jnp.bfloat16, seed=b)
    got = np.asarray(lm.lm_head_argmax_pallas(h, wt))
    logits = np.asarray(h, np.float64) @ np.asarray(wt, np.float64).T
    top2 = np.sort(logits, axis=1)[:, -2:]
    exact = (top2[:, 1] - top2[:, 0]) > 1e-3 * np.abs(top2[:, 1]).max()
    assert exact.mean() > 0.9
    np.testing.assert_array_equal(got[exact], logits.argmax(axis=1)[exact])
    chosen = logits[np.arange(b), got]
    assert np.all(chosen >= logits.max(axis=1) - 1e-3 * np.abs(logits).max())


def test_greedy_speculative_decoding_through_the_kernel_equals_plain_greedy(monkeypatch):
    """Target ids (first token, verify chunk) and the draft's picks through the kernel (interpret mode): the output
    is the reference path's plain greedy decoding."""
    from mamba_llama_jax.inference import speculative as spec
    from pallas_kernels.triton_call import CHECK_BOUNDS_ENV

    target, draft = LlamaLM(TIED, rngs=nnx.Rngs(0)), LlamaLM(TIED, rngs=nnx.Rngs(1))
    prompts = [[5, 6, 7, 8], [100, 3, 9]]
    want = reference_ids_then_kernel(monkeypatch, target, prompts, 8)
    monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")  # the kernel runs checked in the tests above
    try:
        for d in (target, draft):  # every draft accepted / most rejected
            out, lengths, _ = spec.SpeculativeDecoder(target, d).run(prompts, k=3, max_new_tokens=8)
            assert [out[r, :m].tolist() for r, m in enumerate(lengths)] == want
        assert dispatch.last_choice(lm.OP) == lm.PALLAS_TRITON
    finally:
        spec._speculate.clear_cache()
        jax.clear_caches()
