"""Plain text for distillation: recall documents restate their own records (the copying targets), the stdlib
prose never includes the held-out perplexity corpus, and text rows respect the sequence length."""

from pathlib import Path

import pytest

from mamba_llama_jax.data import plain_text as pt
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import DataError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tiny_llama"


def test_recall_documents_restate_records_from_the_document():
    docs = pt.recall_documents(8, seed=3)
    assert len(docs) == 8 and docs == pt.recall_documents(8, seed=3) and docs != pt.recall_documents(8, seed=4)
    for doc in docs:
        records, notes = doc.split("\n\nNotes for the follow-up:\n")
        numbers = lambda text: {w.strip(".,():") for w in text.split() if any(c.isdigit() for c in w)}
        restated = numbers(notes)
        assert restated and restated <= numbers(records), doc  # every number restated was given before
    assert "magic number" not in " ".join(docs).lower()  # not the NIAH evaluation's wording


def test_stdlib_prose_is_read_without_the_perplexity_corpus():
    from pydoc_data.topics import topics

    texts = pt.stdlib_prose(max_chars=200_000)
    assert texts and sum(map(len, texts)) >= 200_000 and all(len(t) >= 200 for t in texts)
    sample = next(iter(sorted(topics.values(), key=len, reverse=True)))[:300]
    assert not any(sample in t for t in texts)


def test_text_rows_cut_to_the_sequence_length():
    tok = Tokenizer.from_hf_dir(FIXTURE)
    rows = pt.text_rows(tok, ["word " * 300, "short text"], seq_len=64)
    assert all(2 <= len(r["tokens"]) <= 64 and r["loss_mask"] == [1] * len(r["tokens"]) for r in rows)
    assert sum(len(r["tokens"]) for r in rows) >= len(tok.encode("word " * 300))
    with pytest.raises(DataError, match="seq_len"):
        pt.text_rows(tok, ["x"], seq_len=1)
    with pytest.raises(DataError, match="n must be"):
        pt.recall_documents(-1)
