"""Needle in a haystack: a model that can attend (copies what followed the same context) finds every needle; a
length past the model's context is refused unless extrapolation is asked for; the heat map is a valid PNG."""

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_oracle import copy_model  # noqa: E402

from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.eval.niah import (CAVEAT, NiahConfig, build_prompt, digit_prefix, first_number, run_niah,
                                      save_heatmap)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tiny_llama"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_hf_dir(FIXTURE)


def test_copying_model_retrieves_every_needle(tok, tmp_path):
    model = copy_model(300, max_len=512)
    cfg = NiahConfig(base_length=256, multipliers=(1, 2), depths=(0.0, 0.5, 1.0), trials=2, batch_size=6)
    r = run_niah(model, tok, cfg)
    assert r["lengths"] == [256, 512] and np.all(np.asarray(r["rate"]) == 1.0), r["cells"]
    assert r["digits_by_length"] == {"256": 1.0, "512": 1.0}
    assert all(c["prompt_tokens"] <= c["length"] - cfg.max_new_tokens for c in r["cells"])
    png, how = save_heatmap(r, tmp_path / "niah.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    if how != "matplotlib":
        w, h = struct.unpack(">II", data[16:24])
        assert (w, h) == (2 * 32, 3 * 32) and "matplotlib" in how
        zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])  # the image data decodes


def test_needle_depth_and_number(tok):
    rng = np.random.default_rng(0)
    for depth in (0.0, 0.5, 1.0):
        p = build_prompt(tok, 3000, depth, rng, 8)
        text = tok.decode(p.ids)
        pos = text.index(f"is {p.value}.") / len(text)
        assert abs(pos - depth) < 0.1 and text.endswith(f"for {p.key} is")
    assert first_number(" 12,345. The") == "12345" and first_number("none") is None


def test_digit_prefix_counts_leading_digits_copied():
    # what the session-6 hybrids answered: the needle's first digits, then the number ends
    assert digit_prefix(" 816. The clock ticks", "81669") == pytest.approx(0.6)
    assert digit_prefix(" 275666. The clock", "27956") == pytest.approx(0.4)  # stops at the first wrong digit
    assert digit_prefix(" 81669.", "81669") == 1.0
    assert digit_prefix(" 1. The magic number", "75611") == 0.0
    assert digit_prefix(" no number at all", "75611") == 0.0


def test_beyond_context_needs_extrapolate(tok):
    model = copy_model(300, max_len=300)
    cfg = NiahConfig(base_length=256, multipliers=(1, 2), depths=(1.0,), trials=1)
    with pytest.raises(ConfigError, match="exceed the model's context of 300"):
        run_niah(model, tok, cfg)
    r = run_niah(model, tok, NiahConfig(base_length=256, multipliers=(2,), depths=(1.0,), trials=1,
                                        extrapolate=True))
    assert r["beyond_context"] == [512] and r["caveat"] == CAVEAT
    with pytest.raises(ConfigError, match="depths"):
        NiahConfig(depths=(1.5,))
