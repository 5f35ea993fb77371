"""Perplexity: a model that copies its input has a closed-form ppl on repeated text (-> 1); windows score every
target once; the scorer equals a direct forward pass; bad corpora and contexts fail with project errors."""

import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from eval_oracle import copy_model  # noqa: E402

from mamba_llama_jax.config import LlamaConfig
from mamba_llama_jax.data import sources
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import ConfigError, DataError
from mamba_llama_jax.eval.perplexity import (Corpus, evaluate_perplexity, load_corpus, perplexity_report,
                                             pydoc_corpus, windows)
from mamba_llama_jax.eval.scoring import Scorer
from mamba_llama_jax.models.llama import LlamaLM

V = 300
FIXTURE = Path(__file__).parents[1] / "fixtures" / "tiny_llama"


@pytest.fixture(scope="module")
def copy_scorer():
    return Scorer(copy_model(V, max_len=1024), batch_size=2)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_hf_dir(FIXTURE)


def repeated(period: int, repeats: int, seed: int = 0) -> list[int]:
    per = np.random.default_rng(seed).permutation(np.arange(3, V))[:period].tolist()
    return [1] + per * repeats


@pytest.mark.parametrize("context,stride", [(512, None), (128, 64)])
def test_copy_model_ppl_closed_form(copy_scorer, context, stride):
    # Distinct tokens in the first period are unpredictable (uniform: log V each; P + 1 targets counting the one
    # after the separator and the wrap-around), every later one is copied with p ~ 1.
    P, R = 40, 8
    doc = repeated(P, R)
    c = Corpus("rep", [doc], [[0] + [1] * (len(doc) - 1)])
    r = evaluate_perplexity(copy_scorer, c, context=context, stride=stride)
    assert r.tokens == len(doc) - 1
    assert r.ppl == pytest.approx(V ** ((P + 1) / (len(doc) - 1)), rel=1e-5)


def test_copy_model_ppl_tends_to_one(copy_scorer):
    ppls = []
    for reps in (2, 10, 60):
        doc = repeated(10, reps)
        ppls.append(evaluate_perplexity(copy_scorer, Corpus("r", [doc], [[0] + [1] * (len(doc) - 1)]),
                                        context=1024).ppl)
    assert ppls[0] > ppls[1] > ppls[2] and ppls[2] < 1.15


def test_documents_do_not_see_each_other(copy_scorer):
    # Two copies of one period as *separate documents*: the second must not be predicted from the first.
    doc = repeated(50, 1)
    one = evaluate_perplexity(copy_scorer, Corpus("a", [doc], [[0] + [1] * 50]), context=256)
    two = evaluate_perplexity(copy_scorer, Corpus("b", [doc, doc], [[0] + [1] * 50] * 2), context=256)
    assert two.ppl == pytest.approx(one.ppl, rel=1e-6) and two.tokens == 2 * one.tokens


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(2, 40), st.data())
def test_windows_cover_each_target_once(n, context, data):
    stride = data.draw(st.one_of(st.none(), st.integers(1, context - 1)))
    seen = []
    for s, e, first in windows(n, context, stride):
        assert e - s <= context and s < first <= e and (e - first) <= (stride or context - 1)
        seen += range(first, e)
    assert seen == list(range(1, n))


def test_scorer_equals_direct_forward_and_packing():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, dtype="float32", max_position_embeddings=128)
    model = LlamaLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 64, 20).tolist(), rng.integers(0, 64, 13).tolist()
    sc = Scorer(model, batch_size=2, length_multiple=16)
    got = sc.score([a, b])
    for row, s in zip((a, b), got):
        logits, _ = model(jax.numpy.asarray([row]))
        lp = jax.nn.log_softmax(logits[0, :-1], -1)
        want = np.take_along_axis(np.asarray(lp), np.asarray(row[1:])[:, None], 1)[:, 0]
        np.testing.assert_allclose(s.logp, want, atol=1e-5)
        np.testing.assert_array_equal(s.greedy, np.asarray(lp).argmax(-1) == np.asarray(row[1:]))
    packed = sc.score([a + b], [[0] * len(a) + [1] * len(b)])[0]
    np.testing.assert_allclose(packed.logp[len(a):], got[1].logp, atol=1e-5)  # b's own targets, b's own history


def test_corpora(tok, tmp_path):
    pd = pydoc_corpus(tok, max_tokens=500)
    assert pd.name == "pydoc" and pd.num_tokens == 500
    f = tmp_path / "notes.txt"
    f.write_text("Hello world. " * 20)
    c = load_corpus(str(f), tok)
    assert c.docs[0][0] == 1 and c.masks[0][0] == 0 and all(c.masks[0][1:])
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    cc = load_corpus(str(chats), tok)
    assert 0 < sum(cc.masks[0]) < len(cc.docs[0])  # answer tokens only
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(empty), tok)
    with pytest.raises(DataError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"), tok)
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="text"):
        load_corpus(str(bad), tok)


def test_context_longer_than_model(copy_scorer):
    c = Corpus("r", [repeated(10, 2)], [[0] + [1] * 20])
    with pytest.raises(ConfigError, match="context of 1024"):
        evaluate_perplexity(copy_scorer, c, context=2048)


def test_report_ratio():
    from mamba_llama_jax.eval.perplexity import PerplexityResult

    r = {"x": PerplexityResult("x", 12.0, math.log(12), 10, 1, 8, 7)}
    t = {"x": PerplexityResult("x", 10.0, math.log(10), 10, 1, 8, 7)}
    assert perplexity_report(r, t)["x"]["ratio_to_teacher"] == pytest.approx(1.2)


def test_heldout_families_never_in_training():
    train = set(sources.offline_prompts(sources.offline_prompt_count()))
    held = sources.heldout_prompts(len(sources.HELDOUT_TEMPLATES) * len(sources.HELDOUT_TOPICS))
    assert not set(sources.HELDOUT_TEMPLATES) & set(sources.TEMPLATES)
    assert not set(sources.HELDOUT_TOPICS) & set(sources.TOPICS)
    for p in held:
        assert p not in train and not any(t in p for t in sources.TOPICS)
    with pytest.raises(DataError):
        sources.heldout_prompts(10**6)
