"""`run.py eval` end to end on the tiny fixture (a 50 % hybrid vs its teacher), and its clear errors."""

import json
from pathlib import Path

import pytest

from mamba_llama_jax.cli import main

ROOT = Path(__file__).parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny_llama"
TASKS = ROOT / "tests" / "fixtures" / "lm_eval_tasks"


@pytest.mark.slow  # 47 s on 2 cores (CI, 2026-12-06, jax 0.12.1): `make test-slow`; the errors stay
def test_eval_report(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    (tmp_path / "prompts.txt").write_text("Say hi.\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "copy_choice.yaml").write_text((TASKS / "copy_choice.yaml").read_text().replace(
        "tests/fixtures/lm_eval_tasks/copy_choice.jsonl", str(TASKS / "copy_choice.jsonl")))
    out = tmp_path / "report.json"
    rc = main(["eval", "--teacher", str(TINY), "--hybrid", "50", "--dtype", "float32", "--out", str(out),
               "--ppl", "pydoc", str(tmp_path / "text.txt"), "heldout", "--heldout-dir", str(tmp_path / "held"),
               "--heldout-prompts", "2", "--max-tokens", "300", "--context", "64", "--batch-size", "4",
               "--niah", "--niah-base-len", "256", "--niah-multipliers", "1", "--niah-depths", "0.5",
               "--niah-trials", "1", "--lm-eval", "copy_choice", "--lm-eval-include", str(tmp_path / "tasks"),
               "--chat", str(tmp_path / "prompts.txt"), "--max-new-tokens", "4"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert set(rep["perplexity"]) == {"pydoc", "text.txt", "heldout"}
    for r in rep["perplexity"].values():
        assert r["ppl"] > 1 and r["ratio_to_teacher"] > 0 and r["context"] == 64
    assert rep["niah"]["lengths"] == [256] and "teacher_rate" in rep["niah"] and Path(rep["niah"]["png"]).is_file()
    assert "copy_choice" in rep["lm_eval"]["results"]
    assert rep["chat"]["summary"]["prompts"] == 1 and "fidelity" in rep["chat"]["summary"]["label"]
    assert (tmp_path / "held" / "meta.json").is_file()  # the teacher's held-out answers are cached


def test_eval_errors(tmp_path, capsys):
    base = ["eval", "--teacher", str(TINY), "--dtype", "float32", "--out", str(tmp_path / "r.json")]
    assert main(base) == 2
    assert "at least one of" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(base + ["--chat", str(tmp_path / "empty.txt")]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(base + ["--ppl", str(tmp_path / "empty.txt")]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(base + ["--ppl", "pydoc", "--context", "10000000"]) == 2
    err = capsys.readouterr().err
    assert "context" in err and "Traceback" not in err


# ~19 s of lm-eval indexing its built-in tasks (2026-12-08): `make test-slow`. An unknown task's project error stays
# in make test (tests/eval/test_lm_eval.py::test_local_task_through_lm_eval, local tasks only), and so does the CLI's
# one-line exit 2 on a ConfigError (the test above).
@pytest.mark.slow
def test_eval_unknown_lm_eval_task(tmp_path, capsys):
    base = ["eval", "--teacher", str(TINY), "--dtype", "float32", "--out", str(tmp_path / "r.json")]
    assert main(base + ["--lm-eval", "no_such_task_xyz", "--lm-eval-include", str(TASKS)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
