"""Perplexity on held-out text, per corpus, and its ratio to the teacher's.

Corpora (`load_corpus` specs):
- `heldout`: the teacher's answers to prompts from template *and* topic families never used for training
  (`data.sources.heldout_prompts`), generated once by the teacher and cached as token ids; only answer tokens are
  scored (the prompt and chat markup are context). This is the distribution the student was distilled towards,
  but from prompt families it never saw.
- `pydoc`: the standard library's documentation (`pydoc_data.topics`), real English/Python prose that every
  Python install carries and that no training recipe of this project uses.
- a local path: .txt/.md files (one document each; a directory of them), or .json/.jsonl/.parquet with a `text`,
  `messages` (chat; assistant turns scored) or `tokens` (+ `loss_mask`) column — e.g. a `gen-labels` output dir;
- anything else: a `datasets` hub name with one of those columns (`--split`).

Evaluation: documents are concatenated into one stream, each prefixed with a separator token (BOS, else EOS) that
is context only, and cut into windows of a fixed `context`. Each window carries segment ids, so attention and the
Mamba scans never cross a document boundary. `stride` = how many new targets each window scores: `context - 1`
(the default) packs windows end to end; smaller values slide, so every scored token sees at least
`context - stride` tokens of its document's history (the usual "sliding-window perplexity"). Every target token is
scored exactly once; ppl = exp(mean negative log-likelihood over scored tokens).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mamba_llama_jax.errors import ConfigError, DataError
from mamba_llama_jax.eval.scoring import Scorer

TEXT_SUFFIXES = (".txt", ".md", ".rst")
BUILTIN = ("heldout", "pydoc")


@dataclasses.dataclass
class Corpus:
    """Documents as token ids; `masks[i][j]` = 1 where token j of document i is a scored target."""

    name: str
    docs: list[list[int]]
    masks: list[list[int]]

    @property
    def num_tokens(self) -> int:
        return sum(len(d) for d in self.docs)


@dataclasses.dataclass
class PerplexityResult:
    corpus: str
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # scored tokens
    windows: int
    context: int
    stride: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------- corpora


def separator_id(tokenizer: Any) -> int:
    """The token that opens each document: BOS if the tokenizer has one, else the first EOS id."""
    bos = getattr(getattr(tokenizer, "hf", None), "bos_token_id", None)
    if bos is not None:
        return int(bos)
    if tokenizer.eos_token_ids:
        return int(tokenizer.eos_token_ids[0])
    return int(tokenizer.pad_token_id)


def _cap(docs: list[list[int]], masks: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    if max_tokens <= 0:
        return docs, masks
    out_d, out_m, total = [], [], 0
    for d, m in zip(docs, masks):
        if total >= max_tokens:
            break
        keep = max_tokens - total
        out_d.append(d[:keep])
        out_m.append(m[:keep])
        total += len(out_d[-1])
    return out_d, out_m


def _finish(name: str, docs: list[list[int]], masks: list[list[int]], max_tokens: int) -> Corpus:
    pairs = [(d, m) for d, m in zip(docs, masks) if len(d) >= 2 and any(m[1:])]
    if not pairs:
        raise DataError(f"corpus {name!r} has no text to score (empty files, or no scored tokens)")
    docs, masks = _cap([p[0] for p in pairs], [p[1] for p in pairs], max_tokens)
    return Corpus(name, docs, masks)


def text_corpus(name: str, texts: Sequence[str], tokenizer: Any, *, max_tokens: int = 0) -> Corpus:
    """Plain documents: every token after the separator is scored."""
    sep = separator_id(tokenizer)
    docs, masks = [], []
    for t in texts:
        if not t.strip():
            continue
        ids = [sep] + tokenizer.encode(t)
        docs.append(ids)
        masks.append([0] + [1] * (len(ids) - 1))
        if max_tokens and sum(map(len, docs)) >= max_tokens:
            break
    return _finish(name, docs, masks, max_tokens)


def pydoc_corpus(tokenizer: Any, *, max_tokens: int = 0) -> Corpus:
    """The standard library's documentation topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return text_corpus("pydoc", [topics[k] for k in sorted(topics)], tokenizer, max_tokens=max_tokens)


def table_corpus(name: str, table: Any, tokenizer: Any, *, max_tokens: int = 0) -> Corpus:
    """A `datasets.Dataset` (or list of dicts) with a `text`, `messages` or `tokens` column."""
    from mamba_llama_jax.data.pipeline import chat_tokens
    from mamba_llama_jax.data.sources import normalize_chat, normalize_tokens

    if len(table) == 0:
        raise DataError(f"corpus {name!r} is empty")
    cols = set(table[0])
    sep = separator_id(tokenizer)
    docs, masks = [], []
    for i in range(len(table)):
        row = table[i]
        if "tokens" in cols:
            r = normalize_tokens(row, f"{name}[{i}]")
            ids, m = [sep] + r["tokens"], [0] + r["loss_mask"]
        elif "messages" in cols:
            ids, m = chat_tokens(tokenizer, normalize_chat(row, f"{name}[{i}]")["messages"])
            ids, m = [sep] + ids, [0] + m
        elif "text" in cols:
            if not isinstance(row["text"], str):
                raise DataError(f"{name}[{i}]: `text` must be a string, got {type(row['text']).__name__}")
            ids = [sep] + tokenizer.encode(row["text"])
            m = [0] + [1] * (len(ids) - 1)
        else:
            raise DataError(f"corpus {name!r}: expected a `text`, `messages` or `tokens` column, got {sorted(cols)}")
        docs.append(ids)
        masks.append(m)
        if max_tokens and sum(map(len, docs)) >= max_tokens:
            break
    return _finish(name, docs, masks, max_tokens)


def heldout_corpus(teacher: Any, tokenizer: Any, cache_dir: str | Path, *, num_prompts: int = 60,
                   max_new_tokens: int = 256, temperature: float = 0.7, seed: int = 0, batch_size: int = 16,
                   max_tokens: int = 0) -> Corpus:
    """The teacher's answers to held-out prompts, generated into `cache_dir` once (resumable) and reused.

    `teacher` is the teacher `DecoderLM`: the answers must come from the teacher, whichever model is evaluated.
    """
    from mamba_llama_jax.data.sources import generate_offline, heldout_prompts, load_table

    out = Path(cache_dir)
    if not any(out.glob("*.parquet")) or not (out / "meta.json").is_file():
        if teacher is None:
            raise DataError(f"{out} holds no held-out answers yet and no teacher was given to generate them")
        generate_offline(teacher, tokenizer, out, prompts=heldout_prompts(num_prompts, seed),
                         max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed)
    return table_corpus("heldout", load_table(str(out)), tokenizer, max_tokens=max_tokens)


def load_corpus(spec: str, tokenizer: Any, *, max_tokens: int = 0, split: str = "train", teacher: Any = None,
                heldout_dir: str | Path | None = None, heldout_prompts: int = 60,
                heldout_max_new_tokens: int = 256) -> Corpus:
    """A corpus by spec: `heldout`, `pydoc`, a local file/directory, or a `datasets` hub name (module docstring)."""
    from mamba_llama_jax.data.sources import load_table

    if spec == "heldout":
        cache = Path(heldout_dir) if heldout_dir else Path("data") / "heldout-chats"
        return heldout_corpus(teacher, tokenizer, cache, num_prompts=heldout_prompts,
                              max_new_tokens=heldout_max_new_tokens, max_tokens=max_tokens)
    if spec == "pydoc":
        return pydoc_corpus(tokenizer, max_tokens=max_tokens)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix in TEXT_SUFFIXES:
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"corpus file {p} is empty")
        return text_corpus(p.name, [text], tokenizer, max_tokens=max_tokens)
    if p.is_dir() and any(f.suffix in TEXT_SUFFIXES for f in p.iterdir()):
        files = sorted(f for f in p.iterdir() if f.suffix in TEXT_SUFFIXES)
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        if not any(t.strip() for t in texts):
            raise DataError(f"every text file in {p} is empty")
        return text_corpus(p.name, texts, tokenizer, max_tokens=max_tokens)
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"corpus file {p} is empty")
    if not p.exists() and spec.startswith((".", "/", "~")):
        raise DataError(f"corpus not found: {spec} (expected heldout, pydoc, a file/dir, or a datasets name)")
    return table_corpus(p.name if p.exists() else spec, load_table(spec, split), tokenizer, max_tokens=max_tokens)


# ------------------------------------------------------------------------------------------------- windows


def windows(n: int, context: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, first target) per window over a stream of n tokens: the window feeds tokens [start, end) and
    scores the targets [first, end), each predicted from all earlier tokens of the window. Targets 1..n-1 are
    covered exactly once; each window scores at most `stride` (default context - 1) of them."""
    if context < 2:
        raise ConfigError(f"context must be at least 2 tokens, got {context}")
    stride = context - 1 if stride is None else stride
    if not 1 <= stride <= context - 1:
        raise ConfigError(f"stride must be in [1, context - 1] = [1, {context - 1}], got {stride}")
    out = []
    first = 1
    while first < n:
        end = min(first + stride, n)
        out.append((max(0, end - context), end, first))
        first = end
    return out


def evaluate_perplexity(scorer: Scorer, corpus: Corpus, *, context: int, stride: int | None = None
                        ) -> PerplexityResult:
    """Perplexity of `corpus` under the scorer's model, with windows of `context` tokens (module docstring)."""
    scorer.check_length(context, f"--context {context}")
    ids = np.concatenate([np.asarray(d, np.int64) for d in corpus.docs])
    mask = np.concatenate([np.asarray(m, np.int64) for m in corpus.masks]).astype(bool)
    seg = np.concatenate([np.full(len(d), i, np.int64) for i, d in enumerate(corpus.docs)])
    # A target that opens a document has no history in the document: it is never scored (it is the separator).
    target_ok = mask.copy()
    target_ok[1:] &= seg[1:] == seg[:-1]
    wins = windows(len(ids), context, stride)
    rows = [ids[s:e].tolist() for s, e, _ in wins]
    segs = [seg[s:e].tolist() for s, e, _ in wins]
    scores = scorer.score(rows, segs)
    total, count = 0.0, 0
    for (s, e, first), sc in zip(wins, scores):
        # sc.logp[j] predicts token s + j + 1; this window owns targets [first, e).
        lo = first - s - 1
        lp = sc.logp[lo:]
        ok = target_ok[first:e]
        total -= float(lp[ok].sum())
        count += int(ok.sum())
    if count == 0:
        raise DataError(f"corpus {corpus.name!r}: no scored tokens (is every document a single token?)")
    nll = total / count
    return PerplexityResult(corpus.name, math.exp(nll), nll, count, len(wins), context,
                            context - 1 if stride is None else stride)


def perplexity_report(results: dict[str, PerplexityResult],
                      teacher: dict[str, PerplexityResult] | None = None) -> dict[str, Any]:
    """{corpus: {ppl, nll, tokens, ..., teacher_ppl, ratio_to_teacher}}; the ratio is model ppl / teacher ppl."""
    out: dict[str, Any] = {}
    for name, r in results.items():
        d = r.as_dict()
        if teacher is not None and name in teacher:
            d["teacher_ppl"] = teacher[name].ppl
            d["ratio_to_teacher"] = r.ppl / teacher[name].ppl
        out[name] = d
    return out
