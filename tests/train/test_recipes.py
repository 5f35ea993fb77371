"""Recipe configs load strictly; a two-stage progressive recipe runs end to end on the tiny fixture teacher and a
second call resumes from the finished checkpoints without training again."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from mamba_llama_jax.config import TrainConfig, load_config
from mamba_llama_jax.errors import ConfigError

ROOT = Path(__file__).parents[2]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("smollm2-135m-*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_load(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.stages and cfg.output_dir


def test_official_layerwise_loss():
    cfg = load_config(TrainConfig, ROOT / "configs" / "recipes" / "smollm2-135m-layerwise.yaml")
    loss = cfg.stages[0].loss
    assert (loss.ce_weight, loss.kl_weight, loss.kl_normalization) == (1.0, 0.1, "sequence_sum")
    assert cfg.stages[0].train == "mamba"


def test_recipe_errors(tmp_path):
    p = ROOT / "configs" / "recipes" / "smollm2-135m-layerwise.yaml"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TrainConfig, p, ["stages=[{name: a, data: {source: x}, lr: 1}]"])
    with pytest.raises(ConfigError, match="pairs"):
        load_config(TrainConfig, p, ["stages=[{name: a, objective: dpo, data: {source: x}}]"])
    with pytest.raises(ConfigError, match="multiple of grad_accum"):
        load_config(TrainConfig, p, ["stages=[{name: a, batch_size: 3, grad_accum: 2, data: {source: x}}]"])


def test_progressive_recipe_runs_and_resumes(tmp_path):
    from mamba_llama_jax.train.trainer import run_recipe

    msgs = lambda i: [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i} you"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": msgs(i)}) + "\n" for i in range(16)))
    data = {"source": str(tmp_path / "chat.jsonl"), "seq_len": 48, "num_epochs": 0}
    recipe = {
        "output_dir": str(tmp_path / "run"), "teacher": str(ROOT / "tests" / "fixtures" / "tiny_llama_tied"),
        "dtype": "float32", "hybrid": {"attn_fraction": 0.5, "mamba": {"chunk_size": 16}}, "log_every": 1,
        "checkpoint": {"every": 2, "async_save": False},
        "stages": [
            {"name": "half", "steps": 2, "batch_size": 2, "data": data},
            {"name": "all-mamba", "steps": 2, "batch_size": 2, "data": data, "train": "all",
             "hybrid": {"attn_fraction": 0, "mamba": {"chunk_size": 16}},
             "loss": {"ce_weight": 0.0, "kl_weight": 1.0, "kl_normalization": "token_mean"}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    student = run_recipe(path, progress=False)
    assert student.attn_layers == () and len(student.mamba_layers) == 2
    for stage in ("half", "all-mamba"):
        lines = (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(ln)["step"] for ln in lines] == [1, 2]
    again = run_recipe(path, progress=False)  # both stages complete: restored, not retrained
    a, b = nnx.state(student, nnx.Param), nnx.state(again, nnx.Param)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]
