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
    for cmd in (["generate", "--prompt", "x"], ["chat"], ["demo"]):
        assert parser.parse_args(cmd).command == cmd[0]
    with pytest.raises(SystemExit):
        parser.parse_args(["distill"])
