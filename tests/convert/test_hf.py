"""HF directory converter: parity with transformers' own LlamaForCausalLM, layouts, configs, and bad input.

Fixtures come from tests/fixtures/make_tiny_llama.py (torch reference logits at fp32).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from mamba_llama_jax.config import LlamaConfig, RopeScaling
from mamba_llama_jax.convert.common import build_llama
from mamba_llama_jax.convert.hf import llama_config_from_hf, read_hf_dir
from mamba_llama_jax.errors import ConfigError, MambaLlamaError, ModelFormatError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MAIN = FIXTURES / "tiny_llama"
TIED = FIXTURES / "tiny_llama_tied"
ATOL = 1e-4  # fp32 end to end; measured max |diff| ~7e-6 on logits of std ~3


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "tiny_llama_ref.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def main_loaded():
    return read_hf_dir(MAIN)


def fp32_model(cfg: LlamaConfig, params):
    return build_llama(dataclasses.replace(cfg, dtype="float32", param_dtype="float32"), params)


# ---------------------------------------------------------------------------------------------------------- parity


def test_sharded_bf16_checkpoint_matches_torch_logits(main_loaded, ref):
    cfg, params, _ = main_loaded
    model = fp32_model(cfg, params)
    logits, _ = model(jnp.asarray(ref["ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=ATOL, rtol=0)


def test_llama3_rope_scaling_at_long_distances(main_loaded, ref):
    # Positions 0, 397, 794, ...: relative distances up to ~6000 reach the frequencies llama3 scaling slows down
    # (dropping the scaling moves these logits by ~5; the contiguous input only by ~0.03).
    cfg, params, _ = main_loaded
    model = fp32_model(cfg, params)
    logits, _ = model(jnp.asarray(ref["strided_ids"]), positions=jnp.asarray(ref["strided_positions"]))
    np.testing.assert_allclose(np.asarray(logits), ref["strided_logits"], atol=ATOL, rtol=0)


def test_tied_fp16_checkpoint_matches_torch_logits(ref):
    cfg, params, _ = read_hf_dir(TIED)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None and "lm_head" not in params
    logits, _ = fp32_model(cfg, params)(jnp.asarray(ref["tied_ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["tied_logits"], atol=ATOL, rtol=0)


def test_config_of_main_fixture(main_loaded):
    cfg, _, tok = main_loaded
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (300, 64, 96, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert not cfg.tie_word_embeddings
    assert cfg.bos_token_id == 1
    # config.json says 2; generation_config.json adds 0 (as Llama 3 instruct adds <|eot_id|> there).
    assert cfg.eos_token_ids == (2, 0)
    assert tok.eos_token_ids == (2, 0)


def test_single_file_layout_gives_same_params(main_loaded, tmp_path):
    _, params, _ = main_loaded
    d = tmp_path / "single"
    shutil.copytree(MAIN, d)
    merged = {}
    for shard in sorted(d.glob("model-*.safetensors")):
        merged.update(load_file(str(shard)))
        shard.unlink()
    (d / "model.safetensors.index.json").unlink()
    assert merged["model.norm.weight"].dtype == ml_dtypes.bfloat16
    save_file(merged, str(d / "model.safetensors"))
    _, params2, _ = read_hf_dir(d)
    np.testing.assert_array_equal(params2["layers"][1]["mixer"]["k_proj"]["kernel"],
                                  params["layers"][1]["mixer"]["k_proj"]["kernel"])
    np.testing.assert_array_equal(params2["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_tokenizer_and_chat_template(main_loaded, ref):
    _, _, tok = main_loaded
    text = str(ref["chat_text"])
    ids = tok.encode(text)
    np.testing.assert_array_equal(np.resize(np.asarray(ids, np.int32), 16), ref["ids"][0])
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.bos_token_id == 1 and "<|im_start|>" in tok.hf.chat_template
    pytest.importorskip("jinja2")
    assert tok.render_chat([{"role": "user", "content": "Hello, how are you today?"}]) == text


# -------------------------------------------------------------------------------------------- config.json parsing

LLAMA2_7B = {  # Llama 2: no GQA key, no head_dim, linear scaling in the old `type` spelling
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
    "rope_scaling": {"type": "linear", "factor": 2.0}, "bos_token_id": 1, "eos_token_id": 2,
}
LLAMA32_1B = {  # Llama 3.2: GQA, llama3 scaling with factor 32, tied, eos list
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}


def test_llama2_config():
    cfg = llama_config_from_hf(LLAMA2_7B)
    assert cfg.num_kv_heads == 32 and cfg.head_dim == 128 and cfg.rope_theta == 10000.0
    assert cfg.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)
    assert cfg.eos_token_ids == (2,)


def test_llama32_config():
    cfg = llama_config_from_hf(LLAMA32_1B)
    assert cfg.num_kv_heads == 8 and cfg.head_dim == 64 and cfg.tie_word_embeddings
    assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_ids == (128001, 128008, 128009)


def test_transformers5_rope_parameters_layout():
    raw = {k: v for k, v in LLAMA32_1B.items() if k not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = {**LLAMA32_1B["rope_scaling"], "rope_theta": 500000.0}
    assert llama_config_from_hf(raw) == llama_config_from_hf(LLAMA32_1B)
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = llama_config_from_hf(raw)
    assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unknown_rope_type_is_a_config_error(kind):
    raw = {**LLAMA32_1B, "rope_scaling": {"rope_type": kind, "factor": 4.0}}
    with pytest.raises(ConfigError, match=kind):
        llama_config_from_hf(raw)


@pytest.mark.parametrize("model_type", ["mistral", "gpt2", None])
def test_non_llama_model_type_is_rejected(model_type):
    raw = {**LLAMA2_7B, "model_type": model_type}
    with pytest.raises(ModelFormatError, match=f"model_type is {model_type!r}"):
        llama_config_from_hf(raw)


def test_missing_required_key_is_named():
    raw = {k: v for k, v in LLAMA2_7B.items() if k != "hidden_size"}
    with pytest.raises(ModelFormatError, match="hidden_size"):
        llama_config_from_hf(raw)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.dictionaries(st.sampled_from(sorted(LLAMA32_1B) + ["rope_parameters", "attention_bias"]),
                                 JSONISH, max_size=4))
def test_garbage_config_values_raise_project_errors_only(overrides):
    # config.json is untrusted input: any value either parses or is a project error, never a raw exception.
    try:
        llama_config_from_hf({**LLAMA32_1B, **overrides})
    except MambaLlamaError:
        pass


# --------------------------------------------------------------------------------------------- bad directories


def copy_main(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(MAIN, d)
    return d


def rewrite_shard(d: Path, fname: str, edit) -> None:
    tensors = load_file(str(d / fname))
    edit(tensors)
    save_file(tensors, str(d / fname))


def test_missing_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="not found"):
        read_hf_dir(tmp_path / "nope")


def test_missing_config(tmp_path):
    d = copy_main(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json"):
        read_hf_dir(d)


def test_unknown_rope_type_in_directory(tmp_path):
    d = copy_main(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "su", "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'su'") as e:
        read_hf_dir(d)
    assert "config.json" in str(e.value)


def test_missing_tensor_is_named(tmp_path):
    d = copy_main(tmp_path)
    rewrite_shard(d, "model-00002-of-00002.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        read_hf_dir(d)


def test_wrong_shape_is_named(tmp_path):
    d = copy_main(tmp_path)

    def cut(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]

    rewrite_shard(d, "model-00001-of-00002.safetensors", cut)
    with pytest.raises(ModelFormatError, match=r"k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        read_hf_dir(d)


def test_non_finite_weights_are_refused(tmp_path):
    d = copy_main(tmp_path)

    def poison(t):
        w = t["model.layers.1.self_attn.o_proj.weight"].copy()
        w[3, :2] = [float("nan"), float("inf")]
        t["model.layers.1.self_attn.o_proj.weight"] = w

    rewrite_shard(d, "model-00002-of-00002.safetensors", poison)
    with pytest.raises(ModelFormatError, match=r"o_proj\.weight' has 2 non-finite values"):
        read_hf_dir(d)


def test_missing_shard_is_named(tmp_path):
    d = copy_main(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="model-00002-of-00002.safetensors"):
        read_hf_dir(d)


def test_no_weights_at_all(tmp_path):
    d = copy_main(tmp_path)
    for f in list(d.glob("model*")):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="no safetensors weights.*pytorch_model.bin"):
        read_hf_dir(d)


def test_corrupt_safetensors(tmp_path):
    d = copy_main(tmp_path)
    (d / "model-00001-of-00002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFormatError, match="model-00001-of-00002.safetensors"):
        read_hf_dir(d)


def test_truncated_safetensors(tmp_path):
    d = copy_main(tmp_path)
    f = d / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match="model-00002-of-00002.safetensors"):
        read_hf_dir(d)


def test_raw_bf16_reader_matches_safetensors():
    # The fallback for safetensors builds that cannot return bf16 to numpy.
    from mamba_llama_jax.convert.hf import _read_raw

    shard = MAIN / "model-00001-of-00002.safetensors"
    want = load_file(str(shard))["model.layers.0.self_attn.q_proj.weight"]
    got = _read_raw(shard, "model.layers.0.self_attn.q_proj.weight")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


def test_non_llama_directory(tmp_path):
    d = copy_main(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="qwen2"):
        read_hf_dir(d)
