"""The default teacher (SmolLM2-135M-Instruct, Q4_1 GGUF) read by `convert/gguf.py` against an independent
reference: transformers' own GGUF loader in torch fp32 (tests/fixtures/make_teacher_fixture.py).

Both sides dequantize the same Q4_1/Q8_0 blocks exactly, so fp32 logits differ only by summation order: observed
max |diff| over the top-20 logits of the last 4 prompt positions is ~7e-5 (logits are O(10)); we allow 5e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.convert import default_teacher_path, load_teacher

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "teacher"
LOGIT_ATOL = 5e-4
PROMPT_SLOTS = 128  # prompts are left-padded to one length so prefill compiles once


@pytest.fixture(scope="module")
def reference() -> dict:
    ref = json.loads((FIXTURE / "reference.json").read_text(encoding="utf-8"))
    topk = np.load(FIXTURE / "topk.npz")
    ref["topk_values"], ref["topk_indices"] = topk["values"], topk["indices"]
    return ref


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(dtype="float32")


@pytest.fixture(scope="module")
def run(teacher, reference) -> dict:
    """One batched prefill of all chat prompts (left-padded) and a greedy KV-cache decode loop, run once."""
    graphdef, state = nnx.split(teacher.model)
    last = reference["topk_values"].shape[1]
    n_new = reference["greedy_tokens"]

    @jax.jit
    def prefill(state, tokens, mask, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, token_mask=mask, cache=cache, prefill=True)
        return logits[:, -last:], cache

    @jax.jit
    def decode(state, token, cache):
        logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
        return logits[:, -1], cache

    prompts = [c["prompt_ids"] for c in reference["chats"]]
    assert max(map(len, prompts)) <= PROMPT_SLOTS
    tokens = np.zeros((len(prompts), PROMPT_SLOTS), np.int32)
    mask = np.zeros((len(prompts), PROMPT_SLOTS), bool)
    for i, p in enumerate(prompts):
        tokens[i, PROMPT_SLOTS - len(p):], mask[i, PROMPT_SLOTS - len(p):] = p, True
    cache = teacher.model.init_cache(len(prompts), PROMPT_SLOTS + n_new)
    logits, cache = prefill(state, jnp.asarray(tokens), jnp.asarray(mask), cache)
    logits = np.asarray(logits)
    step_logits = [logits[:, -1]]
    out = [step_logits[-1].argmax(-1)]
    for _ in range(n_new - 1):
        # Reference greedy ran past EOS for a fixed length record; so do we.
        lg, cache = decode(state, jnp.asarray(out[-1], jnp.int32), cache)
        step_logits.append(np.asarray(lg))
        out.append(step_logits[-1].argmax(-1))
    return {"graphdef": graphdef, "state": state, "last_logits": logits, "greedy": np.stack(out, 1),
            "step_logits": np.stack(step_logits, 1)}


def test_default_teacher_is_found() -> None:
    p = default_teacher_path()
    assert p.is_file() and p.suffix == ".gguf"


def test_config_from_metadata(teacher) -> None:
    c = teacher.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        (30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.tie_word_embeddings, c.rope_theta, c.rope_scaling) == (49152, True, 1e5, None)
    assert c.max_position_embeddings == 8192 and abs(c.rms_norm_eps - 1e-5) < 1e-9
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert teacher.tokenizer.eos_token_ids == (2,)


def test_varied_text_ids_match_reference(teacher, reference) -> None:
    tok = teacher.tokenizer
    assert tok.encode(reference["varied_text"]) == reference["varied_ids"]
    assert tok.encode(reference["digits_text"]) == reference["digits_ids"]
    assert tok.decode(reference["varied_ids"], skip_special_tokens=False) == reference["decoded_varied"]


def test_chat_template_ids_match_reference(teacher, reference) -> None:
    for chat in reference["chats"]:
        assert teacher.tokenizer.render_chat(chat["messages"]) == chat["template_text"]
        assert teacher.tokenizer.encode_chat(chat["messages"]) == chat["prompt_ids"]


def test_topk_logits_match_reference(run, reference) -> None:
    values, indices = reference["topk_values"], reference["topk_indices"]
    for i in range(values.shape[0]):
        mine = run["last_logits"][i]  # (last positions, vocab)
        np.testing.assert_allclose(np.take_along_axis(mine, indices[i], axis=-1), values[i], rtol=0,
                                   atol=LOGIT_ATOL, err_msg=f"chat {i}")
        # the same tokens rank first (ties aside, which these logits do not have)
        np.testing.assert_array_equal(np.argsort(-mine, axis=-1, kind="stable")[:, :5], indices[i][:, :5])


def test_greedy_tokens_match_reference(run, reference, teacher) -> None:
    for i, chat in enumerate(reference["chats"]):
        got = run["greedy"][i].tolist()
        assert got == chat["greedy_ids"], (
            f"chat {i}: {teacher.tokenizer.decode(got, skip_special_tokens=False)!r} != {chat['greedy_text']!r}")
    france = teacher.tokenizer.decode(run["greedy"][0].tolist())
    assert france.startswith("The capital of France is Paris.")


def test_kv_cache_decode_equals_full_recompute(run, reference) -> None:
    """Cached decode logits at every step == one cache-free forward over prompt + generated tokens (causality
    makes that forward equal to recomputing the growing sequence token by token); unpadded, so it also checks
    the left-padded batched prefill."""
    graphdef, state = run["graphdef"], run["state"]

    @jax.jit
    def full(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    prompt = reference["chats"][0]["prompt_ids"]
    gen = run["greedy"][0]
    seq = np.asarray(prompt + gen[:-1].tolist(), np.int32)[None]
    logits = np.asarray(full(state, jnp.asarray(seq)))[0, len(prompt) - 1:]
    np.testing.assert_array_equal(logits.argmax(-1), gen)
    np.testing.assert_allclose(logits, run["step_logits"][0], rtol=0, atol=LOGIT_ATOL)
