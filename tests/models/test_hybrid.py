"""HybridLM: 100 % attention is the teacher; caches of mixed attention/Mamba layers decode exactly."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig
from mamba_llama_jax.convert.from_attention import build_hybrid
from mamba_llama_jax.models.cache import KVCache, MambaCache
from mamba_llama_jax.models.llama import LlamaLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_helpers import jitted  # noqa: E402

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=8, num_heads=4, num_kv_heads=2,
                  dtype="float32")


@pytest.fixture(scope="module")
def teacher():
    return LlamaLM(CFG, rngs=nnx.Rngs(0))


def tokens(b, t, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def hybrid(teacher, fraction, variant="mamba2"):
    cfg = HybridConfig(attn_fraction=fraction, mamba=MambaConfig(variant=variant, chunk_size=4))
    return build_hybrid(teacher, cfg, rngs=nnx.Rngs(7))


def test_all_attention_hybrid_is_the_teacher(teacher):
    model = hybrid(teacher, 1.0)
    assert model.mamba_layers == ()
    tok = tokens(2, 9)
    np.testing.assert_array_equal(model(tok)[0], teacher(tok)[0])


@pytest.mark.parametrize("fraction,attn", [(0.5, [1, 3, 5, 7]), (0.25, [3, 7]), (0.125, [7]), (0.0, [])])
def test_prefill_then_decode_equals_full_forward(teacher, fraction, attn):
    model = hybrid(teacher, fraction)
    assert list(model.attn_layers) == attn
    run = jitted(model)
    tok = tokens(2, 10)
    full, _ = run(tok)
    cache = model.init_cache(2, 12)
    kinds = [type(c) for c in cache.layers]
    assert kinds == [KVCache if i in attn else MambaCache for i in range(CFG.num_layers)]
    logits, cache = run(tok[:, :4], cache=cache, prefill=True)
    outs = [logits]
    for i in range(4, 10):
        logits, cache = run(tok[:, i:i + 1], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)


def test_kstep_chunk_equals_full_forward_slice(teacher):
    model = hybrid(teacher, 0.25)
    run = jitted(model)
    tok = tokens(1, 9, seed=3)
    full, _ = run(tok)
    _, cache = run(tok[:, :5], cache=model.init_cache(1, 12), prefill=True)
    chunk, _ = run(tok[:, 5:9], cache=cache)
    np.testing.assert_allclose(chunk, full[:, 5:9], atol=2e-5, rtol=2e-5)


def test_packed_batch_equals_documents(teacher):
    model = hybrid(teacher, 0.5, variant="mamba1")
    run = jitted(model)
    a, b = tokens(1, 5, seed=4), tokens(1, 6, seed=5)
    seg = jnp.array([[0] * 5 + [1] * 6])
    packed, _ = run(jnp.concatenate([a, b], 1), segment_ids=seg)
    np.testing.assert_allclose(packed[:, :5], run(a)[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(packed[:, 5:], run(b)[0], atol=2e-5, rtol=2e-5)


def test_left_padded_batch_equals_rows_alone(teacher):
    model = hybrid(teacher, 0.5)
    run = jitted(model)
    a, b = tokens(1, 7, seed=2), tokens(1, 4, seed=3)
    batch = jnp.concatenate([a, jnp.concatenate([jnp.zeros((1, 3), jnp.int32), b], 1)], 0)
    mask = jnp.concatenate([jnp.ones((1, 7), bool), jnp.arange(7)[None] >= 3], 0)
    logits, cache = run(batch, token_mask=mask, cache=model.init_cache(2, 10), prefill=True)
    step, _ = run(jnp.array([[5], [6]]), cache=cache)
    alone_b, _ = run(jnp.concatenate([b, jnp.array([[6]])], 1))
    np.testing.assert_allclose(logits[1, 3:], alone_b[0, :4], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(step[1, 0], alone_b[0, 4], atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------- the real teacher (slow)


@pytest.fixture(scope="module")
def smollm2():
    from mamba_llama_jax.convert import load_teacher
    from mamba_llama_jax.errors import ModelFormatError

    try:
        return load_teacher(dtype="float32").model
    except ModelFormatError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_all_attention_hybrid_is_the_teacher(smollm2):
    model = build_hybrid(smollm2, HybridConfig(attn_fraction=1.0), rngs=nnx.Rngs(0))
    tok = jax.random.randint(jax.random.key(0), (1, 8), 0, smollm2.cfg.vocab_size)
    np.testing.assert_array_equal(jitted(model)(tok)[0], jitted(smollm2)(tok)[0])


@pytest.mark.slow
@pytest.mark.parametrize("fraction,n_attn", [(0.5, 15), (0.25, 7), (0.125, 3), (0.0, 0)])
def test_smollm2_prefill_then_decode_equals_full_forward(smollm2, fraction, n_attn):
    cfg = HybridConfig(attn_fraction=fraction, mamba=MambaConfig(chunk_size=4))
    model = build_hybrid(smollm2, cfg, rngs=nnx.Rngs(0))
    assert len(model.attn_layers) == n_attn
    run = jitted(model)
    tok = jax.random.randint(jax.random.key(1), (1, 10), 0, smollm2.cfg.vocab_size)
    full, _ = run(tok)
    logits, cache = run(tok[:, :6], cache=model.init_cache(1, 16), prefill=True)
    outs = [logits]
    for i in range(6, 10):
        logits, cache = run(tok[:, i:i + 1], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-3, rtol=2e-3)
