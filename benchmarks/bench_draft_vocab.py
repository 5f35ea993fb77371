"""How much of a target's greedy output a reduced draft vocabulary covers (issue 7, `speculative.draft_vocabulary`).

A draft restricted to a subset of ids can only propose those, so the share of the target's tokens inside the subset
bounds the acceptance rate; what it buys is a draft head of that many rows instead of the whole vocabulary. This
generates the target's greedy answers to held-out prompts (`data.sources.heldout_prompts`, never in training) and
reports, per subset size N, the share of answer tokens among the first N ids (the subset `draft_vocabulary` builds)
and among the N ids most frequent in its answers to training prompts (`offline_prompts`: what a frequency-ranked
subset would give), with the head's rows as a share of the full head.

    PYTHONPATH=$PWD python3 benchmarks/bench_draft_vocab.py --out benchmarks/results               # the teacher
    PYTHONPATH=$PWD python3 benchmarks/bench_draft_vocab.py --target runs/X/model --out /tmp/dv    # a saved hybrid
    # also in Llama 3's vocabulary: its rank file from PyPI (pip download --no-deps llama-models; unzip it)
    PYTHONPATH=$PWD python3 benchmarks/bench_draft_vocab.py --retokenize llama_models/llama3/tokenizer.model

`--retokenize FILE` (a tiktoken-format rank file, `rank_bpe.py`) counts the same answers' text again in that
vocabulary: the first-N coverage a model with that tokenizer would give for text like the target's answers (its own
answers would differ; no such model runs offline here).

Writes <out>/draft_vocab.json and <out>/draft_vocab.md. Quality, not speed: any backend gives the same figures up
to the rounding of the greedy answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import device, now, versions  # noqa: E402


def answers(gen: Any, tok: Any, prompts: list[str], new_tokens: int, batch: int) -> list[list[int]]:
    """The target's greedy answers (EOS excluded) to chat prompts."""
    from mamba_llama_jax.inference.generate import SamplingConfig

    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    out: list[list[int]] = []
    for i in range(0, len(ids), batch):
        out += gen.run(ids[i:i + batch], SamplingConfig(max_new_tokens=new_tokens),
                       eos_ids=list(tok.eos_token_ids)).ids()
    return out


def coverage(held: list[list[int]], train: list[list[int]], vocab: int, sizes: list[int],
             keep: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per size: the share of held-out answer tokens in the first-N subset and in the training-frequency top N."""
    from mamba_llama_jax.inference.speculative import draft_vocabulary

    tokens = np.concatenate([np.asarray(a, np.int64) for a in held if a])
    counts = np.bincount(np.concatenate([np.asarray(a, np.int64) for a in train if a]), minlength=vocab)
    by_freq = np.argsort(-counts, kind="stable")
    rows = []
    for n in sizes:
        first = draft_vocabulary(vocab, n, keep=keep)
        rows.append(dict(size=n, head_share=len(first) / vocab,
                         first_n=float(np.isin(tokens, first).mean()),
                         frequency_top_n=float(np.isin(tokens, by_freq[:n]).mean())))
    return rows


def retokenized(held: list[list[int]], train: list[list[int]], tok: Any, path: Path, specials: int,
                sizes: list[int]) -> dict[str, Any]:
    """The answers decoded to text and encoded with the rank file's BPE: `coverage` over its vocabulary (the rank
    file's tokens + `specials`), no end-of-turn ids kept (text holds none)."""
    from rank_bpe import RankBPE

    bpe = RankBPE.from_file(path)
    again = lambda answers: [bpe.encode(tok.decode(a)) for a in answers]  # noqa: E731
    h, t = again(held), again(train)
    vocab = bpe.size + specials
    return dict(file=str(path), vocab=vocab, heldout_tokens=sum(map(len, h)), train_tokens=sum(map(len, t)),
                rows=coverage(h, t, vocab, [n for n in sizes if n <= vocab], ()))


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| N | head | first N | top N by frequency |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {100 * r['head_share']:.1f} % | {100 * r['first_n']:.1f} % | "
                     f"{100 * r['frequency_top_n']:.1f} % |")
    return lines


def render_md(res: dict[str, Any]) -> str:
    lines = [f"# Draft vocabulary coverage ({res['device']}, {res['dtype']}, {res['date']})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
             + f". Command: `{res['command']}`. Wall {res['wall_s']:.0f} s.", "",
             f"Target: {res['target']} (vocabulary {res['vocab']}). Held-out answers: {res['heldout_prompts']} "
             f"prompts, {res['heldout_tokens']} tokens (greedy, ≤ {res['new_tokens']} new); frequencies from its "
             f"answers to {res['train_prompts']} training prompts ({res['train_tokens']} tokens). `first N` = the "
             "first N ids and the end-of-turn ids (`speculative.draft_vocabulary`), `top N by frequency` = the N ids "
             "most frequent in the training answers; `head` = the draft head's rows as a share of the full head.",
             ""] + _table(res["rows"])
    if rt := res.get("retokenized"):
        lines += ["", f"The same answers' text in the vocabulary of `{rt['file']}` ({rt['vocab']} ids with its "
                  f"special tokens): {rt['heldout_tokens']} held-out and {rt['train_tokens']} training tokens; "
                  "`first N` = ids below N (text holds no end-of-turn ids).", ""] + _table(rt["rows"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", metavar="PATH", help="a saved hybrid, GGUF file or HF directory (default: the "
                    "embedded SmolLM2 teacher)")
    ap.add_argument("--heldout-prompts", type=int, default=32)
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--retokenize", type=Path, metavar="FILE",
                    help="a tiktoken-format rank file (Llama 3's tokenizer.model): the answers counted in its "
                    "vocabulary too")
    ap.add_argument("--retokenize-specials", type=int, default=256,
                    help="special tokens after the rank file's (Llama 3: 256, so 128,256 ids)")
    ap.add_argument("--retokenize-sizes", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    if min(args.heldout_prompts, args.train_prompts, args.new_tokens, args.batch, *args.sizes,
           *args.retokenize_sizes) < 1 or args.retokenize_specials < 0:
        ap.error("prompt counts, --new-tokens, --batch and the sizes must be positive")
    if args.retokenize and not args.retokenize.is_file():
        ap.error(f"--retokenize: no file {args.retokenize}")

    from mamba_llama_jax.data.sources import heldout_prompts, offline_prompts
    from mamba_llama_jax.errors import MambaLlamaError
    from mamba_llama_jax.inference.generate import Generator

    t0 = time.perf_counter()
    try:
        from bench_speculative import load_model
        if args.target:
            model, tok = load_model(args.target, args.dtype)
        else:
            from mamba_llama_jax.convert import load_teacher
            teacher = load_teacher(dtype=args.dtype)
            model, tok = teacher.model, teacher.tokenizer
    except (MambaLlamaError, OSError) as e:
        ap.error(f"cannot load the target: {e}")
    vocab = model.cfg.vocab_size
    if max(args.sizes) > vocab:
        ap.error(f"--sizes must not exceed the vocabulary ({vocab})")
    gen = Generator(model)
    held = answers(gen, tok, heldout_prompts(args.heldout_prompts, 0), args.new_tokens, args.batch)
    train = answers(gen, tok, offline_prompts(args.train_prompts, 0), args.new_tokens, args.batch)
    res = dict(date=now(), device=device(), versions=versions(), dtype=args.dtype,
               command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
               target=args.target or "SmolLM2-135M-Instruct (embedded GGUF)", vocab=vocab,
               heldout_prompts=args.heldout_prompts, train_prompts=args.train_prompts, new_tokens=args.new_tokens,
               heldout_tokens=sum(map(len, held)), train_tokens=sum(map(len, train)),
               rows=coverage(held, train, vocab, args.sizes, tuple(tok.eos_token_ids)))
    if args.retokenize:
        try:
            res["retokenized"] = retokenized(held, train, tok, args.retokenize, args.retokenize_specials,
                                             args.retokenize_sizes)
        except ValueError as e:
            ap.error(f"--retokenize: {e}")
    res["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "draft_vocab.json").write_text(json.dumps(res, indent=1) + "\n")
    md = render_md(res)
    (args.out / "draft_vocab.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
