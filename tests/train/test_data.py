"""Data: assistant-only masks from the chat template, local json/jsonl/parquet sources, packing with segment ids,
per-host shards, checkpointable iterator state, and the offline teacher-generated source."""

import json
from pathlib import Path

import numpy as np
import pytest

from mamba_llama_jax.config import DataConfig
from mamba_llama_jax.data import pipeline, sources
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import DataError

FIX = Path(__file__).parents[1] / "fixtures" / "tiny_llama_tied"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_hf_dir(FIX)


def conv(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i} about cats"},
            {"role": "assistant", "content": f"answer {i}: cats purr" + " a" * (i % 5)}]


def test_assistant_only_mask(tok):
    msgs = conv(1) + [{"role": "user", "content": "more"}, {"role": "assistant", "content": "sure"}]
    ids, mask = pipeline.chat_tokens(tok, msgs)
    assert ids == tok.encode_chat(msgs, add_generation_prompt=False)  # piecewise == whole here
    text = [tok.decode(ids[i:i + 1], skip_special_tokens=False) for i in range(len(ids))]
    trained = "".join(t for t, m in zip(text, mask) if m)
    assert trained == "answer 1: cats purr a<|im_end|>\nsure<|im_end|>\n"
    assert "question" not in trained and "assistant" not in trained


def test_local_sources(tmp_path, tok):
    rows = [{"messages": conv(i)} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = sources.load_examples(str(tmp_path / "a.jsonl"), "chat")
    assert len(ex) == 6 and ex[2] == {"messages": conv(2)}
    import pyarrow as pa
    import pyarrow.parquet as pq
    pairs = [{"chosen": conv(i), "rejected": conv(i)[:1] + [{"role": "assistant", "content": "no"}]} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "p.parquet")
    px = sources.load_examples(str(tmp_path / "p.parquet"), "pairs")
    assert px[1]["prompt"] == conv(1)[:1] and px[1]["rejected"][0]["content"] == "no"
    with pytest.raises(DataError, match="messages"):
        sources.load_examples(str(tmp_path / "p.parquet"), "chat")
    with pytest.raises(DataError, match="not found"):
        sources.load_examples(str(tmp_path / "missing.jsonl"), "chat")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="role"):
        sources.load_examples(str(bad), "chat")


def test_packing_segments_and_masks(tok):
    ex = [{"messages": conv(i)} for i in range(12)]
    cfg = DataConfig(source="-", seq_len=160, num_epochs=1)
    batches = list(pipeline.build_dataset(ex, tok, cfg, batch_size=2))
    assert batches and all(b["tokens"].shape == (2, 160) for b in batches)
    seen = 0
    for b in batches:
        seg, tokens, mask = b["segment_ids"], b["tokens"], b["loss_mask"]
        assert seg.max() >= 2, "several documents per row"
        assert (mask[seg == 0] == 0).all()
        for r in range(2):
            for s in range(1, seg[r].max() + 1):
                doc = tokens[r][seg[r] == s].tolist()
                assert doc[:1] == [1]  # each packed document starts with its own <|im_start|>
                seen += 1
    assert seen <= 12
    unpacked = next(iter(pipeline.build_dataset(ex, tok, DataConfig(source="-", seq_len=64, pack=False),
                                                batch_size=3)))
    assert set(np.unique(unpacked["segment_ids"])) <= {0, 1}


def test_host_shards_disjoint_and_resumable(tok):
    ex = [{"tokens": list(range(1, 3 + i)), "loss_mask": [1] * (2 + i)} for i in range(16)]
    cfg = DataConfig(source="-", kind="tokens", seq_len=32, pack=False, num_epochs=1, shuffle_seed=3)
    firsts = []
    for host in range(2):
        for b in pipeline.build_dataset(ex, tok, cfg, batch_size=4, shard_index=host, shard_count=2):
            firsts += [int((row > 0).sum()) for row in b["segment_ids"]]
    assert sorted(firsts) == sorted(2 + i for i in range(16))  # every example once, across both hosts
    ds = pipeline.build_dataset(ex, tok, dataclass_replace(cfg, num_epochs=0, pack=True), batch_size=2)
    it = iter(ds)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for w in want:
        got = next(it2)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])


def dataclass_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_pairs_pipeline(tok):
    ex = [{"prompt": conv(i)[:1], "chosen": conv(i)[1:], "rejected": [{"role": "assistant", "content": "no"}]}
          for i in range(4)]
    cfg = DataConfig(source="-", kind="pairs", seq_len=48, max_prompt_len=16)
    b = next(iter(pipeline.build_dataset(ex, tok, cfg, batch_size=2)))
    assert b["chosen_tokens"].shape == (2, 48)
    for name in ("chosen", "rejected"):
        m, seg = b[f"{name}_loss_mask"], b[f"{name}_segment_ids"]
        assert m.sum() > 0 and (m[seg == 0] == 0).all()
    # same prompt, different answers
    n = 16
    np.testing.assert_array_equal(b["chosen_tokens"][:, :5], b["rejected_tokens"][:, :5])
    assert (b["chosen_loss_mask"][:, :n].sum() < n * 2)


def test_offline_prompts_and_corruption():
    p = sources.offline_prompts(50, seed=1)
    assert len(set(p)) == 50 and p == sources.offline_prompts(50, seed=1)
    rng = np.random.default_rng(0)
    ids = list(range(30))
    bad = sources.corrupt_answer(ids, rng)
    assert bad[:10] == ids[:10] and 15 <= len(bad) <= 30 and bad != ids[:len(bad)]


def test_offline_generation_resumes(tmp_path, tok):
    from mamba_llama_jax.convert import load_teacher

    teacher = load_teacher(FIX, dtype="float32")
    out = sources.generate_offline(teacher.model, tok, tmp_path / "off", num_prompts=6, max_new_tokens=6,
                                   batch_size=4, temperature=0.8)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 2
    first = parts[0].stat().st_mtime_ns
    sources.generate_offline(teacher.model, tok, out, num_prompts=6, max_new_tokens=6, batch_size=4)
    assert parts[0].stat().st_mtime_ns == first  # resumed: existing parts not redone
    ex = sources.load_examples(str(out), "tokens")
    assert len(ex) == 6
    row = ex[0]
    n_prompt = row["loss_mask"].index(1)
    assert 1 <= sum(row["loss_mask"]) <= 7 and n_prompt > 3
    pairs = sources.load_examples(str(out), "pairs")
    assert pairs[0]["prompt_ids"] == row["tokens"][:n_prompt]


def test_token_corpus_roundtrip(tmp_path):
    rows = [{"tokens": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, {"tokens": [9, 70000], "loss_mask": [1, 1]},
            {"tokens": [1, 2, 3], "loss_mask": [0, 0, 0]}]
    small = [{"tokens": [4, 3], "loss_mask": [0, 1]}]
    sources.write_token_corpus(tmp_path / "c" / "train-1.npz", rows)
    sources.write_token_corpus(tmp_path / "c" / "train-0.npz", small)
    assert np.load(tmp_path / "c" / "train-0.npz")["tokens"].dtype == np.uint16  # 2 bytes a token when it fits
    assert np.load(tmp_path / "c" / "train-1.npz")["tokens"].dtype == np.int32  # 70000 does not
    (tmp_path / "c" / "eval").mkdir()
    sources.write_token_corpus(tmp_path / "c" / "eval" / "heldout.npz", rows)  # a subdirectory is not read
    (tmp_path / "c" / "train-2.tmp.npz").write_bytes(b"half written")  # a killed write is not read either
    ex = sources.load_examples(str(tmp_path / "c"), "tokens")
    assert [ex[i] for i in range(len(ex))] == small + rows  # files in name order
    one = sources.load_examples(str(tmp_path / "c" / "train-1.npz"), "tokens")
    assert [one[i] for i in range(len(one))] == rows


def test_token_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="0…0 1…1"):
        sources.write_token_corpus(tmp_path / "x.npz", [{"tokens": [1, 2, 3], "loss_mask": [1, 0, 1]}])
    with pytest.raises(DataError, match="must end in .npz"):
        sources.write_token_corpus(tmp_path / "x.bin", [{"tokens": [1], "loss_mask": [1]}])
    with pytest.raises(DataError, match="not found"):
        sources.load_examples(str(tmp_path / "missing.npz"), "tokens")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a token corpus"):
        sources.load_examples(str(tmp_path / "bad.npz"), "tokens")
    np.savez(tmp_path / "off.npz", tokens=np.arange(4), offsets=np.array([0, 3, 5]), prompt_lens=np.array([1, 1]))
    with pytest.raises(DataError, match="inconsistent"):
        sources.load_examples(str(tmp_path / "off.npz"), "tokens")
    sources.write_token_corpus(tmp_path / "ok.npz", [{"tokens": [1, 2], "loss_mask": [0, 1]}])
    with pytest.raises(DataError, match="chosen/rejected"):
        sources.load_examples(str(tmp_path / "ok.npz"), "pairs")
