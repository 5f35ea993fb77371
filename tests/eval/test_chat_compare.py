"""Chat comparison: prompt files in every accepted format, clear errors for bad ones, and a student identical to
the teacher scores exactly even (0.5) under both signals."""

import json
from pathlib import Path

import pytest

from mamba_llama_jax.convert import load_teacher
from mamba_llama_jax.errors import ConfigError, DataError
from mamba_llama_jax.eval.chat_compare import LABEL, APIJudge, compare, load_prompts

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tiny_llama"


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n second \n")
    assert load_prompts(tmp_path / "p.txt") == ["first", "second"]
    rows = [{"instruction": "do x", "input": "data"}, {"turns": ["t1", "t2"]}, {"prompt": "p"},
            {"messages": [{"role": "user", "content": "m"}]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_prompts(tmp_path / "p.jsonl") == ["do x\n\ndata", "t1", "p", "m"]
    assert load_prompts(tmp_path / "p.jsonl", limit=2) == ["do x\n\ndata", "t1"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"question": 1}\n')
    with pytest.raises(DataError, match="instruction"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "none.txt")


def test_identical_student_is_even(monkeypatch):
    t = load_teacher(FIXTURE, dtype="float32")
    res = compare(t.model, t.model, t.tokenizer, ["Say hi.", "Count to three."], max_new_tokens=6)
    s = res["summary"]
    assert s["label"] == LABEL and s["identical_answers"] == 1.0
    assert s["logprob_win_rate"] == 0.5 and s["judge_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert s["student_mean_tokens"] == s["teacher_mean_tokens"] > 0
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        APIJudge("some-model")
