"""Needle in a haystack: a keyed fact hidden at a given depth in synthetic filler, retrieved by greedy generation.

Each prompt: an instruction, filler sentences, the needle ("The magic number for <key> is <5 digits>.") inserted
at `depth` (0 = start of the filler, 1 = its end), more filler, then the question, ending in the needle's own
wording ("... The magic number for <key> is") so that a model only has to copy — retrieval, not instruction
following, is what is measured. A cell scores 1 when the first number in the greedy answer equals the needle's.
A second, partial measure: the share of the needle's digits the answer reproduces in order before its first
wrong or missing one (`digits`). The tokenizers of this family split numbers into single digits, so a model that
finds the needle but cannot keep copying scores 0 exactly yet well above 0 here; one that does not find it
scores near 0 (a first digit right by chance, 1 time in 9, adds 0.2).

Context lengths are multiples of a base length (the distillation sequence length: 1×, 2×, 4×, 8×) and count the
whole prompt plus the answer budget. The teacher's own score on the same prompts is the ceiling a student can be
held to. Lengths past the base length test length generalisation; lengths past the model's own context
(`max_position_embeddings`) only run with `extrapolate=True`, and the report carries CAVEAT.

The heat map (depth × length) is a PNG: labelled with matplotlib when it is installed (the `bench` extra), else a
plain one written here (coloured cells, no text; the numbers are in the json report).
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.models.llama import DecoderLM

CAVEAT = ("Lengths above the distillation length measure length generalisation: the student's Mamba layers were "
          "trained on sequences of at most that length. Lengths above the model's context "
          "(max_position_embeddings) are RoPE extrapolation for its attention layers — positions neither teacher "
          "nor student was trained on — so a score there shows what the model does, not what it was built for.")

INTRO = "There is a magic number hidden in the text below. Find it and remember it; you will be asked about it."
FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "A river runs to the sea.", "The hills are quiet today.", "Clouds drift over the town.",
    "A bird sings in the old tree.", "The road turns left at the farm.", "Bread is baked in the morning.",
    "The clock on the wall ticks slowly.",
)
KEYS = ("the lighthouse", "the blue door", "the orchard", "the harbor", "the library", "the old mill",
        "the bakery", "the glass tower", "the canal", "the silver bridge")


@dataclasses.dataclass(frozen=True)
class NiahConfig:
    base_length: int = 1024
    multipliers: tuple[float, ...] = (1, 2, 4, 8)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 2  # prompts per cell, each with its own key, number and filler order
    max_new_tokens: int = 12
    seed: int = 0
    batch_size: int = 8
    extrapolate: bool = False

    def __post_init__(self) -> None:
        if self.base_length < 64:
            raise ConfigError(f"niah base_length must be at least 64 tokens, got {self.base_length}")
        if not self.multipliers or any(m <= 0 for m in self.multipliers):
            raise ConfigError(f"niah multipliers must be positive, got {list(self.multipliers)}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ConfigError(f"niah depths must lie in [0, 1], got {list(self.depths)}")
        if self.trials < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("niah trials, max_new_tokens and batch_size must be positive")

    def lengths(self) -> list[int]:
        return [int(round(self.base_length * m)) for m in self.multipliers]


@dataclasses.dataclass
class NiahPrompt:
    ids: list[int]
    value: str
    key: str
    length: int
    depth: float


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def build_prompt(tokenizer: Any, length: int, depth: float, rng: np.random.Generator, max_new_tokens: int
                 ) -> NiahPrompt:
    """A prompt of `length - max_new_tokens` tokens (± one filler sentence) with the needle at `depth`."""
    key = KEYS[int(rng.integers(len(KEYS)))]
    value = str(int(rng.integers(10000, 100000)))
    bos = getattr(getattr(tokenizer, "hf", None), "bos_token_id", None)
    head = ([int(bos)] if bos is not None else []) + _encode(tokenizer, INTRO)
    needle = _encode(tokenizer, f" The magic number for {key} is {value}.")
    question = _encode(tokenizer, f"\nWhat is the magic number for {key}? The magic number for {key} is")
    budget = length - max_new_tokens - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ConfigError(f"a NIAH length of {length} tokens cannot hold the instruction, needle and question "
                          f"({length - budget} tokens): raise the base length")
    sentences = [_encode(tokenizer, " " + FILLER[int(i)]) for i in rng.permutation(len(FILLER))]
    filler: list[list[int]] = []
    total, k = 0, 0
    while True:  # whole sentences while they fit
        s = sentences[k % len(sentences)]
        if total + len(s) > budget:
            break
        filler.append(s)
        total += len(s)
        k += 1
    cut, acc = len(filler), 0
    for j, s in enumerate(filler):
        if acc >= depth * total:
            cut = j
            break
        acc += len(s)
    body = [t for s in filler[:cut] for t in s] + needle + [t for s in filler[cut:] for t in s]
    return NiahPrompt(head + body + question, value, key, length, depth)


def first_number(text: str) -> str | None:
    m = re.search(r"\d[\d,]*", text)
    return m.group(0).replace(",", "") if m else None


def digit_prefix(answer: str, value: str) -> float:
    """Share of `value`'s digits that the first number in `answer` reproduces from its start, in order."""
    got = first_number(answer) or ""
    n = 0
    while n < min(len(got), len(value)) and got[n] == value[n]:
        n += 1
    return n / len(value)


def run_niah(model: DecoderLM, tokenizer: Any, cfg: NiahConfig = NiahConfig()) -> dict[str, Any]:
    """Retrieval rate per (depth, length) cell, plus every prompt's answer. Greedy decoding."""
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    limit = int(model.cfg.max_position_embeddings)
    lengths = cfg.lengths()
    over = [n for n in lengths if n > limit]
    if over and not cfg.extrapolate:
        raise ConfigError(f"NIAH lengths {over} exceed the model's context of {limit} tokens: drop them, or pass "
                          f"--niah-extrapolate to run them anyway (RoPE extrapolation; see the caveat in the report)")
    gen = Generator(model, pad_id=tokenizer.pad_token_id)
    if over:
        # The generator refuses prompts past the trained context; here running past it is the point.
        gen.cfg = dataclasses.replace(gen.cfg, max_position_embeddings=max(lengths))
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    rng = np.random.default_rng(cfg.seed)
    rate = np.zeros((len(cfg.depths), len(lengths)))
    digits = np.zeros_like(rate)
    cells = []
    for li, length in enumerate(lengths):
        prompts = [build_prompt(tokenizer, length, d, rng, cfg.max_new_tokens)
                   for d in cfg.depths for _ in range(cfg.trials)]
        answers: list[str] = []
        for b in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[b:b + cfg.batch_size]
            # No EOS stop: a fixed budget keeps every batch one compiled shape.
            res = gen.run([p.ids for p in chunk], sampling)
            answers += [tokenizer.decode(ids) for ids in res.ids()]
        for di, depth in enumerate(cfg.depths):
            hits, share = 0, 0.0
            for t in range(cfg.trials):
                p, a = prompts[di * cfg.trials + t], answers[di * cfg.trials + t]
                ok = first_number(a) == p.value
                hits += ok
                share += digit_prefix(a, p.value)
                cells.append({"length": length, "depth": depth, "key": p.key, "value": p.value,
                              "prompt_tokens": len(p.ids), "answer": a, "correct": bool(ok)})
            rate[di, li] = hits / cfg.trials
            digits[di, li] = share / cfg.trials
    return {"lengths": lengths, "multipliers": list(cfg.multipliers), "base_length": cfg.base_length,
            "depths": list(cfg.depths), "trials": cfg.trials, "rate": rate.tolist(),
            "rate_by_length": dict(zip(map(str, lengths), rate.mean(axis=0).tolist())),
            "overall": float(rate.mean()),
            "digits_by_length": dict(zip(map(str, lengths), digits.mean(axis=0).tolist())),
            "model_context": limit,
            "beyond_context": [n for n in lengths if n > limit], "caveat": CAVEAT, "cells": cells}


# ------------------------------------------------------------------------------------------------- heat map


def _png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (h, w, 3) uint8 array: signature, IHDR, one zlib IDAT, IEND."""
    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per scanline
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _colour(v: float) -> tuple[int, int, int]:
    """0 -> red, 0.5 -> yellow, 1 -> green (the paper's palette, roughly)."""
    v = min(max(v, 0.0), 1.0)
    if v < 0.5:
        return 220, int(60 + 2 * v * 160), 60
    return int(220 - (v - 0.5) * 2 * 170), 220, 60


def plain_heatmap(rate: Sequence[Sequence[float]], cell: int = 32) -> np.ndarray:
    r = np.asarray(rate, float)
    img = np.zeros((r.shape[0] * cell, r.shape[1] * cell, 3), np.uint8)
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            img[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = _colour(r[i, j])
    img[::cell, :] = 255  # grid lines
    img[:, ::cell] = 255
    return img


def save_heatmap(result: dict[str, Any], path: str | Path, title: str = "needle in a haystack") -> tuple[Path, str]:
    """Writes the depth × length heat map; returns (path, how: 'matplotlib' or a note on the plain fallback)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    rate = np.asarray(result["rate"], float)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        tmp.write_bytes(_png_bytes(plain_heatmap(rate)))
        os.replace(tmp, path)
        return path, ("matplotlib is not installed: wrote an unlabelled heat map (rows = depths top to bottom, "
                      "columns = lengths left to right; red 0 -> green 1); pip install '.[bench]' for labels")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * rate.shape[1], 1.0 + 0.5 * rate.shape[0]))
    ax.imshow(rate, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(rate.shape[1]), [f"{n}" for n in result["lengths"]])
    ax.set_yticks(range(rate.shape[0]), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(rate.shape[0]):
        for j in range(rate.shape[1]):
            ax.text(j, i, f"{rate[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path, "matplotlib"
