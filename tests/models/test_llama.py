import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import LlamaConfig, RopeScaling
from mamba_llama_jax.models.llama import LlamaLM, rope_inv_freq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_helpers import jitted  # noqa: E402

CFG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  dtype="float32", rope_theta=1e4)


@pytest.fixture(scope="module")
def model():
    return LlamaLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def run(model):
    return jitted(model)


def tokens(b, t, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def test_prefill_then_decode_equals_full_forward(model, run):
    tok = tokens(2, 12)
    full, _ = run(tok)
    cache = model.init_cache(2, 16)
    logits, cache = run(tok[:, :5], cache=cache, prefill=True)
    outs = [logits]
    for i in range(5, 12):
        logits, cache = run(tok[:, i:i + 1], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    # A multi-token chunk against a non-empty cache (the speculative-verify shape) agrees too.
    cache = model.init_cache(2, 16)
    _, cache = run(tok[:, :5], cache=cache, prefill=True)
    chunk, cache = run(tok[:, 5:9], cache=cache)
    np.testing.assert_allclose(chunk, full[:, 5:9], atol=1e-5)
    assert int(cache.index) == 9 and cache.positions.tolist() == [9, 9]


def test_left_padded_batch_equals_rows_alone(model, run):
    a, b = tokens(1, 7, seed=2), tokens(1, 4, seed=3)
    pad = jnp.zeros((1, 3), jnp.int32)
    batch = jnp.concatenate([a, jnp.concatenate([pad, b], 1)], 0)
    mask = jnp.concatenate([jnp.ones((1, 7), bool), jnp.arange(7)[None] >= 3], 0)
    cache = model.init_cache(2, 10)
    logits, cache = run(batch, token_mask=mask, cache=cache, prefill=True)
    step, _ = run(jnp.array([[5], [6]]), cache=cache)
    alone_a, _ = run(jnp.concatenate([a, jnp.array([[5]])], 1))
    alone_b, _ = run(jnp.concatenate([b, jnp.array([[6]])], 1))
    np.testing.assert_allclose(logits[0], alone_a[0, :7], atol=1e-5)
    np.testing.assert_allclose(logits[1, 3:], alone_b[0, :4], atol=1e-5)
    np.testing.assert_allclose(step[0, 0], alone_a[0, 7], atol=1e-5)
    np.testing.assert_allclose(step[1, 0], alone_b[0, 4], atol=1e-5)


def test_packed_documents_equal_separate_runs(run):
    a, b = tokens(1, 5, seed=4), tokens(1, 6, seed=5)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[0] * 5 + [1] * 6])
    logits, _ = run(packed, segment_ids=seg)
    np.testing.assert_allclose(logits[0, :5], run(a)[0][0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:], run(b)[0][0], atol=1e-5)


def test_llama3_rope_scaling_bands():
    s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    plain = rope_inv_freq(128, 5e5, None)
    scaled = rope_inv_freq(128, 5e5, s)
    wavelen = 2 * np.pi / plain
    np.testing.assert_allclose(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])  # short: kept
    np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8)  # long: slowed 8x
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert mid.any() and np.all(scaled[mid] <= plain[mid]) and np.all(scaled[mid] >= plain[mid] / 8)
    np.testing.assert_allclose(rope_inv_freq(8, 1e4, RopeScaling(rope_type="linear", factor=2.0)),
                               rope_inv_freq(8, 1e4, None) / 2)


def test_parameters_carry_logical_axes(model):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["embed_tokens"]["embedding"].get_value()) == ("vocab", "embed")
    assert tuple(specs["layers"][0]["mixer"]["q_proj"]["kernel"].get_value()) == ("embed", "q_heads")
    assert tuple(specs["layers"][1]["mlp"]["down_proj"]["kernel"].get_value()) == ("mlp", "embed")
