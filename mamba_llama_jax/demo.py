"""The CPU demo's distillation half (`run.py demo`, `make demo`): convert a few layers of the teacher to Mamba,
align them on the teacher's own answers, show the loss falling, report the perplexity ratio to the teacher on
held-out prompt families, and chat with the result.

Everything runs through the project's own pieces — `data.sources.generate_offline` for the teacher's answers,
`train.trainer.run_recipe` with the shipped recipe `configs/recipes/smollm2-135m-demo.yaml` — so the demo is a
small instance of the real pipeline, not a separate code path. Sizes are chosen for ~5 minutes on 2 CPU cores
(measured: the teacher answers 40 prompts × 80 tokens in about a minute; a hidden-alignment step at 4 × 128 tokens
takes ~0.5 s and a KL step ~2 s), which is far too little data for a good student: the held-out ratio says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_llama_jax.config import TrainConfig, load_config

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "smollm2-135m-demo.yaml"


@dataclasses.dataclass(frozen=True)
class DemoSizes:
    """How much the demo does; the defaults fit the < 10 minute budget on 2 CPU cores with room to spare."""

    train_prompts: int = 32
    heldout_prompts: int = 8
    max_new_tokens: int = 80
    gen_batch: int = 40  # one generation call for all prompts: fewer compiles and a full batch on CPU
    print_every: int = 10


def teacher_data(model: Any, tokenizer: Any, out_dir: str | Path, sizes: DemoSizes = DemoSizes(),
                 seed: int = 0) -> tuple[Path, Path, float]:
    """The teacher's answers to `train_prompts` offline prompts and to `heldout_prompts` prompts of the held-out
    families (templates and topics that training never sees), as two `generate_offline` directories.
    Returns (train_dir, heldout_dir, seconds spent generating); directories already complete are reused."""
    from mamba_llama_jax.data import sources

    out = Path(out_dir)
    sig = {"train": sizes.train_prompts, "heldout": sizes.heldout_prompts, "max_new": sizes.max_new_tokens,
           "seed": seed}
    stamp = out / "demo_data.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == sig:
        return out / "train", out / "heldout", 0.0
    shutil.rmtree(out, ignore_errors=True)  # other sizes: stale parts would be reused by generate_offline
    prompts = sources.offline_prompts(sizes.train_prompts, seed) + sources.heldout_prompts(sizes.heldout_prompts, seed)
    t0 = time.perf_counter()
    # One pass over both sets (one batch on CPU), then split the rows into the two directories.
    both = sources.generate_offline(model, tokenizer, out / "all", prompts=prompts, max_new_tokens=sizes.max_new_tokens,
                                    batch_size=sizes.gen_batch, seed=seed)
    secs = time.perf_counter() - t0
    rows = _read_rows(both)
    for name, part in (("train", rows[:sizes.train_prompts]), ("heldout", rows[sizes.train_prompts:])):
        (out / name).mkdir(parents=True, exist_ok=True)
        sources._write_parquet(out / name / "part-000-00000.parquet", part)
    shutil.rmtree(both)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(sig))
    os.replace(tmp, stamp)
    return out / "train", out / "heldout", secs


def _read_rows(directory: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for p in sorted(directory.glob("part-*.parquet")):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def answer_perplexity(model: Any, examples: Sequence[dict[str, Any]], *, batch_size: int = 8,
                      pad_id: int = 0) -> tuple[float, int]:
    """exp(mean NLL) of the answer tokens (`loss_mask` = 1) given everything before them, and how many tokens that
    mean is over. Rows are right-padded to a multiple of 32 so that all batches share a compiled shape."""
    longest = max(len(e["tokens"]) for e in examples)
    length = -(-longest // 32) * 32
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state: Any, tokens: jax.Array, mask: jax.Array, target_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = nnx.merge(graphdef, state)(tokens, token_mask=mask)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        w = target_mask[:, 1:].astype(jnp.float32)
        return -jnp.sum(picked * w), jnp.sum(w)

    total, count = 0.0, 0.0
    for b in range(0, len(examples), batch_size):
        chunk = list(examples[b:b + batch_size])
        chunk += [{"tokens": [pad_id, pad_id], "loss_mask": [0, 0]}] * (batch_size - len(chunk))  # fixed shape
        toks = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), bool)
        tmask = np.zeros((batch_size, length), np.int32)
        for i, e in enumerate(chunk):
            n = len(e["tokens"])
            toks[i, :n], mask[i, :n], tmask[i, :n] = e["tokens"], True, e["loss_mask"]
        s, c = nll(state, toks, mask, tmask)
        total, count = total + float(s), count + float(c)
    return float(np.exp(total / max(count, 1.0))), int(count)


def demo_config(train_dir: Path, out_dir: Path, overrides: Sequence[str] = (),
                recipe: str | Path = DEMO_RECIPE) -> TrainConfig:
    """The shipped demo recipe pointed at this run's data and output directory (then `overrides`)."""
    base = [f"output_dir={out_dir}"]
    cfg = load_config(TrainConfig, recipe, [])
    base += [f"stages.{i}.data.source={train_dir}" for i in range(len(cfg.stages))]
    return load_config(TrainConfig, recipe, base + list(overrides))


def loss_printer(name: str, steps: int, every: int, out: Callable[[str], None] = print
                 ) -> Callable[[int, dict[str, float]], None]:
    """A `fit` callback printing the stage's loss at its first step, every `every` steps and at its last, so the
    fall is visible without the progress bar."""
    def cb(step: int, m: dict[str, float]) -> None:
        if step == 1 or step % every == 0 or step == steps:
            extra = f"  (per-token KL {m['kl_token']:.4f})" if "kl_token" in m else ""
            out(f"  [{name}] step {step:3d}/{steps}  loss {m['loss']:.4f}{extra}")
    return cb


def distill_demo(teacher: Any, *, out_dir: str | Path = "runs/demo", sizes: DemoSizes = DemoSizes(),
                 overrides: Sequence[str] = (), recipe: str | Path = DEMO_RECIPE,
                 out: Callable[[str], None] = print) -> dict[str, Any]:
    """Teacher answers → hybrid (a few layers attention-initialised Mamba) → hidden alignment → KL stage →
    held-out perplexity ratio. `teacher` is a `convert.Teacher`. Returns a summary (also written to
    `out_dir/summary.json`) whose `student` is the trained hybrid."""
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.data.sources import load_examples
    from mamba_llama_jax.train.trainer import run_recipe

    root = Path(out_dir)
    t0 = time.perf_counter()
    train_dir, heldout_dir, gen_s = teacher_data(teacher.model, teacher.tokenizer, root / "data", sizes)
    n_train = len(load_examples(str(train_dir), "tokens"))
    out(f"teacher data: {n_train} training answers + {sizes.heldout_prompts} held-out answers (up to "
        f"{sizes.max_new_tokens} new tokens each) " + (f"generated in {gen_s:.1f} s" if gen_s else
                                                       f"reused from {root / 'data'}"))
    cfg = demo_config(train_dir, root / "train", overrides, recipe)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a fresh run every time: a resumed one would show no fall
    layout = cfg.hybrid
    mamba = [i for i in range(teacher.config.num_layers) if i not in set(layout.layers_for(teacher.config.num_layers))]
    out(f"student: layers {mamba} of {teacher.config.num_layers} become Mamba ({layout.mamba.variant}) mixers "
        "initialised from their attention weights; the rest is the teacher's")

    heldout = load_examples(str(heldout_dir), "tokens")
    held = [heldout[i] for i in range(len(heldout))]
    pad = teacher.tokenizer.pad_token_id or 0
    t_ppl, n_tok = answer_perplexity(teacher.model, held, pad_id=pad)
    # The same initialisation run_recipe uses for its first stage (same layout and seed), before any training.
    init = build_hybrid(teacher.model, layout, rngs=nnx.Rngs(cfg.seed))
    i_ppl, _ = answer_perplexity(init, held, pad_id=pad)
    del init

    t_train = time.perf_counter()
    student = run_recipe(recipe, config=cfg, teacher=teacher, progress=False,
                         stage_callbacks=lambda st: [loss_printer(st.name, st.steps, sizes.print_every, out)])
    train_s = time.perf_counter() - t_train
    s_ppl, _ = answer_perplexity(student, held, pad_id=pad)

    stages = []
    for st in cfg.stages:
        recs = [json.loads(ln) for ln in (Path(cfg.output_dir) / st.name / "metrics.jsonl").read_text().splitlines()
                if ln.strip()]
        stages.append({"name": st.name, "objective": st.objective, "steps": st.steps,
                       "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"],
                       "plot": str(Path(cfg.output_dir) / st.name / "loss.png")})
    summary = {
        "mamba_layers": mamba, "train_examples": n_train, "heldout_examples": len(held),
        "heldout_answer_tokens": n_tok, "generate_s": gen_s, "train_s": train_s,
        "ppl_teacher": t_ppl, "ppl_student_init": i_ppl, "ppl_student": s_ppl,
        "ratio_init": i_ppl / t_ppl, "ratio": s_ppl / t_ppl, "stages": stages,
        "total_s": time.perf_counter() - t0,
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, root / "summary.json")
    for s in stages:
        out(f"{s['name']}: loss {s['first_loss']:.4f} -> {s['last_loss']:.4f} over {s['steps']} steps "
            f"(plot: {s['plot']})")
    out(f"held-out perplexity of the teacher's answers to unseen prompt families ({n_tok} tokens): teacher "
        f"{t_ppl:.3f}; student before training {i_ppl:.3f} (ratio {i_ppl / t_ppl:.3f}); after {s_ppl:.3f} "
        f"(ratio {s_ppl / t_ppl:.3f})")
    summary["student"] = student
    return summary
