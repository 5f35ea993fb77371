"""The demo's distillation half end to end on the tiny fixture teacher (not the full demo: that is `make demo`)."""

import json
from pathlib import Path

import math

from mamba_llama_jax.convert import load_teacher
from mamba_llama_jax.demo import DEMO_RECIPE, DemoSizes, answer_perplexity, distill_demo, teacher_data

ROOT = Path(__file__).parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_llama"
OVERRIDES = ["hybrid.attn_layers=[1]", "hybrid.mamba.chunk_size=16", "stages.0.steps=3", "stages.1.steps=3",
             "stages.0.data.seq_len=32", "stages.1.data.seq_len=32"]


def test_demo_recipe_ships_and_is_short():
    from mamba_llama_jax.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, DEMO_RECIPE)
    assert [s.objective for s in cfg.stages] == ["hidden", "distill"]
    assert all(s.train == "mamba" and s.data.seq_len <= 256 for s in cfg.stages)
    assert len(cfg.hybrid.layers_for(30)) == 25  # five layers converted


def test_distill_demo_on_tiny_teacher(tmp_path):
    teacher = load_teacher(TINY, dtype="float32")
    sizes = DemoSizes(train_prompts=8, heldout_prompts=4, max_new_tokens=8, gen_batch=12, print_every=1)
    lines: list[str] = []
    summary = distill_demo(teacher, out_dir=tmp_path, sizes=sizes, overrides=OVERRIDES, out=lines.append)
    assert summary["mamba_layers"] == [0]
    assert summary["train_examples"] == 8 and summary["heldout_examples"] == 4
    for key in ("ppl_teacher", "ppl_student_init", "ppl_student", "ratio"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert [s["name"] for s in summary["stages"]] == ["align-hidden", "distill-kl"]
    assert sum("step   1/3" in ln for ln in lines) == 2  # the loss is printed per stage
    assert any("held-out perplexity" in ln for ln in lines)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["ratio"] == summary["ratio"]
    assert (tmp_path / "train" / "distill-kl" / "metrics.jsonl").is_file()
    # the teacher's answers are reused by a second call with the same sizes (no generation)
    _, _, secs = teacher_data(teacher.model, teacher.tokenizer, tmp_path / "data", sizes)
    assert secs == 0.0


def test_answer_perplexity_uniform_model_is_vocab_size():
    """A model whose logits are all equal has perplexity = vocabulary size on any answer tokens."""
    import jax.numpy as jnp
    from flax import nnx

    class Flat(nnx.Module):
        def __call__(self, tokens, token_mask=None):
            return jnp.zeros(tokens.shape + (50,)), None

    ex = [{"tokens": [1, 2, 3, 4], "loss_mask": [0, 1, 1, 1]}, {"tokens": [5, 6], "loss_mask": [0, 1]}]
    ppl, n = answer_perplexity(Flat(), ex, batch_size=4)
    assert n == 4 and abs(ppl - 50) < 1e-3
