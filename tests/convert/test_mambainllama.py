"""MambaInLlama hub format: export -> import round trips, strict mamba_config.json checks, the official
pytorch_model.bin layout (bf16, read without torch), atomic export, and the shipped hybrid layout configs."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig, RopeScaling, load_config
from mamba_llama_jax.convert.from_attention import build_hybrid
from mamba_llama_jax.convert.hf import llama_config_from_hf, llama_config_to_hf
from mamba_llama_jax.convert.mambainllama import (export_mambainllama, fused_mamba1_in_proj,
                                                  import_mambainllama)
from mamba_llama_jax.errors import CheckpointError, ConfigError, ModelFormatError
from mamba_llama_jax.models.llama import LlamaLM

FIXTURES = Path(__file__).parents[1] / "fixtures"
REPO = Path(__file__).parents[2]
CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
                  bos_token_id=1, eos_token_ids=(2,), dtype="float32")
TOKENS = jnp.array([[1, 5, 9, 17, 3, 44, 60, 2, 7, 7, 30, 12]], jnp.int32)


@pytest.fixture(scope="module")
def teacher():
    return LlamaLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module", params=["mamba2", "mamba1"])
def hybrid(request, teacher):
    return build_hybrid(teacher, HybridConfig(attn_fraction=0.5, mamba=MambaConfig(variant=request.param)),
                        rngs=nnx.Rngs(1))


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_same_params(a, b, cast=None):
    pa, pb = params_of(a), params_of(b)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(pa)[0], jax.tree.leaves(pb)):
        x = np.asarray(x)
        if cast is not None:
            x = x.astype(cast).astype(np.float32)
        np.testing.assert_array_equal(x, np.asarray(y), err_msg=jax.tree_util.keystr(path))


def logits(model):
    return np.asarray(model(TOKENS)[0])


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_fp32_is_bit_exact(hybrid, tmp_path):
    out = export_mambainllama(hybrid, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mamba_config.json", "model.safetensors"]
    cfg, hcfg, model, tok = import_mambainllama(out, dtype="float32")
    assert tok is None
    assert cfg == CFG
    assert hcfg.attn_layers == hybrid.attn_layers == (1, 3)
    assert hcfg.mamba.variant == hybrid.hybrid.mamba.variant
    assert_same_params(hybrid, model)
    np.testing.assert_array_equal(logits(model), logits(hybrid))


def test_exported_names_and_shapes_are_official(hybrid, tmp_path):
    out = export_mambainllama(hybrid, tmp_path / "m")
    t = load_file(str(out / "model.safetensors"))
    mc = json.loads((out / "mamba_config.json").read_text())
    assert set(mc) == {"d_model", "ssm_cfg", "rms_norm_eps", "vocab_size", "d_inner", "d_xb", "intermediate_size",
                       "hidden_act", "n_layer", "attn_layers"}
    assert (mc["d_inner"], mc["d_xb"], mc["n_layer"], mc["attn_layers"]) == (32, 16, 4, [1, 3])
    assert t["model.layers.1.self_attn.q_proj.weight"].shape == (32, 32)
    assert t["model.layers.1.self_attn.k_proj.weight"].shape == (16, 32)
    assert "model.layers.0.self_attn.q_proj.weight" not in t
    m = "model.layers.0.mamba."
    if hybrid.hybrid.mamba.variant == "mamba2":
        assert mc["ssm_cfg"]["ngroups"] == 4 and mc["ssm_cfg"]["d_state"] == 8
        assert t[m + "in_proj.weight"].shape == (2 * 32 + 2 * 16 + 4, 32)
        assert t[m + "conv1d.weight"].shape == (64, 1, 4)
        assert t[m + "A_log"].shape == t[m + "dt_bias"].shape == t[m + "D"].shape == (4,)
        assert t[m + "norm.weight"].shape == (32,)
        # Q -> C rows of in_proj: the official wrapper's initialisation, in their (out, in) orientation
        q = np.asarray(hybrid.layers[0].mixer.in_proj.kernel[...]).T[32 + 32:32 + 32 + 32]
        np.testing.assert_array_equal(t[m + "in_proj.weight"][64:96], q)
    else:
        assert mc["ssm_cfg"]["dt_rank"] == 2 and mc["ssm_cfg"]["repeat_kv_before_conv"] is True
        assert t[m + "in_proj_x.weight"].shape == t[m + "B_proj.weight"].shape == (16, 32)
        assert t[m + "C_proj.weight"].shape == t[m + "in_proj_z.weight"].shape == (32, 32)
        assert t[m + "dt_proj_down.weight"].shape == (2, 32) and t[m + "dt_proj.weight"].shape == (32, 2)
        assert t[m + "A_log"].shape == (32, 16) and t[m + "conv1d.weight"].shape == (32, 1, 4)
    assert t["lm_head.weight"].shape == (61, 32)


def test_bf16_export_round_trip_is_exact_in_bf16(hybrid, tmp_path):
    out = export_mambainllama(hybrid, tmp_path / "m", dtype="bfloat16")
    t = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in t.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, _, model, _ = import_mambainllama(out, dtype="float32")
    assert_same_params(hybrid, model, cast=ml_dtypes.bfloat16)
    again = export_mambainllama(model, tmp_path / "again", dtype="bfloat16")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_mamba1_fused_inference_in_proj_imports_to_the_same_model(teacher, tmp_path):
    src = build_hybrid(teacher, HybridConfig(attn_fraction=0.5, mamba=MambaConfig(variant="mamba1")),
                       rngs=nnx.Rngs(2))
    out = export_mambainllama(src, tmp_path / "m")
    t = load_file(str(out / "model.safetensors"))
    for i in src.mamba_layers:
        t = fused_mamba1_in_proj(t, i)
    assert "model.layers.0.mamba.in_proj.weight" in t and "model.layers.0.mamba.in_proj_x.weight" not in t
    save_file(t, str(out / "model.safetensors"))
    _, hcfg, model, _ = import_mambainllama(out, dtype="float32")
    assert hcfg.mamba.variant == "mamba1"
    assert_same_params(src, model)


def test_sharded_safetensors_and_tokenizer(teacher, tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from mamba_llama_jax.data.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 61)}}
    raw = HFTok(WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    tok = Tokenizer.from_tokenizers(raw, bos="<s>", eos="</s>", pad=None, unk="<unk>", chat_template=None,
                                    add_bos=False, eos_token_ids=(2,))
    src = build_hybrid(teacher, HybridConfig(attn_fraction=0.25), rngs=nnx.Rngs(3))
    out = export_mambainllama(src, tmp_path / "m", tokenizer=tok)
    t = load_file(str(out / "model.safetensors"))
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(out / f), metadata={"format": "pt"})
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    _, hcfg, model, tok2 = import_mambainllama(out, dtype="float32")
    assert hcfg.attn_layers == (3,)
    assert_same_params(src, model)
    assert tok2 is not None and tok2.encode("w5 w9 w60") == tok.encode("w5 w9 w60") == [5, 9, 60]


def test_llama_config_to_hf_inverts_from_hf():
    for cfg in (CFG, LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                 num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6, rope_theta=500000.0,
                                 rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=8192),
                                 max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=None,
                                 eos_token_ids=(128001, 128008, 128009)),
                LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=2,
                            num_kv_heads=2, rope_scaling=RopeScaling(rope_type="linear", factor=2.0))):
        raw = json.loads(json.dumps(llama_config_to_hf(cfg)))
        back = llama_config_from_hf(raw)
        assert back == LlamaConfig(**{**cfg.__dict__, "dtype": back.dtype, "param_dtype": back.param_dtype})


# ---------------------------------------------------------------------------------------- strict config checks


@pytest.fixture(scope="module")
def exported(teacher, tmp_path_factory):
    model = build_hybrid(teacher, HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(4))
    return export_mambainllama(model, tmp_path_factory.mktemp("exp") / "m")


def _tampered(exported: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "t"
    d.mkdir()
    for f in exported.iterdir():
        (d / f.name).symlink_to(f)
    mc = json.loads((exported / "mamba_config.json").read_text())
    edit(mc)
    (d / "mamba_config.json").unlink()
    (d / "mamba_config.json").write_text(json.dumps(mc))
    return d


def _set(key, value):
    return lambda mc: mc.__setitem__(key, value)


def _ssm(key, value):
    return lambda mc: mc["ssm_cfg"].__setitem__(key, value)


@pytest.mark.parametrize("edit, match", [
    (lambda mc: mc.pop("d_xb"), r"required field\(s\) \['d_xb'\] missing"),
    (lambda mc: mc.pop("attn_layers"), r"\['attn_layers'\] missing"),
    (_set("d_xb", 32), r"'d_xb' is 32, but config.json gives num_key_value_heads·head_dim = 16"),
    (_set("d_inner", 16), r"'d_inner' is 16"),
    (_set("attn_layers", [1, 4]), r"'attn_layers' has \[4\] out of range for n_layer = 4"),
    (_set("attn_layers", [-1, 3]), r"'attn_layers' has \[-1\] out of range"),
    (_set("attn_layers", [1, 1, 3]), r"'attn_layers' lists layer\(s\) \[1\] more than once"),
    (_set("attn_layers", "1,3"), r"'attn_layers' must be a list"),
    (_set("n_layer", 5), r"'n_layer' is 5, but config.json gives num_hidden_layers = 4"),
    (_set("d_model", 64), r"'d_model' is 64"),
    (_set("vocab_size", 60), r"'vocab_size' is 60"),
    (_set("hidden_act", "gelu"), r"'hidden_act'"),
    (_set("rms_norm_eps", 1e-6), r"'rms_norm_eps'"),
    (_set("extra", 1), r"unknown field\(s\) \['extra'\]"),
    (_ssm("d_stat", 8), r"ssm_cfg has key\(s\) \['d_stat'\]"),
    (_ssm("ngroups", 2), r"ssm_cfg.ngroups \(2\) × ssm_cfg.d_state \(8\) must equal d_inner \(32\)"),
    (_ssm("repeat_kv_before_conv", True), r"ssm_cfg.repeat_kv_before_conv = True is not supported"),
    (_ssm("dt_rank", 4), r"mamba2, but ssm_cfg has mamba1-only key\(s\) \['dt_rank'\]; unknown variant"),
    (_ssm("dt_min", float("nan")), r"ssm_cfg\.dt_min must be a finite number, got nan"),
    (_ssm("dt_max", 10 ** 400), r"ssm_cfg\.dt_max must be a finite number, got 1000000000"),
    (_set("attn_layers", [3]), r"layer 1 is not in attn_layers, but its tensors match neither"),
    (_set("attn_layers", [1, 2, 3]), r"layer 2 is in attn_layers, but it holds Mamba tensors"),
])
def test_tampered_mamba_config_is_a_clear_error(exported, tmp_path, edit, match):
    d = _tampered(exported, tmp_path, edit)
    with pytest.raises(ModelFormatError, match=match):
        import_mambainllama(d)


def test_unknown_forced_variant_and_missing_parts(exported, tmp_path):
    with pytest.raises(ConfigError, match="unknown Mamba variant 'mamba3'"):
        import_mambainllama(exported, variant="mamba3")
    with pytest.raises(ModelFormatError, match="not found"):
        import_mambainllama(tmp_path / "nope")
    for missing, match in (("mamba_config.json", "mamba config not found"), ("config.json", "Llama config not"),
                           ("model.safetensors", "no weights in")):
        d = tmp_path / missing
        d.mkdir()
        for f in exported.iterdir():
            if f.name != missing:
                (d / f.name).symlink_to(f)
        with pytest.raises(ModelFormatError, match=match):
            import_mambainllama(d)


def test_wrong_tensor_shape_is_named(exported, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    for f in exported.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).symlink_to(f)
    t = load_file(str(exported / "model.safetensors"))
    t["model.layers.0.mamba.A_log"] = np.zeros((5,), np.float32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"'model.layers.0.mamba.A_log' has shape \(5,\), expected \(4,\)"):
        import_mambainllama(d)


# ----------------------------------------------------------------------------- official pytorch_model.bin (bf16)


def test_official_pytorch_bin_loads_without_torch():
    import sys

    d = FIXTURES / "mambainllama_tiny"
    want = np.load(FIXTURES / "mambainllama_tiny_expected.npz")
    cfg, hcfg, model, tok = import_mambainllama(d, dtype="float32")
    assert "torch" not in sys.modules
    assert tok is None and hcfg.attn_layers == (1, 3) and hcfg.mamba.variant == "mamba2"
    assert (hcfg.mamba.d_inner, hcfg.mamba.d_xb, hcfg.mamba.d_state) == (32, 16, 8)
    m = model.layers[0].mixer
    np.testing.assert_array_equal(np.asarray(m.A_log[...]), want["model.layers.0.mamba.A_log"])
    np.testing.assert_array_equal(np.asarray(m.D[...]), want["model.layers.0.mamba.D"])
    np.testing.assert_array_equal(np.asarray(m.conv1d.weight[...]), want["model.layers.0.mamba.conv1d.weight"][:, 0])
    np.testing.assert_array_equal(np.asarray(m.in_proj.kernel[...]).T, want["model.layers.0.mamba.in_proj.weight"])
    np.testing.assert_array_equal(np.asarray(model.layers[1].mixer.k_proj.kernel[...]).T,
                                  want["model.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]).T, want["lm_head.weight"])
    out = logits(model)
    assert out.shape == (1, TOKENS.shape[1], 64) and np.isfinite(out).all()


def test_official_bin_reexports_to_the_same_tensors(tmp_path):
    """Names, orientations and values survive import -> export: our export is loadable where theirs is."""
    want = np.load(FIXTURES / "mambainllama_tiny_expected.npz")
    _, _, model, _ = import_mambainllama(FIXTURES / "mambainllama_tiny", dtype="float32")
    t = load_file(str(export_mambainllama(model, tmp_path / "m") / "model.safetensors"))
    assert sorted(t) == sorted(want.files)
    for k in want.files:
        np.testing.assert_array_equal(t[k], want[k], err_msg=k)


# ------------------------------------------------------------------------------------------------ atomic export


def _fail_mid_write(monkeypatch):
    import safetensors.numpy

    real = safetensors.numpy.save_file

    def partial_then_fail(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:2]), filename, metadata=metadata)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.numpy, "save_file", partial_then_fail)


def test_failed_export_leaves_no_directory(exported, tmp_path, monkeypatch):
    _, _, model, _ = import_mambainllama(exported, dtype="float32")
    _fail_mid_write(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        export_mambainllama(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_export(exported, tmp_path, monkeypatch):
    _, _, model, _ = import_mambainllama(exported, dtype="float32")
    target = export_mambainllama(model, tmp_path / "m")
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    with pytest.raises(CheckpointError, match="not empty; pass overwrite=True"):
        export_mambainllama(model, target)
    _fail_mid_write(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        export_mambainllama(model, target, dtype="bfloat16", overwrite=True)
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    monkeypatch.undo()
    export_mambainllama(model, target, dtype="bfloat16", overwrite=True)
    assert load_file(str(target / "model.safetensors"))["model.norm.weight"].dtype == ml_dtypes.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    with pytest.raises(ConfigError, match="export dtype"):
        export_mambainllama(model, tmp_path / "x", dtype="float16")


# ------------------------------------------------------------------------------------------ hybrid layout files


@pytest.mark.parametrize("name, layers32, layers30", [
    ("50", tuple(range(1, 32, 2)), tuple(range(1, 30, 2))),
    ("25", tuple(range(3, 32, 4)), (3, 7, 11, 15, 19, 23, 27)),
    ("12.5", (7, 15, 23, 31), (7, 15, 23)),
    ("0", (), ()),
])
def test_hybrid_layout_configs(name, layers32, layers30):
    cfg = load_config(HybridConfig, REPO / "configs" / "hybrids" / f"{name}.yaml")
    assert cfg.mamba == MambaConfig()  # the official Mamba2 defaults, sizes derived from the teacher
    assert cfg.layers_for(32) == layers32
    assert cfg.layers_for(30) == layers30
