"""Plain (non-chat) text for distillation, made offline: copy-and-recall documents and standard-library prose.

Why: the offline corpus is the teacher's chat answers only. Students distilled on it copy badly (the 50 % hybrid
finds a needle but stops after one to three of its digits) and fit real prose far worse than chats (ppl ratio
4.5 on `pydoc_data.topics` against 1.56 on held-out chats; benchmarks/results/quality/notes.md, session 6). Mixed
into the distillation stages, these texts give the teacher's soft targets on both skills:

- `recall_documents`: records with long numbers and codes (orders, phone lists, part catalogues, meter readings)
  that the document later restates, so predicting the restatement means copying from far back. Entities, wording
  and filler differ from the needle-in-a-haystack evaluation (`eval/niah.py`), whose prompts never appear here; a
  NIAH gain after training on these measures a trained skill, not a memorised format.
- `stdlib_prose`: the docstrings of the standard library's Python sources (read, not imported). The perplexity
  corpus `pydoc_data.topics` (the language reference) is a different text and stays held out.

`text_rows` turns texts into token rows (`{"tokens", "loss_mask"}`, every position trained) for
`data.pipeline.build_dataset` with `kind="tokens"`.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mamba_llama_jax.errors import DataError

# Parts of the standard library whose text is not prose for this purpose, or is the held-out perplexity corpus.
_SKIP_DIRS = {"test", "tests", "idlelib", "pydoc_data", "site-packages", "dist-packages", "lib2to3", "ensurepip",
              "turtledemo", "__pycache__", "encodings"}

_NAMES = ("Ada Brennan", "Tomas Okafor", "Mei Lindqvist", "Ravi Castellano", "Ines Moreau", "Jonah Whitfield",
          "Priya Nakamura", "Lukas Adeyemi", "Sofia Halvorsen", "Omar Delacroix", "Hana Kowalski", "Diego Marsh")
_ITEMS = ("copper fittings", "oak panels", "glass jars", "wool blankets", "steel bolts", "paper rolls",
          "ceramic tiles", "cotton thread", "brass hinges", "rubber seals", "linen napkins", "clay pots")
_CITIES = ("Lyon", "Osaka", "Porto", "Tallinn", "Quito", "Halifax", "Dakar", "Perth", "Bergen", "Cusco")
_UNITS = ("kWh", "litres", "cubic metres", "kg", "hours")


def _digits(rng: np.random.Generator, lo: int, hi: int) -> str:
    n = int(rng.integers(lo, hi + 1))
    return str(int(rng.integers(1, 10))) + "".join(str(int(d)) for d in rng.integers(0, 10, n - 1))


def _orders(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    recs = [(f"{int(rng.integers(1000, 9999))}", _ITEMS[int(rng.integers(len(_ITEMS)))],
             _CITIES[int(rng.integers(len(_CITIES)))], _digits(rng, 6, 9)) for _ in range(n)]
    lines = [f"Order {o}: {int(rng.integers(2, 90))} crates of {it} for {c}, tracking code {t}." for o, it, c, t in recs]
    recalls = [f"Order {o} ({it}, {c}) can be traced with code {t}." for o, it, c, t in recs]
    return ["Shipping log for the week."] + lines, recalls


def _phones(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    recs = [(_NAMES[int(rng.integers(len(_NAMES)))] + f" ({int(rng.integers(2, 99))})",
             f"{_digits(rng, 3, 3)}-{_digits(rng, 3, 3)}-{_digits(rng, 4, 4)}") for _ in range(n)]
    lines = [f"{who}: {num}" for who, num in recs]
    recalls = [f"To reach {who}, dial {num}." for who, num in recs]
    return ["Office directory."] + lines, recalls


def _parts(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    recs = [(f"{chr(65 + int(rng.integers(26)))}{chr(65 + int(rng.integers(26)))}-{_digits(rng, 4, 6)}",
             _ITEMS[int(rng.integers(len(_ITEMS)))], f"{int(rng.integers(1, 999))}.{int(rng.integers(10, 99))}")
            for _ in range(n)]
    lines = [f"Part {p}, {it}, unit price {price} euros." for p, it, price in recs]
    recalls = [f"The catalogue lists {it} as part {p} at {price} euros." for p, it, price in recs]
    return ["Parts catalogue, spring edition."] + lines, recalls


def _meters(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    recs = [(f"M{_digits(rng, 3, 4)}", _digits(rng, 5, 7), _UNITS[int(rng.integers(len(_UNITS)))])
            for _ in range(n)]
    lines = [f"Meter {m} read {v} {u} on the first of the month." for m, v, u in recs]
    recalls = [f"Meter {m} had read {v} {u}." for m, v, u in recs]
    return ["Monthly meter readings."] + lines, recalls


_KINDS = (_orders, _phones, _parts, _meters)


def recall_documents(n: int, seed: int = 0, records: tuple[int, int] = (12, 40)) -> list[str]:
    """`n` documents, each a list of records, some prose between, then a restatement of a random third of the
    records in shuffled order (the copying targets)."""
    if n < 0:
        raise DataError(f"recall_documents: n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        lines, recalls = _KINDS[i % len(_KINDS)](rng, int(rng.integers(records[0], records[1] + 1)))
        pick = rng.permutation(len(recalls))[:max(1, len(recalls) // 3)]
        docs.append("\n".join(lines) + "\n\nNotes for the follow-up:\n" + " ".join(recalls[j] for j in pick))
    return docs


def stdlib_prose(max_chars: int = 0) -> list[str]:
    """Docstrings (≥ 200 characters) of the standard library's Python sources — module, classes, functions and
    methods — one text per file, files in sorted order. Read with `ast`, nothing is imported. `pydoc_data` (the
    perplexity corpus), tests and a few non-library folders are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = []
        for node in [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:
                parts.append(doc if node is tree else f"{node.name}: {doc}")
        if parts:
            text = "\n\n".join(parts)
            texts.append(text)
            total += len(text)
            if max_chars and total >= max_chars:
                break
    return texts


def text_rows(tokenizer: Any, texts: Sequence[str], seq_len: int) -> list[dict[str, list[int]]]:
    """Token rows of `texts`, each cut into pieces of at most `seq_len` tokens (BOS first where the tokenizer
    has one), every position trained."""
    if seq_len < 2:
        raise DataError(f"text_rows: seq_len must be at least 2, got {seq_len}")
    bos = getattr(getattr(tokenizer, "hf", None), "bos_token_id", None)
    head = [int(bos)] if bos is not None else []
    rows = []
    for text in texts:
        ids = list(tokenizer.encode(text))
        step = seq_len - len(head)
        for s in range(0, len(ids), step):
            piece = head + ids[s:s + step]
            if len(piece) >= 2:
                rows.append({"tokens": piece, "loss_mask": [1] * len(piece)})
    return rows
