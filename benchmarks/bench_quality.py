"""The distillation-quality table: the PLAN and the driver (benchmarks/results/quality.md holds the plan; no
numbers until it has run on the device).

Device limits this is built around (KINDS/device README): 30 minutes of device time a session, at most 10 minutes
a call, 64 MiB carried into a call, /tmp kept only while the machine stays warm (at most 30 minutes held), and
big files (a 270 MB checkpoint) never come back. Hence:

- Call 0 (`corpus`, once, ~6 min): the teacher answers the offline prompts with the project's fast batched
  `Generator` on the device; ids come back compactly as uint16 npz files of at most 16 MiB each
  (`data/quality-corpus/train-<k>.npz`, token corpora a recipe's `data.source` can name), plus the held-out-family
  answers for the perplexity corpus (`eval/heldout.npz`). Later sessions carry these files (< 64 MiB) instead
  of regenerating them.
- One call per table row (`chain --fraction F --variant V`, budget 540 s of the 600 s limit): build the hybrid,
  every distillation stage (progressive layer-wise → end-to-end KL → SFT → DPO, ≤ 20 M tokens in all at sequence
  length 1024), then evaluate (ppl ratio on the held-out chats and pydoc, NIAH at 1×/4×/8× = 1024/4096/8192,
  the offline comparison with the teacher as judge), export to the MambaInLlama format in /tmp, re-import, check
  the logits match and record the sha256 — the model itself stays on the device. A wall-clock guard cuts
  training short (and says so in the row) rather than lose the call. Only a small json comes back under $OUT.
- The teacher's own row (ppl, NIAH ceiling) is one short call (`teacher`).
- `table` merges the json rows into benchmarks/results/quality.md. The table fills over several sessions.

Rows (variants): the table's recipe (TABLE_RECIPE, `quiet-fast` since session 6; `main`, the paper's, before) at
50/25/12.5/0 % attention; ablations on the 50 % hybrid, on top of that recipe: `random-init` (Mamba layers
freshly initialised instead of from attention), `reuse-<parts>` (only those of Q,K,V,O copied, e.g. reuse-QK,
reuse-V, reuse-none), `oneshot` (all layers converted at once, no progressive ladder), `no-sft-dpo` (distillation
stages only); experiments beyond the issue's rows: `quiet-init` (converted mixers start near "layer removed"),
`fast-lr` (learning rates sized to the token budget) and `quiet-fast` (both), `quiet-fast-mix` (quiet-fast whose
distillation stages also read copy-and-recall documents and standard-library prose, see MIX), see RECIPES; an ablation
on top of another recipe is `RECIPE+ABLATION` (e.g. quiet-fast+random-init); every recipe's plain row also
evaluates its model with the Mamba mixers dropped (outputs zeroed: what the distilled layers add) and after each
of distill / SFT / DPO (ppl only), so "with vs without SFT/DPO" costs no extra call.

    python benchmarks/bench_quality.py plan
    python benchmarks/bench_quality.py corpus --corpus data/quality-corpus       # device, once
    python benchmarks/bench_quality.py teacher --corpus data/quality-corpus      # device
    python benchmarks/bench_quality.py chain --fraction 50 --variant main --corpus data/quality-corpus  # device
    python benchmarks/bench_quality.py table                                    # here
    python benchmarks/bench_quality.py --tiny                                   # CPU smoke test, fixture teacher

On the device the teacher is not pip-installed: stage it (../shared/device/split-teacher) and pass
`--teacher /tmp/teacher/smollm2.gguf`; `chain --keep-model DIR` leaves the exported hybrid there (for a later
call on the same warm machine, e.g. the speculative-decoding benchmark's target). `chain --tokens N` trains a row
on another budget than the table's 6 M (≤ 20 M, the issue's cap), labelled `F/V@<N/1e6>M`: with `--phase train`
then `--phase eval` (two calls on one warm machine) a row can train ~12 M tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
ISSUE_MAX_TOKENS = 20_000_000  # the issue's cap per hybrid
# The fixed budget every row gets: what one 10-minute device call can train *and* evaluate. Measured on the H100
# (session 3): ~48k tokens/s per step, ~35 s of compile per stage (5 stages), ~220 s of evaluation + export. 6 M
# tokens = 366 steps ≈ 125 s + 175 s of compiles ≈ 300 s of training, which fits 60 % of the call. A time guard
# would otherwise give each row what its compiles left over, and rows would not be comparable.
TOKEN_BUDGET = 6_000_000
SEQ_LEN = 1024
CALL_BUDGET_S = 540
FRACTIONS = ("50", "25", "12.5", "0")
ABLATIONS = ("random-init", "reuse-QK", "reuse-V", "reuse-none", "oneshot", "no-sft-dpo")
# Beyond the issue's rows: the leads of the session-4 notes on the poor start (quality/notes.md). quiet-init:
# every newly converted mixer starts with an identity conv and its output norm scaled by QUIET_NORM_SCALE (near
# "layer removed", which measured better than the converted layer); fast-lr: learning rates sized to the 6 M-token
# budget instead of the paper's; quiet-fast: both.
QUIET_NORM_SCALE = 0.05
LEARNING_RATES = {"paper": {"layerwise": 8e-5, "end_to_end": 2e-5, "sft": 2e-5},
                  "fast-lr": {"layerwise": 1e-3, "end_to_end": 1e-4, "sft": 1e-4}}
# A recipe: (learning rates, quiet init). `main` is the paper's recipe; an ablation runs on top of any recipe as
# `RECIPE+ABLATION` (a bare ablation name means main+ABLATION).
RECIPES = {"main": ("paper", False), "quiet-init": ("paper", True), "fast-lr": ("fast-lr", False),
           "quiet-fast": ("fast-lr", True), "quiet-fast-mix": ("fast-lr", True)}
# Recipes whose distillation stages (layer-wise, end-to-end; not SFT, not DPO) also read plain text: the share of
# their tokens that are copy-and-recall documents and standard-library prose (`data/plain_text.py`), the rest the
# teacher's chat answers. The session-6 lead: the students copy badly and fit prose far worse than chats.
MIX = {"quiet-fast-mix": {"recall": 0.2, "prose": 0.05}}
GOALS = {"50": 1.05, "25": 1.10, "12.5": 1.15, "0": 1.30}
# The recipe of the table's rows (fractions and ablations) since session 6: the paper's recipe (`main`) started
# every hybrid far worse than its Mamba layers removed (quality/notes.md, session 4) and stays as a reference row.
TABLE_RECIPE = "quiet-fast"
# The chain's wall clock (its time budget); a test swaps in a fake one to cut stages deterministically.
clock = time.perf_counter
# Share of the token budget per phase: the layer-wise ladder, end-to-end KL, SFT, DPO.
SPLIT = {"layerwise": 0.45, "end_to_end": 0.35, "sft": 0.15, "dpo": 0.05}


def split_variant(variant: str) -> tuple[str, str]:
    """'quiet-fast+random-init' -> ('quiet-fast', 'random-init'); 'oneshot' -> ('main', 'oneshot');
    'quiet-fast' -> ('quiet-fast', '')."""
    recipe, plus, ablation = variant.partition("+")
    if not plus:
        recipe, ablation = (variant, "") if variant in RECIPES else ("main", variant)
    if recipe not in RECIPES or ablation not in ("",) + ABLATIONS or (plus and not ablation):
        raise ValueError(f"unknown variant {variant!r}: a recipe ({', '.join(RECIPES)}), an ablation "
                         f"({', '.join(ABLATIONS)}) or RECIPE+ABLATION")
    return recipe, ablation


def _variant_arg(variant: str) -> str:
    try:
        split_variant(variant)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return variant


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything that differs between the device run and the CPU smoke test."""

    teacher: str | None
    seq_len: int
    batch_size: int
    tokens: int
    niah_base: int
    niah_multipliers: tuple[float, ...]
    ppl_max_tokens: int
    chat_prompts: int
    corpus_prompts: int
    corpus_new_tokens: int
    corpus_samples: int
    dtype: str
    gen_batch: int
    chat_new_tokens: int
    compile_s: float = 0.0  # kept aside per stage for compiling its step before its share of the time is given


# Device corpus: every offline prompt (9,600) answered twice (two sampling seeds), ~4 M tokens: a row's 6 M-token
# budget reads the corpus about 1.5 times.
DEVICE = Scale(None, SEQ_LEN, 16, TOKEN_BUDGET, SEQ_LEN, (1, 4, 8), 65536, 32, 9600, 256, 2, "bfloat16",
               256, 128, compile_s=45.0)  # measured: 30-35 s a training stage on the H100/H200, DPO ~45 s
TINY = Scale(str(ROOT / "tests" / "fixtures" / "tiny_llama"), 64, 4, 64 * 4 * 12, 256, (1, 2), 512, 2, 16, 12, 2,
             "float32", 8, 8)


def ladder(fraction: str, oneshot: bool) -> list[Any]:
    """Stage layouts: 25 % Mamba (every 4th layer) first, then halve the attention until the target."""
    from mamba_llama_jax.config import HybridConfig

    target = HybridConfig(attn_fraction=float(fraction) / 100)
    if oneshot:
        return [target]
    steps = [HybridConfig(attn_fraction=f) for f in (0.5, 0.25, 0.125, 0.0) if f >= target.attn_fraction]
    return ["quarter"] + steps  # "quarter": resolved once the layer count is known


def _layout(spec: Any, num_layers: int) -> Any:
    from mamba_llama_jax.config import HybridConfig

    if spec == "quarter":
        return HybridConfig(attn_layers=tuple(i for i in range(num_layers) if i % 4 != 0))
    return spec


# --------------------------------------------------------------------------------------------------- corpus


def write_corpus(model: Any, tok: Any, out: Path, scale: Scale, seed: int = 0,
                 deadline_s: float | None = None) -> dict[str, Any]:
    """Teacher answers to the offline prompts (training: `train-<sample>.npz`, one token-corpus file per sampling
    seed, what a recipe's `data.source` reads) and to the held-out families (evaluation: `eval/heldout.npz`, kept
    apart so that pointing training at the directory never reads it), at most 16 MiB each. Files already there are
    kept (a cut-short call resumes); samples not started by `deadline_s` are left for a later call."""
    from mamba_llama_jax.data import sources
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_train = min(scale.corpus_prompts, sources.offline_prompt_count())
    jobs = [("eval/heldout", sources.heldout_prompts(min(60, scale.corpus_prompts), seed), seed)]
    jobs += [(f"train-{k}", sources.offline_prompts(n_train, seed), seed + 1000 * k)
             for k in range(scale.corpus_samples)]
    batch = scale.gen_batch
    gen = None  # built on first use: a corpus already complete needs no model
    info: dict[str, Any] = {}
    for name, prompts, sample_seed in jobs:
        path = out / f"{name}.npz"
        if path.exists():
            info[name] = {"kept": True, "bytes": path.stat().st_size}
            continue
        if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
            info[name] = {"skipped": "deadline"}
            continue
        t1 = time.perf_counter()
        gen = gen or Generator(model, pad_id=tok.pad_token_id)
        rows = []
        for b in range(0, len(prompts), batch):
            sampling = SamplingConfig(temperature=0.7, top_p=0.95, seed=sample_seed * 100003 + b,
                                      max_new_tokens=scale.corpus_new_tokens)
            rows += sources.answer_batch(gen, tok, prompts[b:b + batch], sampling, np.random.default_rng(b))
        sources.write_token_corpus(path, rows)
        if path.stat().st_size > 16 * 2 ** 20:
            raise SystemExit(f"{path} is over 16 MiB (too big to bring back): lower corpus_prompts per file")
        n_tok = sum(len(r["tokens"]) for r in rows)
        answer = sum(sum(r["loss_mask"]) for r in rows)
        dt = time.perf_counter() - t1
        info[name] = {"rows": len(rows), "tokens": n_tok, "answer_tokens": answer, "bytes": path.stat().st_size,
                      "seconds": round(dt, 1), "answer_tokens_per_s": round(answer / dt)}
        print(f"corpus {name}: {info[name]}", flush=True)
    return info


def corpus_files(corpus_dir: Path) -> list[Path]:
    """The training parts of a corpus (`train-*.npz`)."""
    files = sorted(corpus_dir.glob("train-*.npz"))
    if not files:
        raise SystemExit(f"no training corpus (train-*.npz) in {corpus_dir}: run `bench_quality.py corpus` first")
    return files


def read_corpus(path: Path) -> list[dict[str, list[int]]]:
    from mamba_llama_jax.data.sources import TokenCorpus

    c = TokenCorpus(path)
    return [c[i] for i in range(len(c))]


# ---------------------------------------------------------------------------------------------------- chain


def _reinit(model: Any, parts: str, seed: int) -> None:
    """Mamba layers keep only `parts` (of Q, K, V, O) from attention; the rest come from a fresh mixer."""
    from flax import nnx

    from mamba_llama_jax.models.mamba import Mamba2, make_mixer

    rngs = nnx.Rngs(seed)
    for i in model.mamba_layers:
        mixer = model.layers[i].mixer
        fresh = make_mixer(model.cfg, model.hybrid.mamba, rngs=rngs)
        if parts == "none-at-all":  # random init: the whole mixer fresh
            model.layers[i].mixer = fresh
            continue
        if not isinstance(mixer, Mamba2):
            raise SystemExit("reuse-* ablations are written for the Mamba2 variant")
        di, dxb = mixer.d_inner, mixer.d_xb
        w, f = mixer.in_proj.kernel[...], fresh.in_proj.kernel[...]
        spans = {"V": (di, di + dxb), "K": (di + dxb, di + 2 * dxb), "Q": (di + 2 * dxb, 2 * di + 2 * dxb)}
        for part, (a, b) in spans.items():
            if part not in parts:
                w = w.at[:, a:b].set(f[:, a:b])
        mixer.in_proj.kernel.set_value(w)
        if "O" not in parts:
            mixer.out_proj.kernel.set_value(fresh.out_proj.kernel[...])


def _loss_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """First and last logged losses of a stage and its training rate: enough to see from the row alone
    whether a stage learned or diverged."""
    keys = ("step", "loss", "kl", "ce", "grad_norm", "tokens_per_s")
    pick = lambda r: {k: r[k] for k in keys if k in r}
    return {"first": pick(records[0]), "last": pick(records[-1])} if records else {}


def _drop_mamba(model: Any) -> Any:
    """A copy whose Mamba mixers output zero: the layers keep their MLPs, the distilled mixers contribute nothing."""
    from flax import nnx

    m = nnx.clone(model)
    for i in m.mamba_layers:
        k = m.layers[i].mixer.out_proj.kernel
        k.set_value(k[...] * 0)
    return m


def _ppl(model: Any, corpora: dict[str, Any], scale: Scale) -> dict[str, float]:
    from mamba_llama_jax.eval.perplexity import evaluate_perplexity
    from mamba_llama_jax.eval.scoring import Scorer

    sc = Scorer(model, batch_size=scale.batch_size)
    return {k: evaluate_perplexity(sc, c, context=scale.seq_len).ppl for k, c in corpora.items()}


def _corpora(tok: Any, corpus_dir: Path, scale: Scale) -> dict[str, Any]:
    from mamba_llama_jax.eval.perplexity import pydoc_corpus, table_corpus

    held = read_corpus(corpus_dir / "eval" / "heldout.npz")
    return {"heldout": table_corpus("heldout", held, tok, max_tokens=scale.ppl_max_tokens),
            "pydoc": pydoc_corpus(tok, max_tokens=scale.ppl_max_tokens)}


def run_teacher(corpus_dir: Path, scale: Scale) -> dict[str, Any]:
    from mamba_llama_jax.convert import load_teacher
    from mamba_llama_jax.eval.niah import NiahConfig, run_niah

    t = load_teacher(scale.teacher, dtype=scale.dtype)
    niah = run_niah(t.model, t.tokenizer, NiahConfig(base_length=scale.niah_base,
                                                     multipliers=scale.niah_multipliers))
    return {"row": "teacher", "ppl": _ppl(t.model, _corpora(t.tokenizer, corpus_dir, scale), scale),
            "niah": {k: niah[k] for k in ("lengths", "depths", "rate", "rate_by_length", "overall")}}


PHASES = ("all", "train", "eval")


def run_chain(fraction: str, variant: str, corpus_dir: Path, scale: Scale, out_dir: Path,
              budget_s: float = CALL_BUDGET_S, seed: int = 0, keep_model: Path | None = None,
              save: Any = None, phase: str = "all", row: dict[str, Any] | None = None,
              tag: str = "") -> dict[str, Any]:
    """One table row end to end (module docstring); returns its json row. `save(row)` is called after training
    and after each measurement, so a call that runs out of time still brings back what it measured.

    `phase`: 'all' trains and evaluates in one call. A row whose stages' compiles leave too little of one call
    (the 12.5 % and 0 % ladders compile 7-8 steps) splits in two calls on one warm machine: 'train' trains with
    the whole budget and exports the model to `keep_model`; 'eval' reads that model and the 'train' call's
    `row`, and evaluates it. `tag`: appended to the row's name (`token_tag`)."""
    save = save or (lambda row: None)
    from mamba_llama_jax.convert import load_teacher

    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
    if phase != "all" and keep_model is None:
        raise ValueError(f"phase {phase!r} needs keep_model: the directory that carries the model between calls")
    t0 = clock()
    teacher = load_teacher(scale.teacher, dtype=scale.dtype)
    corpora = _corpora(teacher.tokenizer, corpus_dir, scale)
    if phase == "eval":
        from mamba_llama_jax.convert.mambainllama import import_mambainllama

        if row is None or row.get("phase") != "trained":
            raise ValueError("phase 'eval' needs the row its 'train' call wrote (phase 'trained')")
        _, _, student, _ = import_mambainllama(keep_model, dtype=scale.dtype)
        return _evaluate(dict(row), student, teacher, corpora, scale, variant, seed, save, t0, None)
    train_share = 0.95 if phase == "train" else 0.6  # 'all': the rest is evaluation, export and the reload check
    row, student, last_ppl = _train(fraction, variant, corpus_dir, scale, out_dir, budget_s * train_share, seed,
                                    teacher, corpora, t0, tag)
    save(row)
    # Exported before any evaluation: a call that runs out of time while evaluating still leaves the trained
    # model in `keep_model` (session 9 lost one to a NIAH evaluation that outlasted its call).
    t_export = clock()
    row["export"] = _export_check(student, teacher.tokenizer, keep_model)
    row["export_s"] = round(clock() - t_export, 1)
    if phase == "train":
        row["phase"] = "trained"
        row["total_s"] = clock() - t0
        return row
    save(row)
    row = _evaluate(row, student, teacher, corpora, scale, variant, seed, save, t0, last_ppl)
    row["total_s"] = clock() - t0
    return row


def _mixed(train: list[dict[str, Any]], tok: Any, shares: dict[str, float], seq_len: int,
           seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The distillation stages' rows: `train` plus plain-text rows making up `shares` of all tokens ({} = train
    alone). Recall documents are generated until their share is reached; the prose is what the standard library
    has, cut to its share (a smaller library gives less, which the returned token counts show)."""
    from mamba_llama_jax.data import plain_text

    if not shares:
        return train, {}
    count = lambda rows: sum(len(r["tokens"]) for r in rows)
    chat = count(train)
    total = chat / (1.0 - sum(shares.values()))
    recall: list[dict[str, Any]] = []
    batch = 0
    while count(recall) < shares.get("recall", 0.0) * total:
        recall += plain_text.text_rows(tok, plain_text.recall_documents(64, seed=seed * 1000 + batch), seq_len)
        batch += 1
    prose_all = plain_text.text_rows(tok, plain_text.stdlib_prose(), seq_len) if shares.get("prose") else []
    prose, budget = [], shares.get("prose", 0.0) * total
    for i in np.random.default_rng(seed).permutation(len(prose_all)):
        if count(prose) >= budget:
            break
        prose.append(prose_all[i])
    return train + recall + prose, {"chat_tokens": chat, "recall_tokens": count(recall),
                                    "prose_tokens": count(prose)}


def _train(fraction: str, variant: str, corpus_dir: Path, scale: Scale, out_dir: Path, train_budget: float,
           seed: int, teacher: Any, corpora: dict[str, Any], t0: float,
           tag: str = "") -> tuple[dict[str, Any], Any, Any]:
    """Builds the hybrid and runs every stage within `train_budget` seconds from `t0`: (row, student, the last
    perplexity measured, None when the student changed after it)."""
    from flax import nnx

    from mamba_llama_jax.config import DataConfig, LossConfig, OptimConfig, StageConfig
    from mamba_llama_jax.convert.from_attention import build_hybrid, quiet_start
    from mamba_llama_jax.data import pipeline, sources
    from mamba_llama_jax.train.trainer import fit

    tok, L = teacher.tokenizer, teacher.config.num_layers
    train = [row for f in corpus_files(corpus_dir) for row in read_corpus(f)]
    pairs_rng = np.random.default_rng(seed)
    pairs = []
    for ex in train:
        p = ex["loss_mask"].index(1) if 1 in ex["loss_mask"] else len(ex["tokens"])
        ans = ex["tokens"][p:]
        pairs.append({"prompt_ids": ex["tokens"][:p], "chosen_ids": ans,
                      "rejected_ids": sources.corrupt_answer(ans, pairs_rng)})
    recipe, ablation = split_variant(variant)
    distill_rows, mix_info = _mixed(train, tok, MIX.get(recipe, {}), scale.seq_len, seed)
    tokens_per_step = scale.batch_size * scale.seq_len
    steps_of = {k: max(1, int(scale.tokens * v) // tokens_per_step) for k, v in SPLIT.items()}
    lr_key, quiet = RECIPES[recipe]
    layouts = [_layout(x, L) for x in ladder(fraction, ablation == "oneshot")]
    lr = LEARNING_RATES[lr_key]
    phases: list[tuple[str, Any, StageConfig]] = []
    data = DataConfig(source="-", kind="tokens", seq_len=scale.seq_len, num_epochs=0)
    lw = LossConfig(ce_weight=1.0, kl_weight=0.1, kl_normalization="sequence_sum")
    for j, lay in enumerate(layouts):
        phases.append(("layerwise", lay, StageConfig(
            name=f"layerwise-{j}", data=dataclasses.replace(data, shuffle_seed=j), objective="distill",
            train="mamba", steps=max(1, steps_of["layerwise"] // len(layouts)), batch_size=scale.batch_size,
            loss=lw, optim=OptimConfig(lr=lr["layerwise"], warmup_steps=10, b2=0.98, grad_clip=0.1))))
    phases.append(("end_to_end", None, StageConfig(
        name="end-to-end", data=data, objective="distill", train="all", steps=steps_of["end_to_end"],
        batch_size=scale.batch_size, loss=LossConfig(ce_weight=0.0, kl_weight=1.0, kl_normalization="token_mean"),
        optim=OptimConfig(lr=lr["end_to_end"], warmup_steps=10, b2=0.98, grad_clip=1.0))))
    if ablation != "no-sft-dpo":
        phases.append(("sft", None, StageConfig(
            name="sft", data=dataclasses.replace(data, shuffle_seed=7), objective="distill", train="all",
            steps=steps_of["sft"], batch_size=scale.batch_size,
            loss=LossConfig(ce_weight=1.0, kl_weight=1.0, kl_normalization="token_mean"),
            optim=OptimConfig(lr=lr["sft"], warmup_steps=10, b2=0.98, grad_clip=1.0))))
        phases.append(("dpo", None, StageConfig(
            name="dpo", data=DataConfig(source="-", kind="pairs", seq_len=scale.seq_len, num_epochs=0,
                                        max_prompt_len=scale.seq_len // 2),
            objective="dpo", train="all", steps=steps_of["dpo"], batch_size=max(2, scale.batch_size // 2),
            loss=LossConfig(dpo_beta=0.01), optim=OptimConfig(lr=5e-7, warmup_steps=2))))

    row: dict[str, Any] = {"row": f"{fraction}/{variant}{tag}", "fraction": fraction, "variant": variant,
                           "planned_steps": {s.name: s.steps for _, _, s in phases}, "ran_steps": {},
                           "tokens": 0, "cut_short": [], "ppl_after": {}, **({"mix": mix_info} if mix_info else {})}
    student, last_ppl = None, None
    compile_s = scale.compile_s  # the allowance per stage, raised to the longest first step measured so far
    for n, (kind, lay, stage) in enumerate(phases):
        if lay is not None:
            converted = set() if student is None else set(student.mamba_layers)
            student, last_ppl = build_hybrid(teacher.model, lay, rngs=nnx.Rngs(seed + n), previous=student), None
            if n == 0 and ablation == "random-init":
                _reinit(student, "none-at-all", seed + 99)
            elif n == 0 and ablation.startswith("reuse-"):
                _reinit(student, ablation.split("-", 1)[1].replace("none", ""), seed + 99)
            if quiet:  # after a random-init ablation's fresh mixers, so that they start quiet too
                quiet_start(student, sorted(set(student.mamba_layers) - converted), QUIET_NORM_SCALE)
            if n == 0:  # the first layout, initialised, before any training: what the initialisation alone gives
                last_ppl = row["ppl_after"]["init"] = _ppl(student, corpora, scale)
        # Each stage gets its compile time plus the time left after every remaining stage's compile, in proportion
        # to its planned steps, so a slow device shortens every stage rather than starving the last ones (SFT,
        # DPO). The compile time is measured, not assumed: a stage's share of the pool is counted from the end of
        # its first step (compile + one step), and that time raises the allowance kept for the stages after it. A
        # fixed allowance made targets incomparable across hosts: on a host that compiled slower than it assumed,
        # the later stages ran one step each (speculative_s35_sampled.md).
        pool = train_budget - (clock() - t0) - compile_s * (len(phases) - n)
        share = max(pool, 0.0) * stage.steps / sum(s.steps for _, _, s in phases[n:])
        if clock() - t0 >= train_budget:  # spent: a stage would overrun the call by its compile at least
            row["cut_short"].append(stage.name)
            continue
        examples = pairs if stage.data.kind == "pairs" else train if kind == "sft" else distill_rows
        ds = pipeline.build_dataset(examples, tok, stage.data, batch_size=stage.batch_size)
        ref = nnx.clone(student) if stage.objective == "dpo" else teacher.model
        t_stage, first_step_end = clock(), []

        def out_of_time(step: int, m: dict[str, float], _first=first_step_end, _share=share) -> bool:
            now = clock()
            if not _first:
                _first.append(now)
            return now - _first[0] > _share

        res = fit(stage, student, ref, ds, out_dir=out_dir / row["row"].replace("/", "_") / stage.name,
                  progress=False, callbacks=[out_of_time])
        if res.stopped_early:
            row["cut_short"].append(stage.name)
        row["ran_steps"][stage.name] = res.steps
        row["tokens"] += res.steps * stage.batch_size * scale.seq_len
        row.setdefault("losses", {})[stage.name] = _loss_summary(res.metrics)
        row.setdefault("stage_s", {})[stage.name] = round(clock() - t_stage, 1)
        if first_step_end:
            first_s = first_step_end[0] - t_stage
            row.setdefault("first_step_s", {})[stage.name] = round(first_s, 1)
            compile_s = max(compile_s, first_s)
        last_ppl = None  # the student changed
        if n + 1 == len(phases) or phases[n + 1][0] != kind:  # after each phase (the ladder counts as one)
            last_ppl = row["ppl_after"][kind] = _ppl(student, corpora, scale)
    row["train_s"] = clock() - t0
    return row, student, last_ppl


def _evaluate(row: dict[str, Any], student: Any, teacher: Any, corpora: dict[str, Any], scale: Scale,
              variant: str, seed: int, save: Any, t0: float, last_ppl: Any) -> dict[str, Any]:
    """Perplexities (student, teacher, Mamba mixers dropped), NIAH and the chat comparison, saved as each ends."""
    from mamba_llama_jax.data import sources
    from mamba_llama_jax.eval.chat_compare import compare
    from mamba_llama_jax.eval.niah import NiahConfig, run_niah

    tok = teacher.tokenizer
    t_eval = clock()

    def lap(name: str) -> None:  # where the evaluation's time goes (it is ~40 % of a device call)
        nonlocal t_eval
        now = clock()
        row.setdefault("eval_s", {})[name] = round(now - t_eval, 1)
        t_eval = now
        save(row)

    teacher_ppl = _ppl(teacher.model, corpora, scale)
    ppl = last_ppl or _ppl(student, corpora, scale)  # measured already unless a stage ran after the last phase's
    row["ppl"] = ppl
    row["teacher_ppl"] = teacher_ppl
    row["ppl_ratio"] = {k: ppl[k] / teacher_ppl[k] for k in ppl}
    if not split_variant(variant)[1]:  # a recipe's main row
        dropped = _ppl(_drop_mamba(student), corpora, scale)
        row["mamba_dropped_ppl_ratio"] = {k: dropped[k] / teacher_ppl[k] for k in dropped}
    lap("ppl")
    niah = run_niah(student, tok, NiahConfig(base_length=scale.niah_base, multipliers=scale.niah_multipliers,
                                             batch_size=scale.batch_size))
    row["niah"] = {k: niah[k] for k in ("lengths", "depths", "rate", "rate_by_length", "overall",
                                        "digits_by_length")}
    # Every trial's answer (clipped): a rate of 0 alone cannot tell a wrong number from a broken answer.
    row["niah"]["cells"] = [dict(c, answer=c["answer"][:80]) for c in niah["cells"]]
    lap("niah")
    prompts = sources.heldout_prompts(scale.chat_prompts, seed + 1)
    chat = compare(student, teacher.model, tok, prompts, max_new_tokens=scale.chat_new_tokens,
                   batch_size=scale.batch_size)
    row["chat"] = chat["summary"]
    lap("chat")
    if row.get("phase") == "trained":  # the second call of a split row
        row["phase"] = "evaluated"
        row["eval_call_s"] = clock() - t0
    return row


def _export_check(student: Any, tok: Any, keep_model: Path | None) -> dict[str, Any]:
    """Export, re-import, same logits; the model itself stays on the device (too big to bring back)."""
    import jax

    from mamba_llama_jax.convert.mambainllama import export_mambainllama, import_mambainllama

    with tempfile.TemporaryDirectory() as tmp:
        path = export_mambainllama(student, keep_model or Path(tmp) / "export", dtype="float32", tokenizer=tok,
                                   overwrite=True)
        sha = {}
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".json"):
                sha[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        _, _, again, _ = import_mambainllama(path, dtype=student.cfg.dtype)
        probe = jax.numpy.asarray([tok.encode("The quick brown fox jumps over the lazy dog.")])
        a, _ = student(probe)
        b, _ = again(probe)
        return {"sha256": sha, "max_abs_logit_diff": float(jax.numpy.max(jax.numpy.abs(a - b))),
                "bytes": sum(f.stat().st_size for f in path.iterdir())}


# ---------------------------------------------------------------------------------------------------- table


def plan_text() -> str:
    steps = {k: int(TOKEN_BUDGET * v) // (DEVICE.batch_size * SEQ_LEN) for k, v in SPLIT.items()}
    # no-sft-dpo needs no row of its own: every row measures ppl before SFT and DPO too
    rows = ([f"{f}/{TABLE_RECIPE}" for f in FRACTIONS]
            + [f"50/{TABLE_RECIPE}+{a}" for a in ABLATIONS if a != "no-sft-dpo"] + [f"{f}/main" for f in FRACTIONS[:2]])
    return "\n".join([
        "# Distillation quality: plan and rows (filled over several sessions; `bench_quality.py table` writes this)",
        "",
        "Teacher: SmolLM2-135M-Instruct (embedded GGUF). Students: 50 / 25 / 12.5 / 0 % attention hybrids, Mamba2",
        "layers initialised from the attention weights, progressive ladder (25 % Mamba → 50 % → … → target).",
        f"Recipe of the table's rows: `{TABLE_RECIPE}` (each newly converted mixer starts quiet: identity conv, gated",
        f"norm ×{QUIET_NORM_SCALE}; learning rates sized to the token budget: layer-wise"
        f" {LEARNING_RATES['fast-lr']['layerwise']:g}, end-to-end and SFT"
        f" {LEARNING_RATES['fast-lr']['end_to_end']:g}). The paper's",
        f"recipe (`main`: learning rates {LEARNING_RATES['paper']['layerwise']:g} /"
        f" {LEARNING_RATES['paper']['end_to_end']:g},"
        " no quiet start) is kept as reference rows.",
        "",
        "## Device limits and how the run fits them",
        "- 30 min of device time per session, ≤ 10 min per call, 64 MiB carried per call, /tmp kept only while",
        "  the machine stays warm (≤ 30 min held); big files never come back.",
        "- Call 0 (`corpus`, once, done): teacher answers to the offline prompts + the held-out families, generated",
        "  with the fast `Generator`, returned as uint16 npz (≤ 16 MiB each); committed in `data/quality-corpus/`",
        "  (3.2 MB, `meta.json`: command, sha256s) and carried by later calls.",
        "- The teacher is staged on the device by two calls (`../shared/device/split-teacher`: 98 MB > 64 MiB), so",
        "  a session runs its calls back to back on one warm machine: stage part a (with a short job), stage part b",
        "  + a row, then a row per call; a persistent compilation cache in /tmp lets later rows reuse compiles.",
        "- One call per row (`chain`): stages → SFT → DPO → eval → export + reload check; a wall-clock guard",
        f"  ({CALL_BUDGET_S} s, training ≤ 60 % of it) cuts training short and records where (`cut_short`).",
        "- The teacher row (ppl, NIAH ceiling) is one short call; `table` merges the json rows here.",
        f"- {len(rows) + 2} calls in all (corpus, teacher, {len(rows)} rows): at ≤ 10 min each, 3–4 sessions.",
        "",
        "## Budget per hybrid",
        f"{TOKEN_BUDGET / 1e6:.0f} M distillation tokens (the issue allows ≤ {ISSUE_MAX_TOKENS / 1e6:.0f} M;"
        " this is what"
        f" one device call trains and evaluates: see TOKEN_BUDGET) at sequence length {SEQ_LEN}, batch"
        f" {DEVICE.batch_size}"
        f" ({DEVICE.batch_size * SEQ_LEN} tokens/step): layer-wise ladder {steps['layerwise']} steps (split over",
        f"its stages), end-to-end KL {steps['end_to_end']}, SFT {steps['sft']}, DPO {steps['dpo']} (pairs:",
        "the teacher's answer vs its corrupted copy). If a call cannot fit the steps, the row says how many ran.",
        "",
        "## Measurements per row",
        "- ppl ratio to the teacher on the held-out-family chats and on pydoc (context 1024, packed windows);",
        "  also after distillation / SFT / DPO (the with-vs-without SFT/DPO ablation for free).",
        "- NIAH retrieval at 1× / 4× / 8× the distillation length (1024 / 4096 / 8192 = the teacher's context),",
        "  5 depths × 2 trials; the teacher's own score is the ceiling.",
        "- Offline comparison vs the teacher (teacher as judge: length-normalised log-prob, judge prompt in both",
        "  orders, answer lengths) — a fidelity-to-teacher measure, not answer quality.",
        "- Export to the MambaInLlama format, re-import, max |Δ logits| on a probe, sha256 of every file.",
        "- Each recipe's plain row also reports ppl with the Mamba mixers dropped (zeroed): what the distilled",
        "  layers add.",
        "",
        "## Goals",
        "ppl ratio: 50 % ≤ 1.05, 25 % ≤ 1.10, 12.5 % ≤ 1.15, 0 % ≤ 1.30; NIAH ≥ 95 % at 8× for the 50 % hybrid",
        "(or the teacher's own score if lower); attention init clearly better than random init. Where a goal is",
        "missed, the filled table will say by how much and what would close it.",
        "",
        "## Rows",
        "| row | ppl ratio heldout | ppl ratio pydoc | NIAH 1× | NIAH 4× | NIAH 8× | judge win | tokens | export ok |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r} | — | — | — | — | — | — | — | — |" for r in ["teacher"] + rows],
        "",
    ])


def _niah_digits(row: dict[str, Any]) -> dict[str, float]:
    """Share of the needle's leading digits copied, per length: stored by rows since session 6, else recomputed
    from the rows' answers (`cells`); {} for rows that kept neither."""
    from mamba_llama_jax.eval.niah import digit_prefix

    niah = row.get("niah", {})
    if "digits_by_length" in niah:
        return niah["digits_by_length"]
    by: dict[str, list[float]] = {}
    for c in niah.get("cells", []):
        by.setdefault(str(c["length"]), []).append(digit_prefix(c["answer"], c["value"]))
    return {k: sum(v) / len(v) for k, v in by.items()}


def _before_sft(row: dict[str, Any]) -> float | None:
    """Held-out ppl ratio after distillation, before SFT and DPO (the with-vs-without SFT/DPO ablation)."""
    after = row.get("ppl_after", {}).get("end_to_end", {}).get("heldout")
    teacher = row.get("teacher_ppl", {}).get("heldout")
    return None if after is None or not teacher else after / teacher


def goals_text(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals against the table recipe's rows, computed from the rows (never written by hand)."""
    by = {r["row"]: r for r in rows if r.get("phase") != "trained"}
    out = ["## Goals against the rows (computed by `table`)", "",
           "| goal | measured | verdict |", "|---|---|---|"]
    for f, goal in GOALS.items():
        r = by.get(f"{f}/{TABLE_RECIPE}")
        ratio = r and r.get("ppl_ratio", {}).get("heldout")
        if ratio is None:
            out.append(f"| {f} % ppl ratio ≤ {goal:.2f} | no row | open |")
        else:
            verdict = 'met' if ratio <= goal else f'missed by {ratio - goal:.2f} ({ratio / goal:.2f}x the goal)'
            out.append(f"| {f} % ppl ratio ≤ {goal:.2f} | {ratio:.3f} (pydoc {r['ppl_ratio'].get('pydoc', 0):.2f})"
                       f" | {verdict} |")
    r, t = by.get(f"50/{TABLE_RECIPE}"), by.get("teacher")
    if r and t and "niah" in r and "niah" in t:
        eight = r["niah"]["lengths"][-1]
        got = r["niah"]["rate_by_length"][str(eight)]
        ceiling = min(0.95, t["niah"]["rate_by_length"][str(eight)])
        digits = _niah_digits(r).get(str(eight))
        out.append(f"| 50 % NIAH at {eight} ≥ {ceiling:.2f} (teacher {t['niah']['rate_by_length'][str(eight)]:.2f})"
                   f" | {got:.2f}{'' if digits is None else f'; leading digits {digits:.2f}'}"
                   f" | {'met' if got >= ceiling else f'missed by {ceiling - got:.2f}'} |")
    a, b = by.get(f"50/{TABLE_RECIPE}"), by.get(f"50/{TABLE_RECIPE}+random-init")
    if a and b:
        ra, rb = a["ppl_ratio"], b["ppl_ratio"]
        better = [k for k in ra if ra[k] < rb[k]]
        out.append(f"| attention init better than random init | held-out {ra['heldout']:.3f} vs {rb['heldout']:.3f},"
                   f" pydoc {ra['pydoc']:.2f} vs {rb['pydoc']:.2f} (tokens {a.get('tokens')} vs {b.get('tokens')})"
                   f" | better on {', '.join(better) or 'neither corpus'} |")
    return out + [""]


def table(rows_dir: Path) -> str:
    """quality.md: the plan, one table line per json row in `rows_dir` (teacher first), the goals against the
    rows, then `rows_dir/notes.md` (what each session ran and what it found) when there is one."""
    def fmt(x: Any, spec: str = ".3f") -> str:
        return "—" if x is None else format(x, spec)

    rows = [json.loads(f.read_text()) for f in sorted(rows_dir.glob("*.json"))]
    rows.sort(key=lambda r: (r["row"] != "teacher", r["row"]))
    lines = [plan_text().split("## Rows")[0] + "## Rows",
             "ppl: the row's perplexity and, in brackets, its ratio to the teacher's. Before SFT/DPO: the held-out"
             " ratio after distillation alone (same model, measured before its SFT and DPO stages). Dropped: the"
             " held-out ratio with the Mamba mixers zeroed (recipes' plain rows). NIAH: exact-match retrieval rate"
             " at 1× / 4× / 8× the distillation length; digits: share of the needle's leading digits copied (rows"
             " that kept their answers). Judge win: the teacher as judge, both orders averaged (0.5 = a tie).", "",
             "| row | date | ppl heldout (ratio) | ppl pydoc (ratio) | before SFT/DPO | dropped | NIAH 1× / 4× / 8× |"
             " digits | judge win | tokens | cut short | Δlogits after reload |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl, ratio = r.get("ppl", {}), r.get("ppl_ratio", {"heldout": 1.0, "pydoc": 1.0} if r["row"] == "teacher"
                                                        else {})
        niah = r.get("niah", {}).get("rate_by_length", {})
        digits = _niah_digits(r)
        lines.append(
            f"| {r['row']}{' (trained; evaluation call missing)' if r.get('phase') == 'trained' else ''} |"
            f" {r.get('date', '—')[:10]} | {fmt(ppl.get('heldout'), '.2f')} ({fmt(ratio.get('heldout'))})"
            f" | {fmt(ppl.get('pydoc'), '.2f')} ({fmt(ratio.get('pydoc'))})"
            f" | {fmt(_before_sft(r))} | {fmt(r.get('mamba_dropped_ppl_ratio', {}).get('heldout'), '.4g')}"
            f" | {' / '.join(fmt(v, '.2f') for v in niah.values()) or '—'}"
            f" | {' / '.join(fmt(v, '.2f') for v in digits.values()) or '—'}"
            f" | {fmt(r.get('chat', {}).get('judge_win_rate'))} | {r.get('tokens', '—')}"
            f" | {', '.join(r.get('cut_short', [])) or '—'}"
            f" | {fmt(r.get('export', {}).get('max_abs_logit_diff'), '.2g')} |")
    lines += [""] + goals_text(rows)
    notes = rows_dir / "notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def heatmaps(rows_dir: Path) -> list[Path]:
    """The NIAH heat map (depth × length) of the teacher and of the table recipe's rows, next to the rows."""
    from mamba_llama_jax.eval.niah import save_heatmap

    keep = {"teacher"} | {f"{f}/{TABLE_RECIPE}" for f in FRACTIONS}
    out = []
    for f in sorted(rows_dir.glob("*.json")):
        r = json.loads(f.read_text())
        if r["row"] in keep and "rate" in r.get("niah", {}):
            out.append(save_heatmap(r["niah"], rows_dir / f"niah_{f.stem}.png", title=f"NIAH: {r['row']}")[0])
    return out


def row_file(rows_dir: Path, row: str) -> Path:
    """Where a row ('50/main', 'teacher') is saved: one json file per row (plain characters only: the device
    returns no file whose name has others)."""
    return rows_dir / f"{row.replace('/', '_').replace('+', '_').replace('@', '_')}.json"


def token_tag(tokens: int) -> str:
    """'' for the table's budget, '@12M' for another: rows of different budgets never share a name."""
    return "" if tokens == TOKEN_BUDGET else f"@{tokens / 1e6:g}M"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", nargs="?", default="plan", choices=("plan", "corpus", "teacher", "chain", "table"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: fixture teacher, a handful of steps")
    ap.add_argument("--fraction", default="50", choices=FRACTIONS)
    ap.add_argument("--variant", default="main", type=_variant_arg,
                    help=f"a recipe ({', '.join(RECIPES)}), an ablation ({', '.join(ABLATIONS)}), or RECIPE+ABLATION")
    ap.add_argument("--corpus", default="data/quality-corpus", type=Path)
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS / "quality")), type=Path)
    ap.add_argument("--budget-s", type=float, default=CALL_BUDGET_S)
    ap.add_argument("--teacher", default=None, help="teacher GGUF/HF dir (default: the embedded SmolLM2)")
    ap.add_argument("--keep-model", default=None, type=Path, metavar="DIR",
                    help="chain: export the trained hybrid here (MambaInLlama format) and keep it")
    ap.add_argument("--tokens", type=float, default=TOKEN_BUDGET,
                    help=f"a chain row's distillation tokens (default {TOKEN_BUDGET:,}, at most {ISSUE_MAX_TOKENS:,})")
    ap.add_argument("--phase", default="all", choices=PHASES,
                    help="chain: 'all' (one call), or 'train' then 'eval' (two calls on one warm machine, same "
                    "--keep-model and --out: for rows whose compiles leave too little of one call)")
    a = ap.parse_args(argv)
    if a.tiny:
        return smoke(a.out if a.out != RESULTS / "quality" else Path(tempfile.mkdtemp(prefix="bench_quality_")))
    if not 0 < a.tokens <= ISSUE_MAX_TOKENS:
        ap.error(f"--tokens must be in (0, {ISSUE_MAX_TOKENS:,}], got {a.tokens:,.0f}")
    scale = dataclasses.replace(DEVICE, teacher=a.teacher, tokens=int(a.tokens))
    tag = token_tag(scale.tokens)
    if a.command == "plan":
        print(plan_text())
        return 0
    if a.command == "table":
        _write(RESULTS / "quality.md", table(a.out))
        heatmaps(a.out)
        return 0
    # Rows of one session share most programs (same layouts and shapes): compile once per warm machine.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jax-cache-bench_quality"))
    if a.command == "corpus":
        from mamba_llama_jax.convert import load_teacher

        t = load_teacher(scale.teacher, dtype=scale.dtype)
        print(json.dumps(write_corpus(t.model, t.tokenizer, a.corpus, scale, deadline_s=a.budget_s)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_env import device, now, versions

    env = {"date": now(), "device": device(), "versions": versions()}

    def save(row: dict[str, Any]) -> None:
        row.update(env)
        _write(row_file(a.out, row["row"]), json.dumps(row, indent=1))

    if a.phase != "all" and a.keep_model is None:
        ap.error(f"--phase {a.phase} needs --keep-model DIR (where the model waits between the two calls)")
    previous = None
    if a.command == "chain" and a.phase == "eval":
        path = row_file(a.out, f"{a.fraction}/{a.variant}{tag}")
        if not path.exists():
            ap.error(f"--phase eval: {path} is missing; run --phase train with the same --out first")
        previous = json.loads(path.read_text())
    row = run_teacher(a.corpus, scale) if a.command == "teacher" else run_chain(
        a.fraction, a.variant, a.corpus, scale, Path(tempfile.mkdtemp(prefix="chain_")), a.budget_s,
        keep_model=a.keep_model, save=save, phase=a.phase, row=previous, tag=tag)
    save(row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("niah",)}, indent=1, default=str))
    return 0


def smoke(out: Path) -> int:
    """Every code path of the device run, on the tiny fixture teacher, in about a minute of CPU."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from mamba_llama_jax.convert import load_teacher

    t0 = time.perf_counter()
    scale = TINY
    t = load_teacher(scale.teacher, dtype=scale.dtype)
    corpus = out / "corpus"
    info = write_corpus(t.model, t.tokenizer, corpus, scale)
    rows = [run_teacher(corpus, scale)]
    for variant in ("main", "random-init"):
        rows.append(run_chain("50", variant, corpus, scale, out / "runs", budget_s=600))
    for r in rows:
        _write(row_file(out / "rows", r["row"]), json.dumps(r, indent=1))
    print(table(out / "rows"))
    print(f"corpus {info}; smoke test done in {time.perf_counter() - t0:.0f} s; rows in {out / 'rows'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
