"""CLI: user errors exit 2 with one clean line on stderr, never a traceback."""

import pytest

from mamba_llama_jax.cli import build_parser, main


def test_missing_teacher_file(tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    assert main(["generate", "--prompt", "hi", "--teacher", str(missing), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


def test_bad_sampling_option_fails_before_loading(tmp_path, capsys):
    assert main(["generate", "--prompt", "hi", "--top-p", "2", "--teacher", str(tmp_path / "x.gguf")]) == 2
    assert "top_p" in capsys.readouterr().err


def test_subcommands():
    parser = build_parser()
    for cmd in (["generate", "--prompt", "x"], ["chat"], ["demo"], ["convert", "--out", "d"],
                ["gen-labels", "--out", "d"], ["pipeline", "--config", "c.yaml"],
                ["speculate", "--prompt", "x", "--draft", "d"]):
        assert parser.parse_args(cmd).command == cmd[0]
    with pytest.raises(SystemExit):
        parser.parse_args(["distill"])


TINY = __import__("pathlib").Path(__file__).parent / "fixtures" / "tiny_llama"


def test_convert_then_generate_from_saved_hybrid(tmp_path, capsys):
    out = tmp_path / "hybrid50"
    assert main(["convert", "--teacher", str(TINY), "--hybrid", "50", "--out", str(out), "--dtype", "float32"]) == 0
    assert "1 attention layers [1]" in capsys.readouterr().out
    assert (out / "mamba_config.json").is_file() and (out / "model.safetensors").is_file()
    args = ["--prompt", "hello", "--max-new-tokens", "5", "--no-chat", "--dtype", "float32"]
    assert main(["generate", "--model", str(out), *args]) == 0
    saved = capsys.readouterr().out
    assert main(["generate", "--teacher", str(TINY), "--hybrid", "50", *args]) == 0
    built = capsys.readouterr().out
    assert saved == built and saved.strip()
    # An existing export is never replaced silently.
    assert main(["convert", "--teacher", str(TINY), "--hybrid", "50", "--out", str(out)]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_bad_hybrid_options(tmp_path, capsys):
    assert main(["generate", "--teacher", str(TINY), "--hybrid", "fifty", "--prompt", "x"]) == 2
    assert "--hybrid takes a percentage" in capsys.readouterr().err
    assert main(["generate", "--teacher", str(TINY), "--hybrid", "30", "--prompt", "x"]) == 2
    assert "attn_fraction must be 0 or 1/k" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--hybrid", "50", "--prompt", "x"]) == 2
    assert "not both" in capsys.readouterr().err


def test_gen_labels_offline_and_from_a_dataset(tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    out = tmp_path / "labels"
    base = ["gen-labels", "--teacher", str(TINY), "--dtype", "float32", "--max-new-tokens", "3", "--batch-size", "2"]
    assert main([*base, "--out", str(out), "--num-prompts", "3"]) == 0
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 3 and all(sum(r["loss_mask"]) >= 1 for r in rows)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                       {"role": "assistant", "content": "a"}]}) for i in range(2)))
    assert main([*base, "--out", str(tmp_path / "ds"), "--dataset", str(data)]) == 0
    rows = [r for p in sorted((tmp_path / "ds").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 2
    assert main([*base, "--out", str(tmp_path / "x"), "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "error:" in capsys.readouterr().err


def test_pipeline_bad_config(tmp_path, capsys):
    assert main(["pipeline", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "r.yaml"
    bad.write_text("stages: []\nbogus: 1\n")
    assert main(["pipeline", "--config", str(bad)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_speculate_matches_plain_greedy(tmp_path, capsys):
    draft = tmp_path / "draft"
    assert main(["convert", "--teacher", str(TINY), "--hybrid", "0", "--out", str(draft), "--dtype", "float32"]) == 0
    capsys.readouterr()
    args = ["--teacher", str(TINY), "--hybrid", "50", "--prompt", "hello", "--max-new-tokens", "6", "--no-chat",
            "--dtype", "float32"]
    assert main(["generate", *args]) == 0
    plain = capsys.readouterr().out
    assert main(["speculate", *args, "--draft", str(draft), "--k", "3"]) == 0
    res = capsys.readouterr()
    assert res.out == plain and "acceptance" in res.err
    assert main(["speculate", *args, "--draft", str(draft), "--k", "0"]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err
