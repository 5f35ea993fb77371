"""Tokenizers rebuilt from GGUF metadata (`convert/gguf.py`) behind the `data/tokenizer.py` interface: a tiny
SentencePiece-style ('llama') vocabulary written with GGUFWriter, byte-level BPE pre-tokenizers, and the real
SmolLM2 teacher's vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFValueType as V
from gguf import GGUFWriter

from mamba_llama_jax.convert import default_teacher_path
from mamba_llama_jax.convert.gguf import Metadata, open_gguf, tokenizer_from_metadata
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import TokenizerError

SP = "\u2581"
# SentencePiece-style vocabulary: specials, the 256 byte tokens, then pieces with scores (higher merges first).
MERGED = [SP + "h", "el", "lo", SP + "hel", SP + "hello", SP + "w", "or", SP + "wor", "ld", SP + "world"]
CHARS = [SP, "h", "e", "l", "o", "w", "r", "d", "!"]
SP_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + CHARS + MERGED + ["<tool>"]
SP_TYPES = [2, 3, 3] + [6] * 256 + [1] * (len(CHARS) + len(MERGED)) + [4]
SP_SCORES = [0.0] * 259 + [-100.0] * len(CHARS) + [-float(i + 1) for i in range(len(MERGED))] + [0.0]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def sp_id(piece: str) -> int:
    return SP_TOKENS.index(piece)


def write_tokenizer_gguf(path: Path, kv: dict[str, tuple[Any, V, V | None]]) -> Path:
    """A GGUF with metadata only (no tensors): enough for the tokenizer builder."""
    w = GGUFWriter(path, "llama")
    for key, (val, vtype, sub) in kv.items():
        w.add_key_value(key, val, vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tokenizer_of(path: Path) -> Tokenizer:
    return tokenizer_from_metadata(Metadata(open_gguf(path), str(path)))


def sp_metadata(**extra: tuple[Any, V, V | None]) -> dict[str, tuple[Any, V, V | None]]:
    kv = {
        "tokenizer.ggml.model": ("llama", V.STRING, None),
        "tokenizer.ggml.tokens": (SP_TOKENS, V.ARRAY, V.STRING),
        "tokenizer.ggml.scores": (SP_SCORES, V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.token_type": (SP_TYPES, V.ARRAY, V.INT32),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, V.UINT32, None),
        "tokenizer.chat_template": (TEMPLATE, V.STRING, None),
    }
    kv.update(extra)
    return kv


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> Tokenizer:
    return tokenizer_of(write_tokenizer_gguf(tmp_path_factory.mktemp("tok") / "sp.gguf", sp_metadata()))


# ------------------------------------------------------------------------------------- SentencePiece ('llama')


def test_sp_merges_follow_scores(sp: Tokenizer) -> None:
    assert sp.encode("hello world") == [sp_id(SP + "hello"), sp_id(SP + "world")]
    assert sp.encode("hello") == [sp_id(SP + "hello")]
    # "▁hel" needs "▁h" + "el" first; "hell" stops at "▁hel" + "l"
    assert sp.encode("hell") == [sp_id(SP + "hel"), sp_id("l")]


def test_sp_byte_fallback_and_decode(sp: Tokenizer) -> None:
    ids = sp.encode("hi é")
    assert ids == [sp_id(SP + "h"), sp_id("<0x69>"), sp_id(SP), sp_id("<0xC3>"), sp_id("<0xA9>")]
    assert sp.decode(ids) == "hi é"
    assert sp.decode(sp.encode("hello world!")) == "hello world!"


def test_sp_bos_special_and_user_tokens(sp: Tokenizer) -> None:
    assert sp.bos_token_id == 1 and sp.eos_token_ids == (2,)
    assert sp.encode("hello", add_special_tokens=True) == [1, sp_id(SP + "hello")]
    assert sp.encode("hello", add_special_tokens=False) == [sp_id(SP + "hello")]
    # control tokens match whole; text after them gets the space prefix again, as llama.cpp does
    assert sp.encode("hello</s>world") == [sp_id(SP + "hello"), 2, sp_id(SP + "world")]
    assert sp.encode("<tool>") == [sp_id("<tool>")]
    assert sp.decode([1, sp_id(SP + "hello"), 2]) == "hello"


def test_sp_chat_template(sp: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "hello"}]
    assert sp.render_chat(msgs) == "<s>[user] hello</s>[assistant]"
    ids = sp.encode_chat(msgs)
    assert ids[0] == 1 and ids.count(1) == 1 and 2 in ids


def test_failing_chat_template_is_a_tokenizer_error(sp: Tokenizer, monkeypatch) -> None:
    msgs = [{"role": "user", "content": "hello"}]
    monkeypatch.setattr(sp.hf, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="chat template failed.*roles must alternate"):
        sp.render_chat(msgs)
    monkeypatch.setattr(sp.hf, "chat_template", "{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError, match="chat template failed.*TemplateSyntaxError"):
        sp.encode_chat(msgs)


def test_sp_without_space_prefix_and_bos(tmp_path: Path) -> None:
    kv = sp_metadata(**{"tokenizer.ggml.add_space_prefix": (False, V.BOOL, None),
                        "tokenizer.ggml.add_bos_token": (False, V.BOOL, None)})
    tok = tokenizer_of(write_tokenizer_gguf(tmp_path / "nospace.gguf", kv))
    assert tok.encode("hello", add_special_tokens=True) == [sp_id("h"), sp_id("el"), sp_id("lo")]
    assert tok.encode(" hello") == [sp_id(SP + "hello")]


def test_sp_without_scores_uses_token_order(tmp_path: Path) -> None:
    kv = sp_metadata()
    del kv["tokenizer.ggml.scores"]
    tok = tokenizer_of(write_tokenizer_gguf(tmp_path / "noscores.gguf", kv))
    assert tok.encode("hello world") == [sp_id(SP + "hello"), sp_id(SP + "world")]


# ------------------------------------------------------------------------------------------ byte-level BPE


def bpe_metadata(pre: str) -> dict[str, tuple[Any, V, V | None]]:
    toks = ["<|end|>", "1", "2", "3", "4", "5", "d", "o", "n", "'", "t", "\u0120", "12", "123", "\u0120d", "on",
            "\u0120don", "'t"]
    merges = ["1 2", "12 3", "\u0120 d", "o n", "\u0120d on", "' t"]
    return {
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.pre": (pre, V.STRING, None),
        "tokenizer.ggml.tokens": (toks, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": ([3] + [1] * (len(toks) - 1), V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
        "tokenizer.ggml.eos_token_id": (0, V.UINT32, None),
    }


@pytest.mark.parametrize("pre, pieces", [
    ("llama-bpe", ["123", "45", "\u0120don", "'t"]),       # Llama 3: digits in groups of three
    ("default", ["12345", "\u0120don", "'t"]),              # GPT-2: digit runs whole
    ("smollm", ["1", "2", "3", "4", "5", "\u0120don", "'t"]),  # SmolLM2: every digit alone
])
def test_byte_level_pre_tokenizers(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    tok = tokenizer_of(write_tokenizer_gguf(tmp_path / f"{pre}.gguf", bpe_metadata(pre)))
    split = [p for p, _ in tok.hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345 don't")]
    assert split == pieces
    ids = tok.encode("12345 don't<|end|>")
    assert ids[-1] == 0 and tok.decode(ids) == "12345 don't"
    if pre == "llama-bpe":
        assert ids[:2] == [13, 4]  # "123", "4", "5"
        assert ids[2] == 5


def test_unknown_pre_tokenizer_and_model(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="pre-tokenizer 'mystery'"):
        tokenizer_of(write_tokenizer_gguf(tmp_path / "a.gguf", bpe_metadata("mystery")))
    kv = bpe_metadata("default") | {"tokenizer.ggml.model": ("rwkv", V.STRING, None)}
    with pytest.raises(TokenizerError, match="tokenizer model 'rwkv' is not supported"):
        tokenizer_of(write_tokenizer_gguf(tmp_path / "b.gguf", kv))


def test_bad_merges_are_tokenizer_errors(tmp_path: Path) -> None:
    kv = bpe_metadata("default")
    kv["tokenizer.ggml.merges"] = (["1 2", "x y"], V.ARRAY, V.STRING)  # "x" is not in the vocabulary
    with pytest.raises(TokenizerError):
        tokenizer_of(write_tokenizer_gguf(tmp_path / "m.gguf", kv))
    kv["tokenizer.ggml.merges"] = (["1 2 3"], V.ARRAY, V.STRING)
    with pytest.raises(TokenizerError, match="malformed merge"):
        tokenizer_of(write_tokenizer_gguf(tmp_path / "m2.gguf", kv))


# ----------------------------------------------------------------------------------------- the real teacher


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    p = default_teacher_path()
    return tokenizer_from_metadata(Metadata(open_gguf(p), str(p)))


def test_smollm_special_tokens_are_single_ids(smollm: Tokenizer) -> None:
    assert smollm.encode("<|im_start|>") == [1]
    assert smollm.encode("<|im_end|>") == [2]
    assert smollm.encode("<|endoftext|>") == [0]
    assert smollm.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1
    assert smollm.bos_token_id == 1 and smollm.eos_token_ids == (2,) and smollm.pad_token_id == 2
    assert smollm.vocab_size == 49152
    # no BOS added by default (tokenizer.ggml.add_bos_token is false; the chat template writes the markers)
    assert smollm.encode("Hi", add_special_tokens=True) == smollm.encode("Hi")


@pytest.mark.parametrize("text", ["", "Hello, world!", "  two  spaces\t\ttabs\n\n", "数字 123 and 4.56e-7",
                                  "emoji 🧑‍💻 ok", "def f(x):\n    return x ** 2\n"])
def test_smollm_round_trip(smollm: Tokenizer, text: str) -> None:
    assert smollm.decode(smollm.encode(text)) == text


def test_smollm_digits_split_individually(smollm: Tokenizer) -> None:
    ids = smollm.encode("2024")
    assert len(ids) == 4 and [smollm.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_smollm_chat_template(smollm: Tokenizer) -> None:
    text = smollm.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm.encode_chat([{"role": "user", "content": "Hi"}])
    last_start = len(ids) - 1 - ids[::-1].index(1)
    assert ids.count(1) == 3 and smollm.decode(ids[last_start + 1:]) == "assistant\n"
    assert smollm.decode(ids) == smollm.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in smollm.decode(ids) and "<|im_start|>" in smollm.decode(ids, False)
