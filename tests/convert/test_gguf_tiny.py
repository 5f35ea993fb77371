"""GGUF converter on the tiny Llama written in llama.cpp's layout (tests/fixtures/make_tiny_llama.py).

Two checks per quant type. Exact: the GGUF path's parameters and logits equal those of the HF checkpoint passed
through gguf's reference quantize -> dequantize (row permutation commutes with row-wise block quantization, so no
permuting is needed on this side), which pins dequantization and the Q/K un-permutation. End to end: logits against
the fp32 torch reference, with tolerances from the quantization error itself, measured on these fixtures:

    type   max |diff| (contiguous / strided)   mean |diff|      greedy argmax agreement
    F32    6.2e-6 / 6.6e-6                      1.0e-6           100 %
    Q8_0   0.25   / 0.31                        0.041 / 0.046    100 %
    Q4_1   3.96   / 4.69                        0.60  / 0.68     69 %
(logits have std ~3.1; the weights are Gaussian, about the worst case for 4-bit blocks.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_llama_jax.convert.common import build_llama, llama_params
from mamba_llama_jax.convert.hf import SafetensorsDir, read_hf_dir

read_gguf = pytest.importorskip("mamba_llama_jax.convert.gguf").read_gguf

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QTYPES = ["F32", "Q8_0", "Q4_1"]
# (max, mean) |logit diff| allowed against the torch reference: ~2x the measured figures above.
TOLERANCE = {"F32": (1e-4, 1e-5), "Q8_0": (0.6, 0.1), "Q4_1": (9.0, 1.4)}
EXACT_ATOL = 1e-4  # GGUF path vs the same dequantized weights through the HF path (fp32 throughout)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "tiny_llama_ref.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def hf():
    return read_hf_dir(FIXTURES / "tiny_llama")


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple]:
    return {q: read_gguf(FIXTURES / f"tiny_llama-{q}.gguf") for q in QTYPES}


def fp32(cfg):
    return dataclasses.replace(cfg, dtype="float32", param_dtype="float32")


def roundtrip_params(cfg, qtype: str) -> dict:
    """HF weights as a llama.cpp quantizer would leave them, via the gguf package's reference implementation."""
    q = gguf.GGMLQuantizationType[qtype]

    def get(name: str) -> np.ndarray:
        w = np.asarray(weights.get(name), np.float32)
        if w.ndim == 1 or q == gguf.GGMLQuantizationType.F32:
            return w
        return gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)

    with SafetensorsDir(FIXTURES / "tiny_llama") as weights:
        return llama_params(cfg, get, "roundtrip")


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_config_matches_hf(loaded, hf):
    hcfg = hf[0]
    for q in QTYPES:
        cfg = loaded[q][0]
        # GGUF stores eps as float32; its eos is config.json's single id (generation_config's extras are HF-only).
        assert cfg.rms_norm_eps == pytest.approx(hcfg.rms_norm_eps, rel=1e-6)
        assert dataclasses.replace(cfg, rms_norm_eps=hcfg.rms_norm_eps, eos_token_ids=hcfg.eos_token_ids) == hcfg
        assert cfg.eos_token_ids[0] == 2


@pytest.mark.parametrize("qtype", QTYPES)
def test_params_equal_reference_dequantization(loaded, hf, qtype):
    cfg, params, _ = loaded[qtype]
    expected = roundtrip_params(hf[0], qtype)
    diffs = jax.tree.map(max_abs, jax.tree.map(np.asarray, params), expected)
    worst = max(jax.tree.leaves(diffs))
    assert worst <= 1e-6, diffs


@pytest.mark.parametrize("qtype", QTYPES)
def test_logits(loaded, hf, ref, qtype):
    cfg, params, _ = loaded[qtype]
    model = build_llama(fp32(cfg), params)
    got, _ = model(jnp.asarray(ref["ids"]))
    got_strided, _ = model(jnp.asarray(ref["strided_ids"]), positions=jnp.asarray(ref["strided_positions"]))

    # Exact: same weights through the HF path give the same logits.
    same, _ = build_llama(fp32(hf[0]), roundtrip_params(hf[0], qtype))(jnp.asarray(ref["ids"]))
    assert max_abs(got, same) <= EXACT_ATOL

    # End to end against torch, within the quantization error.
    tol_max, tol_mean = TOLERANCE[qtype]
    for out, want in ((got, ref["logits"]), (got_strided, ref["strided_logits"])):
        diff = np.abs(np.asarray(out) - want)
        assert diff.max() <= tol_max and diff.mean() <= tol_mean, (qtype, diff.max(), diff.mean())


def test_tokenizer_matches_hf(loaded, hf, ref):
    htok = hf[2]
    text = str(ref["chat_text"])
    for q in QTYPES:
        tok = loaded[q][2]
        assert tok.encode(text) == htok.encode(text)
        assert tok.encode("Numbers 12 and 345, symbols #$%: ok") == htok.encode("Numbers 12 and 345, symbols #$%: ok")
        assert tok.hf.chat_template == htok.hf.chat_template
        assert tok.bos_token_id == htok.bos_token_id == 1
        assert 2 in tok.eos_token_ids
        assert tok.vocab_size == htok.vocab_size == 300
