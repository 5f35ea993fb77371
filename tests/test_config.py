import dataclasses

import pytest

from mamba_llama_jax.config import LlamaConfig, RopeScaling, apply_overrides, from_dict, load_config, to_dict
from mamba_llama_jax.errors import ConfigError

BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def test_round_trip_through_yaml(tmp_path):
    cfg = LlamaConfig(**BASE, rope_scaling=RopeScaling(factor=4.0), eos_token_ids=(1, 2))
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(LlamaConfig, path) == cfg


def test_unknown_key_rejected_with_valid_keys_listed():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['hiden_size'\].*valid keys"):
        from_dict(LlamaConfig, {**BASE, "hiden_size": 3})


def test_nested_unknown_key_and_bad_type():
    with pytest.raises(ConfigError, match="rope_scaling"):
        from_dict(LlamaConfig, {**BASE, "rope_scaling": {"factr": 2}})
    with pytest.raises(ConfigError, match="num_layers: expected an integer"):
        from_dict(LlamaConfig, {**BASE, "num_layers": "two"})
    with pytest.raises(ConfigError, match="missing required"):
        from_dict(LlamaConfig, {"vocab_size": 3})


def test_validation():
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        LlamaConfig(**{**BASE, "num_kv_heads": 3})
    with pytest.raises(ConfigError, match="unknown rope_scaling type 'yarn'"):
        from_dict(LlamaConfig, {**BASE, "rope_scaling": {"rope_type": "yarn"}})
    assert LlamaConfig(**BASE).head_dim == 4


def test_overrides(tmp_path):
    d = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "x=true"])
    assert d == {"a": {"b": 2, "c": [1, 2]}, "x": True}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["nonsense"])
    p = tmp_path / "c.json"
    p.write_text('{"vocab_size": 32}')
    cfg = load_config(LlamaConfig, p, [f"{k}={v}" for k, v in BASE.items() if k != "vocab_size"])
    assert dataclasses.asdict(cfg)["num_heads"] == 4


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(LlamaConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(LlamaConfig, bad)


def test_shipped_teacher_configs_load():
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs" / "teachers"
    smol = load_config(LlamaConfig, root / "smollm2-135m.yaml")
    assert (smol.num_layers, smol.head_dim, smol.tie_word_embeddings) == (30, 64, True)
    big = load_config(LlamaConfig, root / "llama3-8b.yaml")
    assert big.rope_scaling is not None and big.rope_scaling.factor == 8.0


def test_overrides_index_lists():
    d = apply_overrides({"stages": [{"steps": 1}, {"steps": 2}]}, ["stages.1.steps=5", "stages.0.lr=0.1"])
    assert d == {"stages": [{"steps": 1, "lr": 0.1}, {"steps": 5}]}
    with pytest.raises(ConfigError, match="not an index of a list of 2"):
        apply_overrides({"stages": [{}, {}]}, ["stages.2.steps=1"])
    with pytest.raises(ConfigError, match="not a mapping or list"):
        apply_overrides({"a": 1}, ["a.b=2"])
