"""Command line: `python run.py <command> ...` (or the `mamba-llama` script).

User mistakes (a `MambaLlamaError`) print `error: <message>` on stderr and exit with status 2, never a traceback;
a training run stopped by SIGTERM saves a checkpoint, prints `preempted: ...` and exits with 143.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

from mamba_llama_jax.errors import MambaLlamaError, Preempted

# The project uses transformers for tokenizers only, never its torch models: its "PyTorch was not found" advice
# would only confuse CLI users.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 plus 7?",
)


def _default_dtype() -> str:
    # XLA's CPU backend runs bf16 matmuls far slower than fp32; accelerators want bf16.
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def hybrid_config_for(spec: str) -> Any:
    """`--hybrid` value: a percentage of attention kept (50, 25, 12.5, 0: configs/hybrids/) or a yaml path."""
    from pathlib import Path

    from mamba_llama_jax.config import HybridConfig, load_config
    from mamba_llama_jax.errors import ConfigError

    shipped = Path(__file__).resolve().parents[1] / "configs" / "hybrids" / f"{spec}.yaml"
    if shipped.is_file():
        return load_config(HybridConfig, shipped)
    if spec.endswith((".yaml", ".yml", ".json")):
        return load_config(HybridConfig, spec)
    try:
        pct = float(spec)
    except ValueError:
        raise ConfigError(f"--hybrid takes a percentage of attention kept (50, 25, 12.5, 0) or a yaml file, "
                          f"got {spec!r}") from None
    return HybridConfig(attn_fraction=pct / 100)


def _load(args: argparse.Namespace) -> Any:
    """The model to run: the teacher, a hybrid built from it (`--hybrid`), or a saved hybrid (`--model`)."""
    from flax import nnx

    from mamba_llama_jax.convert import Teacher, load_teacher
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.convert.mambainllama import import_mambainllama
    from mamba_llama_jax.errors import ConfigError

    dtype = _default_dtype() if args.dtype == "auto" else args.dtype
    if getattr(args, "model", None) and getattr(args, "hybrid", None):
        raise ConfigError("give --model (a saved hybrid) or --hybrid (build one from the teacher), not both")
    if getattr(args, "model", None):
        cfg, _, model, tok = import_mambainllama(args.model, dtype=dtype)
        if tok is None:  # the official format may leave the tokenizer to the base model
            tok = load_teacher(args.teacher, dtype=dtype).tokenizer
        return Teacher(cfg, model, tok)
    teacher = load_teacher(args.teacher, dtype=dtype)
    if getattr(args, "hybrid", None):
        hybrid = build_hybrid(teacher.model, hybrid_config_for(args.hybrid), rngs=nnx.Rngs(args.init_seed),
                              quiet=getattr(args, "quiet_start", None))
        return Teacher(teacher.config, hybrid, teacher.tokenizer)
    return teacher


def cmd_convert(args: argparse.Namespace) -> int:
    from mamba_llama_jax.convert.mambainllama import export_mambainllama

    if not args.hybrid:
        from mamba_llama_jax.errors import ConfigError

        raise ConfigError("convert needs --hybrid (e.g. 50 for 50 % attention kept)")
    loaded = _load(args)
    out = export_mambainllama(loaded.model, args.out, dtype=args.save_dtype, tokenizer=loaded.tokenizer,
                              overwrite=args.overwrite)
    model = loaded.model
    print(f"wrote {out}: {len(model.attn_layers)} attention layers {list(model.attn_layers)}, "
          f"{len(model.mamba_layers)} Mamba layers initialised from attention")
    return 0


def _sampling(args: argparse.Namespace) -> Any:
    from mamba_llama_jax.inference.generate import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_new_tokens=args.max_new_tokens)


def _generator(teacher: Any) -> Any:
    from mamba_llama_jax.inference.generate import Generator

    return Generator(teacher.model, pad_id=teacher.tokenizer.pad_token_id)


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)  # validate options before the (slow) model load
    teacher = _load(args)
    gen = _generator(teacher)
    answers = gen.generate(teacher.tokenizer, args.prompt, sampling, chat=not args.no_chat, stop=args.stop,
                           system=args.system)
    for i, a in enumerate(answers):
        if len(answers) > 1:
            print(f"--- [{i}] {args.prompt[i]}")
        print(a)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from mamba_llama_jax.errors import GenerationError

    sampling = _sampling(args)
    teacher = _load(args)
    gen = _generator(teacher)
    tok = teacher.tokenizer
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    print("chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for delta in gen.stream_text(tok, messages, sampling, stop=args.stop):
                reply.append(delta)
                print(delta, end="", flush=True)
        except GenerationError as e:
            # Usually the history outgrew the context: start afresh rather than end the session.
            print(f"\nerror: {e}\n(history cleared)", file=sys.stderr)
            messages = list(base)
            continue
        except KeyboardInterrupt:
            print(" [interrupted]", file=sys.stderr)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_demo(args: argparse.Namespace) -> int:
    import jax

    from mamba_llama_jax.inference.generate import SamplingConfig

    t0 = time.perf_counter()
    teacher = _load(args)
    cfg = teacher.config
    print(f"teacher: {cfg.num_layers} layers, d={cfg.hidden_size}, vocab {cfg.vocab_size}, dtype {cfg.dtype}, "
          f"on {jax.default_backend()} ({jax.device_count()} device(s)); loaded in {time.perf_counter() - t0:.1f} s")
    gen = _generator(teacher)
    tok = teacher.tokenizer
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)  # greedy: reproducible answers
    ids = gen.encode_prompts(tok, DEMO_PROMPTS, chat=True)
    t1 = time.perf_counter()
    gen.run(ids, sampling, eos_ids=tok.eos_token_ids)  # compiles prefill and the decode loop
    print(f"compiled (and ran once) in {time.perf_counter() - t1:.1f} s")
    res = gen.run(ids, sampling, eos_ids=tok.eos_token_ids)
    for prompt, answer in zip(DEMO_PROMPTS, res.ids()):
        print(f"\nuser: {prompt}\nassistant: {tok.decode(answer).strip()}")
    new = sum(res.lengths)
    print(f"\nbatch of {len(ids)} prompts: prefill {res.prompt_tokens} tokens in {res.prefill_s * 1e3:.0f} ms "
          f"({res.prompt_tokens / res.prefill_s:,.0f} tokens/s); decode {res.steps} steps, {new} new tokens in "
          f"{res.decode_s:.2f} s ({new / res.decode_s:,.1f} tokens/s, "
          f"{res.decode_s / max(res.steps, 1) * 1e3:.1f} ms/step)")
    if not args.no_distill and not (args.model or args.hybrid):
        from mamba_llama_jax.demo import DemoSizes, distill_demo
        from mamba_llama_jax.inference.generate import Generator

        print("\n--- distillation on CPU: a small instance of the recipe (the full recipes are meant for a GPU or "
              "TPU: see configs/recipes/ and the README) ---")
        sizes = DemoSizes(train_prompts=args.train_prompts)
        summary = distill_demo(teacher, out_dir=args.out, sizes=sizes, overrides=args.overrides)
        student = summary["student"]
        sgen = Generator(student, pad_id=tok.pad_token_id)
        sres = sgen.run(ids, sampling, eos_ids=tok.eos_token_ids)
        print(f"\nthe hybrid ({len(summary['mamba_layers'])} Mamba layers) answers the same prompts:")
        for prompt, answer in zip(DEMO_PROMPTS, sres.ids()):
            print(f"\nuser: {prompt}\nhybrid: {tok.decode(answer).strip()}")
        print(f"\nThis was a taste on {jax.default_backend().upper()}: {summary['train_examples']} training answers "
              f"and a few dozen steps, so expect the held-out ratio ({summary['ratio']:.3f}) to stay above 1. The "
              "full recipes (run.py pipeline --config configs/recipes/smollm2-135m-layerwise.yaml, llama3-8b-*) "
              "are meant for a GPU or TPU. Outputs (metrics, loss plots, summary.json) are in "
              f"{args.out}.")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


def dataset_prompts(source: str, limit: int) -> list[str]:
    """The first user message of each chat row of a dataset (local file/dir or a `datasets` hub name)."""
    from mamba_llama_jax.data.sources import load_examples
    from mamba_llama_jax.errors import DataError

    rows = load_examples(source, "chat", max_examples=limit)
    prompts = []
    for i in range(len(rows)):
        msgs = rows[i].get("messages") or []
        user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
        if user:
            prompts.append(user)
    if not prompts:
        raise DataError(f"{source}: no rows with a user message to answer")
    return prompts


def cmd_gen_labels(args: argparse.Namespace) -> int:
    from mamba_llama_jax.data.sources import generate_offline

    prompts = dataset_prompts(args.dataset, args.num_prompts) if args.dataset else None
    teacher = _load(args)
    t0 = time.perf_counter()
    out = generate_offline(teacher.model, teacher.tokenizer, args.out, num_prompts=args.num_prompts,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           temperature=args.temperature, seed=args.seed, prompts=prompts,
                           shard_index=args.shard_index, shard_count=args.shard_count)
    print(f"wrote the teacher's answers to {out} in {time.perf_counter() - t0:.1f} s "
          f"(parts already there were kept; rerun to resume)")
    return 0


def _load_draft(path: str, dtype: str) -> Any:
    """A draft model: a saved hybrid (MambaInLlama directory) or a Llama (GGUF file / HF directory)."""
    from pathlib import Path

    from mamba_llama_jax.convert import load_teacher
    from mamba_llama_jax.convert.mambainllama import import_mambainllama

    from mamba_llama_jax.errors import ModelFormatError

    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"draft not found: {p} (expected a saved hybrid directory, a .gguf file or an HF "
                               "model directory)")
    if (p / "mamba_config.json").is_file():
        return import_mambainllama(p, dtype=dtype)[2]
    return load_teacher(p, dtype=dtype).model


def _target_and_draft(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(target teacher bundle, draft model, reduced draft vocabulary or None) for speculate / acceptance."""
    from mamba_llama_jax.errors import ConfigError
    from mamba_llama_jax.inference.speculative import draft_vocabulary

    target = _load(args)
    dtype = _default_dtype() if args.dtype == "auto" else args.dtype
    draft = _load_draft(args.draft, dtype)
    if draft.cfg.vocab_size != target.config.vocab_size:
        raise ConfigError(f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                          f"({target.config.vocab_size}): they must share a tokenizer")
    subset = None
    if args.draft_vocab:
        if not 0 < args.draft_vocab <= draft.cfg.vocab_size:
            raise ConfigError(f"--draft-vocab must be in 1..{draft.cfg.vocab_size} (the vocabulary), "
                              f"got {args.draft_vocab}")
        subset = draft_vocabulary(draft.cfg.vocab_size, args.draft_vocab, keep=target.tokenizer.eos_token_ids)
    return target, draft, subset


def _prompt_ids(tok: Any, prompts: list[str], chat: bool) -> list[list[int]]:
    return [tok.encode_chat([{"role": "user", "content": p}]) if chat else tok.encode(p) for p in prompts]


def cmd_speculate(args: argparse.Namespace) -> int:
    from mamba_llama_jax.errors import ConfigError
    from mamba_llama_jax.inference.speculative import speculative_generate

    sampling = _sampling(args)
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    if not 0.0 <= args.draft_stop < 1.0:
        raise ConfigError(f"--draft-stop must be in [0, 1), got {args.draft_stop}")
    target, draft, subset = _target_and_draft(args)
    tok = target.tokenizer
    ids = _prompt_ids(tok, args.prompt, not args.no_chat)
    out, stats = speculative_generate(target.model, draft, ids, k=args.k, sampling=sampling,
                                      eos_ids=tok.eos_token_ids, pad_id=tok.pad_token_id, draft_vocab=subset,
                                      stop=args.draft_stop)
    for prompt, answer in zip(args.prompt, out):
        if len(out) > 1:
            print(f"--- {prompt}")
        print(tok.decode(answer).strip())
    print(f"k={stats.k}: {stats.rounds} rounds, {stats.drafts_per_round:.2f} drafts and {stats.tokens_per_round:.2f} "
          f"tokens per round, acceptance {stats.acceptance_rate:.2f}, {stats.seconds:.2f} s", file=sys.stderr)
    return 0


def cmd_acceptance(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from mamba_llama_jax.data.sources import heldout_prompts
    from mamba_llama_jax.errors import ConfigError
    from mamba_llama_jax.eval.acceptance import iid_prediction, pool, predict_acceptance, sampling_alpha

    if not args.k or min(args.k) < 1:
        raise ConfigError(f"--k must be integers >= 1, got {args.k}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError(f"--max-new-tokens and --batch-size must be >= 1, got {args.max_new_tokens} and "
                          f"{args.batch_size}")
    prompts = list(args.prompt) + (heldout_prompts(args.heldout_prompts) if args.heldout_prompts else [])
    if not prompts:
        raise ConfigError("give prompts: --prompt TEXT (repeatable) and/or --heldout-prompts N")
    target, draft, subset = _target_and_draft(args)
    tok = target.tokenizer
    ids = _prompt_ids(tok, prompts, not args.no_chat)
    t0 = time.perf_counter()
    batches = [ids[i:i + args.batch_size] for i in range(0, len(ids), args.batch_size)]
    sampling = _sampling(args)
    if sampling.temperature > 0:
        parts = [sampling_alpha(target.model, draft, b, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                eos_ids=tok.eos_token_ids, draft_vocab=subset, pad_id=tok.pad_token_id)
                 for b in batches]
        alpha = sum(a * n for a, n in parts) / max(1, sum(n for _, n in parts))
        rows = [iid_prediction(k, alpha) for k in args.k]
        print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, sampling at temperature "
              f"{sampling.temperature:g}; a draft token is accepted with probability {alpha:.3f} on average along "
              f"the target's sampled text (an estimate: each draft of a round taken as accepted with that "
              f"probability) ({time.perf_counter() - t0:.1f} s)")
        print(f"{'k':>3} {'acceptance':>10} {'tokens/round':>12}")
        for r in rows:
            print(f"{r.k:>3} {r.acceptance_rate:>10.3f} {r.tokens_per_round:>12.2f}")
    else:
        preds = [predict_acceptance(target.model, draft, b, ks=args.k, max_new_tokens=args.max_new_tokens,
                                    eos_ids=tok.eos_token_ids, draft_vocab=subset, pad_id=tok.pad_token_id)
                 for b in batches]
        rows = [pool([b[j] for b in preds], [len(b) for b in batches]) for j in range(len(args.k))]
        print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy; the draft predicts "
              f"{rows[0].agreement:.3f} of the target's tokens when fed the target's text "
              f"({time.perf_counter() - t0:.1f} s)")
        print(f"{'k':>3} {'acceptance':>10} {'tokens/round':>12}  accepted per round (0..k)")
        for r in rows:
            print(f"{r.k:>3} {r.acceptance_rate:>10.3f} {r.tokens_per_round:>12.2f}  {r.accepted_hist}")
    if args.json:
        from pathlib import Path
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                                       sampling=dataclasses.asdict(sampling), estimate=sampling.temperature > 0,
                                       draft_vocab=None if subset is None else len(subset),
                                       rows=[r.as_dict() for r in rows]), indent=1))
    return 0


# The one-stage training commands and the stage objectives each accepts (`pipeline` takes any recipe).
STAGE_COMMANDS = {
    "distill": ("distill", "hidden", "orient"),
    "sft": ("distill",),
    "dpo": ("dpo",),
}


def check_stage_command(command: str, cfg: Any) -> None:
    """`distill|sft|dpo` run a recipe of exactly one stage whose objective is the command's."""
    from mamba_llama_jax.errors import ConfigError

    if len(cfg.stages) != 1:
        raise ConfigError(f"run.py {command} runs a one-stage recipe; this one has {len(cfg.stages)} stages "
                          f"({', '.join(s.name for s in cfg.stages)}): use run.py pipeline for it")
    st = cfg.stages[0]
    allowed = STAGE_COMMANDS[command]
    if st.objective not in allowed:
        fits = [c for c, objs in STAGE_COMMANDS.items() if st.objective in objs]
        raise ConfigError(f"run.py {command} runs a stage with objective {' or '.join(map(repr, allowed))}; stage "
                          f"{st.name!r} has objective {st.objective!r}: use run.py {fits[0]}")
    if command == "sft" and st.loss.ce_weight <= 0:
        raise ConfigError(f"run.py sft trains on the data's answers: stage {st.name!r} needs loss.ce_weight > 0 "
                          "(a KL-only stage is distillation: use run.py distill)")


def cmd_train(args: argparse.Namespace) -> int:
    """pipeline | distill | sft | dpo: load the recipe, check it fits the command, run it (resuming)."""
    if args.distributed:
        from mamba_llama_jax.train.mesh import initialize_distributed

        initialize_distributed()  # before anything touches a device
    from mamba_llama_jax.config import TrainConfig, load_config
    from mamba_llama_jax.train.trainer import run_recipe

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.command in STAGE_COMMANDS:
        check_stage_command(args.command, cfg)
    init = None
    if args.model:
        from mamba_llama_jax.convert.mambainllama import import_mambainllama

        init = import_mambainllama(args.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)[2]
    run_recipe(args.config, config=cfg, init=init)
    import jax

    if jax.process_count() == 1:  # several hosts: not exported (trainer.export_student says why)
        print(f"trained model: {cfg.output_dir}/model")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """`pipeline`: `cmd_train` under its own name, which the preemption test replaces."""
    return cmd_train(args)


def _write_json(path: str, data: Any) -> None:
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, out)


def cmd_eval(args: argparse.Namespace) -> int:
    """Every metric asked for, on the model (`--model`/`--hybrid`) and, as the baseline, on the teacher."""
    from pathlib import Path

    from mamba_llama_jax.errors import ConfigError

    if not (args.ppl or args.niah or args.lm_eval or args.chat):
        raise ConfigError("eval needs at least one of --ppl CORPUS..., --niah, --lm-eval TASKS, --chat FILE")
    prompts = None
    if args.chat:  # a bad prompt file fails before the (slow) model load
        from mamba_llama_jax.eval.chat_compare import load_prompts

        prompts = load_prompts(args.chat, args.chat_limit)
    tasks = [t for t in (args.lm_eval or "").split(",") if t.strip()]
    if args.lm_eval is not None and not tasks:
        raise ConfigError("--lm-eval needs task names, e.g. --lm-eval arc_easy,hellaswag")
    t0 = time.perf_counter()
    loaded = _load(args)
    is_student = bool(args.model or args.hybrid)
    teacher = _load(argparse.Namespace(**{**vars(args), "model": None, "hybrid": None})) if (
        is_student and not args.no_teacher_baseline) else (None if is_student else loaded)
    tok = loaded.tokenizer
    cfg = loaded.config
    report: dict[str, Any] = {
        "model": args.model or (f"hybrid {args.hybrid} % attention (untrained, built from the teacher)"
                                if args.hybrid else "teacher"),
        "teacher": args.teacher or "default (SmolLM2-135M-Instruct)",
        "attn_layers": list(getattr(loaded.model, "attn_layers", range(cfg.num_layers))),
        "dtype": cfg.dtype, "load_s": time.perf_counter() - t0,
    }
    if args.ppl:
        from mamba_llama_jax.eval.perplexity import evaluate_perplexity, load_corpus, perplexity_report
        from mamba_llama_jax.eval.scoring import Scorer

        scorer = Scorer(loaded.model, batch_size=args.batch_size)
        scorer.check_length(args.context, f"--context {args.context}")
        t_scorer = Scorer(teacher.model, batch_size=args.batch_size) if is_student and teacher else None
        res, t_res = {}, {}
        for spec in args.ppl:
            corpus = load_corpus(spec, tok, max_tokens=args.max_tokens, split=args.split,
                                 teacher=(teacher or loaded).model if spec == "heldout" else None,
                                 heldout_dir=args.heldout_dir, heldout_prompts=args.heldout_prompts)
            res[corpus.name] = evaluate_perplexity(scorer, corpus, context=args.context, stride=args.stride)
            if t_scorer is not None:
                t_res[corpus.name] = evaluate_perplexity(t_scorer, corpus, context=args.context, stride=args.stride)
            r = res[corpus.name]
            extra = f", teacher {t_res[corpus.name].ppl:.3f}, ratio {r.ppl / t_res[corpus.name].ppl:.3f}" if (
                corpus.name in t_res) else ""
            print(f"ppl {corpus.name}: {r.ppl:.3f} over {r.tokens} tokens{extra}")
        report["perplexity"] = perplexity_report(res, t_res or None)
    if args.niah:
        from mamba_llama_jax.eval.niah import NiahConfig, run_niah, save_heatmap

        ncfg = NiahConfig(base_length=args.niah_base_len, multipliers=tuple(args.niah_multipliers),
                          depths=tuple(args.niah_depths), trials=args.niah_trials, extrapolate=args.niah_extrapolate,
                          batch_size=args.batch_size)
        niah = run_niah(loaded.model, tok, ncfg)
        png = Path(args.out).with_suffix(".niah.png")
        niah["png"], niah["png_note"] = map(str, save_heatmap(niah, png))
        if is_student and teacher:
            ceiling = run_niah(teacher.model, tok, ncfg)
            niah["teacher_rate"] = ceiling["rate"]
            niah["teacher_overall"] = ceiling["overall"]
        print(f"niah: overall {niah['overall']:.0%}, by length {niah['rate_by_length']}; leading digits copied "
              f"{niah['digits_by_length']}; heat map {png}")
        report["niah"] = niah
    if tasks:
        from mamba_llama_jax.eval.lm_eval_adapter import run_lm_eval

        report["lm_eval"] = run_lm_eval(loaded.model, tok, tasks, include_path=args.lm_eval_include,
                                        limit=args.lm_eval_limit, num_fewshot=args.lm_eval_fewshot,
                                        batch_size=args.batch_size)
        print(f"lm-eval: {report['lm_eval']['results']}")
    if prompts is not None:
        from mamba_llama_jax.eval.chat_compare import APIJudge, compare

        if teacher is None or not is_student:
            raise ConfigError("--chat compares a student with the teacher: give --model or --hybrid (and keep the "
                              "teacher baseline)")
        api = APIJudge(args.api_judge) if args.api_judge else None
        report["chat"] = compare(loaded.model, teacher.model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, api_judge=api)
        s = report["chat"]["summary"]
        print(f"chat ({s['label']}): judge win rate {s.get('judge_win_rate', float('nan')):.2f}, "
              f"log-prob win rate {s['logprob_win_rate']:.2f}, mean tokens {s['student_mean_tokens']:.0f} vs "
              f"teacher {s['teacher_mean_tokens']:.0f}")
    report["total_s"] = time.perf_counter() - t0
    _write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="GGUF file, HF model directory or MambaInLlama directory (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a saved hybrid (MambaInLlama format directory) instead of the teacher")
    p.add_argument("--hybrid", default=None, metavar="PCT|YAML",
                   help="build a hybrid from the teacher keeping PCT %% attention (50, 25, 12.5, 0) or per a yaml")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the fresh Mamba parameters (--hybrid)")
    p.add_argument("--quiet-start", type=float, default=None, metavar="S",
                   help="(--hybrid) start the Mamba2 mixers near 'layer removed': identity conv, gate norm x S")


def _add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message for the chat template")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="mamba_llama_jax: Llama teachers and Mamba hybrids")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="answer prompts and print the answers")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--no-chat", action="store_true", help="plain text continuation, no chat template")
    _add_model(g)
    _add_sampling(g, 128)
    g.set_defaults(func=cmd_generate, decodes=True)

    c = sub.add_parser("chat", help="interactive chat, streaming the answers")
    _add_model(c)
    _add_sampling(c, 256)
    c.set_defaults(func=cmd_chat, decodes=True)

    d = sub.add_parser("demo", help="load the teacher, answer a few chat prompts, print tokens/s")
    _add_model(d)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--no-distill", action="store_true", help="only chat with the teacher (skip the distillation)")
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="where the demo writes data, metrics, plots")
    d.add_argument("--train-prompts", type=int, default=32, help="teacher answers to train on")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of configs/recipes/smollm2-135m-demo.yaml, e.g. stages.1.steps=20")
    d.set_defaults(func=cmd_demo, decodes=True)

    v = sub.add_parser("convert", help="build a hybrid from the teacher and save it (MambaInLlama format)")
    _add_model(v)
    v.add_argument("--out", required=True, metavar="DIR", help="output directory")
    v.add_argument("--save-dtype", default="float32", choices=("float32", "bfloat16"))
    v.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    v.set_defaults(func=cmd_convert)

    gl = sub.add_parser("gen-labels", help="the teacher's answers to prompts, stored as token ids (resumable)")
    _add_model(gl)
    gl.add_argument("--out", required=True, metavar="DIR")
    gl.add_argument("--dataset", default=None, metavar="SRC",
                    help="local json/jsonl/parquet (file or dir) or a datasets hub name with `messages` rows "
                         "(default: the project's offline prompts)")
    gl.add_argument("--num-prompts", type=int, default=256)
    gl.add_argument("--max-new-tokens", type=int, default=128)
    gl.add_argument("--batch-size", type=int, default=16)
    gl.add_argument("--temperature", type=float, default=0.7)
    gl.add_argument("--seed", type=int, default=0)
    gl.add_argument("--shard-index", type=int, default=0, help="this host's shard (multi-host)")
    gl.add_argument("--shard-count", type=int, default=1)
    gl.set_defaults(func=cmd_gen_labels, decodes=True)

    sp = sub.add_parser("speculate", help="speculative decoding: a draft proposes k tokens, the target verifies")
    sp.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    sp.add_argument("--draft", required=True, metavar="PATH",
                    help="draft model: a saved hybrid directory, a GGUF file or an HF directory")
    sp.add_argument("--k", type=int, default=4, help="draft tokens per round")
    sp.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                    help="the draft scores only the first N token ids and the end-of-turn ids: a cheaper draft head "
                    "for large vocabularies, same output (0: every id)")
    sp.add_argument("--draft-stop", type=float, default=0.0, metavar="P",
                    help="stop drafting a round early once the draft's top probability for its next token is below P "
                    "(fewer wasted draft steps at low acceptance; same output; 0: always --k drafts)")
    sp.add_argument("--no-chat", action="store_true")
    _add_model(sp)
    _add_sampling(sp, 128)
    sp.set_defaults(func=cmd_speculate, decodes=True)

    ac = sub.add_parser("acceptance", help="predict speculative acceptance of a draft for each k, from one run of "
                        "the target and one forward of each model (no speculative loop): exact for greedy decoding, "
                        "an estimate for sampling")
    ac.add_argument("--draft", required=True, metavar="PATH",
                    help="draft model: a saved hybrid directory, a GGUF file or an HF directory")
    ac.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="draft tokens per round (several at once)")
    ac.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    ac.add_argument("--heldout-prompts", type=int, default=0, metavar="N",
                    help="add N prompts of the held-out families (never in the training data)")
    ac.add_argument("--max-new-tokens", type=int, default=128)
    ac.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    ac.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                    help="as `speculate --draft-vocab`: the draft proposes only the first N ids and end-of-turn ids")
    ac.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy (exact prediction, default); > 0: speculative sampling's acceptance, estimated")
    ac.add_argument("--top-k", type=int, default=0, help="0 = off")
    ac.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ac.add_argument("--seed", type=int, default=0)
    ac.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    ac.add_argument("--no-chat", action="store_true")
    _add_model(ac)
    ac.set_defaults(func=cmd_acceptance, decodes=True)

    helps = {"pipeline": "run every stage of a training recipe (configs/recipes/*.yaml)",
             "distill": "run a one-stage recipe whose stage distils (objective distill, hidden or orient)",
             "sft": "run a one-stage recipe whose stage is supervised fine-tuning (objective distill, ce_weight > 0)",
             "dpo": "run a one-stage recipe whose stage is DPO (objective dpo)"}
    for name, text in helps.items():
        pl = sub.add_parser(name, help=text)
        pl.add_argument("--config", required=True, metavar="YAML", help="recipe (TrainConfig yaml)")
        pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. stages.0.steps=10")
        pl.add_argument("--model", default=None, metavar="DIR",
                        help="start from a saved hybrid (MambaInLlama directory, e.g. an earlier run's "
                             "OUTPUT_DIR/model) instead of converting the teacher")
        pl.add_argument("--distributed", action="store_true",
                        help="multi-host: jax.distributed.initialize (TPU pods and SLURM detect themselves; else "
                             "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) - run the same command "
                             "on every host")
        pl.set_defaults(func=cmd_pipeline if name == "pipeline" else cmd_train)
    ev = sub.add_parser("eval", help="perplexity, needle in a haystack, lm-eval tasks, chat comparison -> json")
    _add_model(ev)
    ev.add_argument("--out", default="eval_report.json", metavar="JSON", help="report path")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--no-teacher-baseline", action="store_true",
                    help="skip the teacher's own scores (ratios and ceilings) when evaluating a hybrid")
    ev.add_argument("--ppl", nargs="+", default=[], metavar="CORPUS",
                    help="heldout | pydoc | a .txt/.md/.json/.jsonl/.parquet file or dir | a datasets name")
    ev.add_argument("--context", type=int, default=1024, help="perplexity window, tokens")
    ev.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default context-1)")
    ev.add_argument("--max-tokens", type=int, default=65536, help="tokens read per corpus (0 = all)")
    ev.add_argument("--split", default="train", help="split of a datasets corpus")
    ev.add_argument("--heldout-dir", default="data/heldout-chats", metavar="DIR",
                    help="cache of the teacher's answers to the held-out prompts (generated when missing)")
    ev.add_argument("--heldout-prompts", type=int, default=60)
    ev.add_argument("--niah", action="store_true", help="needle in a haystack (heat map PNG beside the report)")
    ev.add_argument("--niah-base-len", type=int, default=1024, help="the distillation length")
    ev.add_argument("--niah-multipliers", type=float, nargs="+", default=[1, 2, 4, 8])
    ev.add_argument("--niah-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ev.add_argument("--niah-trials", type=int, default=2)
    ev.add_argument("--niah-extrapolate", action="store_true",
                    help="allow lengths past the model's context (RoPE extrapolation; caveat in the report)")
    ev.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
    ev.add_argument("--lm-eval-include", default=None, metavar="DIR", help="folder of local task yaml files")
    ev.add_argument("--lm-eval-limit", type=float, default=None, help="examples per task (or a fraction)")
    ev.add_argument("--lm-eval-fewshot", type=int, default=None)
    ev.add_argument("--chat", default=None, metavar="PROMPTS_FILE",
                    help="answer prompts (.txt lines or AlpacaEval/MT-Bench json/jsonl) and compare with the teacher")
    ev.add_argument("--chat-limit", type=int, default=0, help="first N prompts (0 = all)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="answer length for --chat")
    ev.add_argument("--api-judge", default=None, metavar="MODEL",
                    help="also ask an OpenAI-compatible judge (needs network and $OPENAI_API_KEY; untested here)")
    ev.set_defaults(func=cmd_eval, decodes=True)  # --chat answers prompts
    return parser


def _use_decode_flags() -> None:
    # Before the command's first device touch: XLA reads XLA_FLAGS once, when the backend starts.
    from mamba_llama_jax.inference.xla_flags import use_decode_flags

    use_decode_flags()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "decodes", False):
        _use_decode_flags()
    try:
        return int(args.func(args) or 0)
    except Preempted as e:
        # 128 + SIGTERM, as if the signal had ended the process: supervisors rerun it, and the rerun resumes
        print(f"preempted: {e}", file=sys.stderr)
        return 143
    except MambaLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
