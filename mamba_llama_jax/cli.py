"""Command line: `python run.py <command> ...` (or the `mamba-llama` script).

User mistakes (a `MambaLlamaError`) print `error: <message>` on stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

from mamba_llama_jax.errors import MambaLlamaError

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
        hybrid = build_hybrid(teacher.model, hybrid_config_for(args.hybrid), rngs=nnx.Rngs(args.init_seed))
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


def cmd_pipeline(args: argparse.Namespace) -> int:
    from mamba_llama_jax.train.trainer import run_recipe

    run_recipe(args.config, args.overrides)
    return 0


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="GGUF file or HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a saved hybrid (MambaInLlama format directory) instead of the teacher")
    p.add_argument("--hybrid", default=None, metavar="PCT|YAML",
                   help="build a hybrid from the teacher keeping PCT %% attention (50, 25, 12.5, 0) or per a yaml")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the fresh Mamba parameters (--hybrid)")


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
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat, streaming the answers")
    _add_model(c)
    _add_sampling(c, 256)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="load the teacher, answer a few chat prompts, print tokens/s")
    _add_model(d)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.set_defaults(func=cmd_demo)

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
    gl.set_defaults(func=cmd_gen_labels)

    pl = sub.add_parser("pipeline", help="run every stage of a training recipe (configs/recipes/*.yaml)")
    pl.add_argument("--config", required=True, metavar="YAML")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. stages.0.steps=10")
    pl.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MambaLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
