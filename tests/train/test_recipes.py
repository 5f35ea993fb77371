"""Recipe configs load strictly; a two-stage progressive recipe runs end to end on the tiny fixture teacher and a
second call resumes from the finished checkpoints without training again; a shallow two-stage recipe (keep_layers)
exports a model that reloads to the same logits, and resumes the same way."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from mamba_llama_jax.config import HybridConfig, TrainConfig, load_config
from mamba_llama_jax.errors import ConfigError

ROOT = Path(__file__).parents[2]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))


def test_every_recipe_is_covered():
    names = {p.stem for p in RECIPES}
    assert {"smollm2-135m-stepwise", "smollm2-135m-mohawk", "smollm2-135m-sft", "llama3-8b-50"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_load(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.stages and cfg.output_dir
    n = 32 if "llama3" in path.stem else 30
    prev, layout = set(range(n)), cfg.hybrid  # as run_recipe: a stage's layout, else the one before
    for st in cfg.stages:  # progressive layouts only ever convert attention layers to Mamba
        layout = st.hybrid or layout
        kept = layout.kept_layers(n)  # in teacher numbering, so that shallow and full layouts compare
        cur = {kept[i] for i in layout.layers_for(len(kept))}
        assert cur <= prev, (st.name, sorted(cur - prev))
        prev = cur


def test_stepwise_converts_one_layer_per_stage():
    cfg = load_config(TrainConfig, ROOT / "configs" / "recipes" / "smollm2-135m-stepwise.yaml")
    attn = [set(range(30))] + [set(st.hybrid.layers_for(30)) for st in cfg.stages]
    assert [len(a - b) for a, b in zip(attn, attn[1:])] == [1] * 15
    assert attn[-1] == set(HybridConfig(attn_fraction=0.5).layers_for(30))  # ends at the 50 % layout
    assert all(st.train == "mamba" and st.objective == "distill" for st in cfg.stages)
    assert all(st.loss.kl_normalization == "sequence_sum" for st in cfg.stages)


def test_mohawk_orients_before_aligning_hidden_states():
    cfg = load_config(TrainConfig, ROOT / "configs" / "recipes" / "smollm2-135m-mohawk.yaml")
    assert [s.objective for s in cfg.stages] == ["orient", "hidden", "distill"]
    assert cfg.stages[0].train == "mamba" and cfg.stages[0].data.seq_len <= 512


def test_llama3_recipe_is_the_compiled_memory_case():
    """The recipe's step is the one benchmarks/memory_llama3_8b.py compiles for an 8-GPU host."""
    import importlib.util

    from mamba_llama_jax.train.mesh import mesh_shape

    cfg = load_config(TrainConfig, ROOT / "configs" / "recipes" / "llama3-8b-50.yaml")
    st = cfg.stages[0]
    spec = importlib.util.spec_from_file_location("memory_llama3_8b", ROOT / "benchmarks" / "memory_llama3_8b.py")
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)
    case = (8, mesh_shape(cfg.mesh, 8), st.train, st.remat, st.batch_size // st.grad_accum)
    assert case in mem.CASES and st.data.seq_len == mem.SEQ
    assert cfg.hybrid.layers_for(32) == tuple(range(1, 32, 2))
    assert (st.loss.ce_weight, st.loss.kl_weight, st.loss.kl_normalization) == (1.0, 0.1, "sequence_sum")


def test_draft_recipe_is_a_shallow_pure_mamba_student():
    cfg = load_config(TrainConfig, ROOT / "configs" / "recipes" / "smollm2-135m-draft.yaml")
    student = cfg.hybrid.student_layout(30)
    assert len(cfg.hybrid.kept_layers(30)) == 6 and student.attn_layers == () and student.mamba.variant == "mamba2"
    assert all(st.objective == "distill" and st.train == "all" and st.data.seq_len == 1024 for st in cfg.stages)
    assert all(st.hybrid is None or st.hybrid.keep_layers == cfg.hybrid.keep_layers for st in cfg.stages)


def test_attention_draft_recipe_keeps_the_50_percent_hybrids_attention_layers():
    cfg = load_config(TrainConfig, ROOT / "configs" / "recipes" / "smollm2-135m-draft-attn.yaml")
    kept = cfg.hybrid.kept_layers(30)
    student = cfg.hybrid.student_layout(30)
    assert len(kept) == 6 and kept[-1] == 29 and student.attn_layers == tuple(range(6))
    # every kept layer is attention in the 50 % hybrid, so the draft can be copied from that hybrid too
    assert set(kept) <= set(HybridConfig(attn_fraction=0.5).layers_for(30))
    assert all(st.objective == "distill" and st.train == "all" for st in cfg.stages)


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


# 20 s alone, 57 s in `make test` (2026-12-07): `make test-slow`. Its two stages, their metrics, the export and the
# resume without training again are in the default run's test_shallow_progressive_recipe_exports_a_reloadable_draft.
@pytest.mark.slow
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
    assert (tmp_path / "run" / "model" / "mamba_config.json").is_file()  # exported for --model / generate
    logs = {stage: (tmp_path / "run" / stage / "metrics.jsonl").read_text() for stage in ("half", "all-mamba")}
    again = run_recipe(path, progress=False)  # both stages complete: restored, not retrained
    a, b = nnx.state(student, nnx.Param), nnx.state(again, nnx.Param)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(x, y)
    for stage, text in logs.items():  # a retrain would log other tokens/s (see the shallow test)
        assert (tmp_path / "run" / stage / "metrics.jsonl").read_text() == text, stage


def test_quiet_start_reaches_the_recipe_students(tmp_path):
    """`quiet_start` in a recipe: every stage's newly converted mixers start quiet (a few small steps later
    their gate norms are still near the scale, far from the method's 1); out-of-range values are refused."""
    from mamba_llama_jax.config import from_dict
    from mamba_llama_jax.train.trainer import run_recipe

    data = _chat_data(tmp_path)
    recipe = {
        "output_dir": str(tmp_path / "run"), "teacher": str(ROOT / "tests" / "fixtures" / "tiny_llama_tied"),
        "dtype": "float32", "hybrid": {"attn_fraction": 0, "mamba": {"chunk_size": 16}}, "quiet_start": 0.05,
        "checkpoint": {"async_save": False},
        "stages": [{"name": "only", "steps": 2, "batch_size": 2, "data": data, "optim": {"lr": 1e-4}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    student = run_recipe(path, progress=False)
    for i in student.mamba_layers:
        w = np.asarray(student.layers[i].mixer.norm.weight[...])
        assert np.abs(w - 0.05).max() < 0.01, (i, w)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="quiet_start"):
            from_dict(TrainConfig, dict(recipe, quiet_start=bad))


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _deeper_tiny_teacher(layers=4):
    """The tied tiny fixture's tokenizer with a random Llama of more layers, so that a student can drop some."""
    import dataclasses

    from mamba_llama_jax.convert import Teacher, load_teacher
    from mamba_llama_jax.models.llama import LlamaLM

    t = load_teacher(ROOT / "tests" / "fixtures" / "tiny_llama_tied", dtype="float32")
    cfg = dataclasses.replace(t.config, num_layers=layers)
    return Teacher(cfg, LlamaLM(cfg, rngs=nnx.Rngs(0)), t.tokenizer)


def _chat_data(tmp_path):
    msgs = lambda i: [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i} you"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": msgs(i)}) + "\n" for i in range(16)))
    return {"source": str(tmp_path / "chat.jsonl"), "seq_len": 48, "num_epochs": 0}


def test_shallow_progressive_recipe_exports_a_reloadable_draft(tmp_path):
    import jax.numpy as jnp

    from mamba_llama_jax.convert.mambainllama import import_mambainllama
    from mamba_llama_jax.train.trainer import run_recipe

    data, keep = _chat_data(tmp_path), [0, 3]
    recipe = {
        "output_dir": str(tmp_path / "run"), "dtype": "float32", "log_every": 1,
        "hybrid": {"keep_layers": keep, "attn_layers": [1], "mamba": {"chunk_size": 16}},
        "checkpoint": {"every": 2, "async_save": False},
        "stages": [
            {"name": "half", "steps": 2, "batch_size": 2, "data": data},
            {"name": "all-mamba", "steps": 2, "batch_size": 2, "data": data, "train": "all",
             "hybrid": {"keep_layers": keep, "attn_fraction": 0, "mamba": {"chunk_size": 16}},
             "loss": {"ce_weight": 0.1, "kl_weight": 1.0, "kl_normalization": "token_mean"}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    teacher = _deeper_tiny_teacher()
    student = run_recipe(path, progress=False, teacher=teacher)
    assert len(student.layers) == 2 and student.attn_layers == ()
    for stage in ("half", "all-mamba"):
        lines = (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(ln)["step"] for ln in lines] == [1, 2]
    cfg, hyb, loaded, tok = import_mambainllama(tmp_path / "run" / "model", dtype="float32")
    assert cfg.num_layers == 2 and hyb.attn_layers == () and hyb.keep_layers is None and tok is not None
    tokens = jnp.asarray([[1, 17, 42, 99, 7, 250, 3, 64]], jnp.int32)
    np.testing.assert_allclose(np.asarray(loaded(tokens)[0]), np.asarray(student(tokens)[0]), rtol=1e-6, atol=1e-6)
    logs = {stage: (tmp_path / "run" / stage / "metrics.jsonl").read_text() for stage in ("half", "all-mamba")}
    again = run_recipe(path, progress=False, teacher=teacher)  # both stages complete: restored, not retrained
    for x, y in zip(jax_leaves(nnx.state(student, nnx.Param)), jax_leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(x, y)
    # Training is deterministic, so equal parameters alone would not tell a restore from a retrain; the logs do:
    # each line holds its step's measured tokens/s, which a second run of the step would not repeat to the digit.
    for stage, text in logs.items():
        assert (tmp_path / "run" / stage / "metrics.jsonl").read_text() == text, stage


def test_per_layer_objective_with_a_shallow_student_fails_before_training(tmp_path):
    from mamba_llama_jax.train.trainer import run_recipe

    data = _chat_data(tmp_path)
    recipe = {"output_dir": str(tmp_path / "run"), "dtype": "float32",
              "hybrid": {"keep_layers": [0, 3], "attn_fraction": 0},
              "stages": [{"name": "kl", "steps": 2, "batch_size": 2, "data": data},
                         {"name": "align", "objective": "hidden", "steps": 2, "batch_size": 2, "data": data}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="objective 'hidden' matches each student layer.*2 layers and the teacher 4"):
        run_recipe(path, progress=False, teacher=_deeper_tiny_teacher())
    assert not (tmp_path / "run" / "kl").exists()  # the first stage never started


def test_a_distilled_hybrid_teaches_its_own_draft(tmp_path):
    """A MambaInLlama directory as `teacher`: the draft's Mamba layers start as copies of the hybrid's own
    (trained) Mamba layers, its converted ones from the hybrid's attention, and distillation runs against the
    hybrid. A student that keeps attention where the hybrid has Mamba, or a per-layer objective, is refused."""
    import jax.numpy as jnp

    from mamba_llama_jax.convert import load_teacher
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.convert.mambainllama import export_mambainllama
    from mamba_llama_jax.errors import ModelFormatError
    from mamba_llama_jax.models.hybrid import HybridLM
    from mamba_llama_jax.train.trainer import export_student, run_recipe

    base = _deeper_tiny_teacher()
    target = build_hybrid(base.model, HybridConfig(attn_layers=(1, 3)), rngs=nnx.Rngs(5))
    export_student(target, tmp_path / "target", base.tokenizer)
    t = load_teacher(tmp_path / "target", dtype="float32")
    assert isinstance(t.model, HybridLM) and t.model.attn_layers == (1, 3)
    export_mambainllama(target, tmp_path / "no-tokenizer")  # the official format may leave the tokenizer out
    with pytest.raises(ModelFormatError, match="no-tokenizer holds no tokenizer"):
        load_teacher(tmp_path / "no-tokenizer")
    tokens = jnp.asarray([[1, 17, 42, 99, 7, 250, 3, 64]], jnp.int32)
    np.testing.assert_allclose(np.asarray(t.model(tokens)[0]), np.asarray(target(tokens)[0]), rtol=1e-5, atol=1e-5)

    keep = HybridConfig(keep_layers=(0, 3), attn_fraction=0)
    draft = build_hybrid(t.model, keep, rngs=nnx.Rngs(6))
    for a, b in zip(jax_leaves(nnx.state(draft.layers[0].mixer, nnx.Param)),
                    jax_leaves(nnx.state(t.model.layers[0].mixer, nnx.Param))):
        np.testing.assert_array_equal(a, b)  # layer 0 was already Mamba in the hybrid: copied, not converted
    with pytest.raises(ConfigError, match="keeps attention.*Mamba layer"):
        build_hybrid(t.model, HybridConfig(attn_layers=(0,)), rngs=nnx.Rngs(7))

    data = _chat_data(tmp_path)
    recipe = {"output_dir": str(tmp_path / "run"), "dtype": "float32", "teacher": str(tmp_path / "target"),
              "log_every": 1, "hybrid": {"keep_layers": [0, 3], "attn_fraction": 0, "mamba": {"chunk_size": 16}},
              "checkpoint": {"async_save": False},
              "stages": [{"name": "kl", "steps": 2, "batch_size": 2, "data": data, "train": "all",
                          "loss": {"ce_weight": 0.0, "kl_weight": 1.0, "kl_normalization": "token_mean"}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    student = run_recipe(path, progress=False)
    assert len(student.layers) == 2 and student.attn_layers == ()
    kl = [json.loads(ln)["kl"] for ln in (tmp_path / "run" / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert len(kl) == 2 and all(np.isfinite(kl))
    recipe["stages"] = [dict(recipe["stages"][0], objective="hidden")]
    recipe["hybrid"] = {"attn_fraction": 0, "mamba": {"chunk_size": 16}}
    recipe["output_dir"] = str(tmp_path / "run2")
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="this teacher is a hybrid"):
        run_recipe(path, progress=False)
