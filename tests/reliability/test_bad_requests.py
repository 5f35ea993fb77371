"""Bad generation requests, through the API and the CLI: a clear `GenerationError` (CLI: exit 2 and one line
on stderr) or correct handling — empty prompts, prompts past the context, max tokens <= 0, unknown sampling
options, batches of prompts of different lengths."""

from __future__ import annotations

from pathlib import Path

import pytest

from mamba_llama_jax.cli import main
from mamba_llama_jax.errors import GenerationError
from mamba_llama_jax.inference.generate import SamplingConfig

TINY = Path(__file__).parents[1] / "fixtures" / "tiny_llama_tied"
BASE = ["generate", "--teacher", str(TINY), "--dtype", "float32", "--no-chat"]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_unknown_sampling_options_are_named():
    with pytest.raises(GenerationError, match=r"unknown sampling option\(s\) \['top_z'\]; valid options are"):
        SamplingConfig.from_dict({"temperature": 0.5, "top_z": 3})
    with pytest.raises(GenerationError, match="mapping"):
        SamplingConfig.from_dict(["temperature"])  # type: ignore[arg-type]
    assert SamplingConfig.from_dict({"top_k": 5}).top_k == 5


def test_cli_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([*BASE, "--prompt", "hi", "--top-z", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --top-z" in capsys.readouterr().err


@pytest.mark.parametrize("n", ["0", "-5"])
def test_cli_max_tokens_not_positive(capsys, n):
    assert main([*BASE, "--prompt", "hi", "--max-new-tokens", n]) == 2
    assert "max_new_tokens must be a positive integer" in _err(capsys)


def test_cli_prompt_past_the_context(capsys):
    from mamba_llama_jax.convert.hf import _read_json

    ctx = _read_json(TINY / "config.json", what="config")["max_position_embeddings"]
    assert main([*BASE, "--prompt", "hi", "--max-new-tokens", str(ctx)]) == 2
    assert f"exceeds the model's context of {ctx} tokens" in _err(capsys)


def test_cli_empty_prompt(capsys):
    """An empty text prompt is either refused by name or, when the tokenizer adds a BOS, answered."""
    rc = main([*BASE, "--prompt", "", "--max-new-tokens", "3"])
    if rc == 2:
        assert "empty" in _err(capsys)
    else:
        assert rc == 0


def test_cli_batch_of_different_lengths_equals_one_by_one(capsys):
    prompts = ["hi", "a much longer prompt with many more words in it than the first one"]
    args = ["--max-new-tokens", "4"]
    assert main([*BASE, *args, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    batched = capsys.readouterr().out
    alone = []
    for p in prompts:
        assert main([*BASE, *args, "--prompt", p]) == 0
        alone.append(capsys.readouterr().out.rstrip("\n"))
    for p, a in zip(prompts, alone):
        assert f"--- [{prompts.index(p)}] {p}\n{a}\n" in batched
