"""Byte-level BPE from a rank file in tiktoken's format (one `base64(token bytes) rank` pair a line), for benchmarks
that count a text in another model's vocabulary without that model or tiktoken: Llama 3's `tokenizer.model` is
such a file (PyPI: `pip download --no-deps llama-models`, then `llama_models/llama3/tokenizer.model`).

Encoding is the rank-ordered merge tiktoken defines: each pre-tokenized piece starts as its bytes, and the adjacent
pair whose concatenation has the lowest rank is merged until no adjacent pair is a token; the ranks are the ids.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

# Llama 3's pre-tokenizer pattern (as its tokenizer code gives it): contractions, letters with one leading
# non-letter, digits in runs of up to three, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class RankBPE:
    """`encode(text) -> ids` for a rank file; `decode(ids) -> text` (UTF-8, replacement for broken bytes)."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = LLAMA3_PATTERN):
        import regex  # transformers' dependency; the standard `re` has no \\p{L}

        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"a byte-level rank file must rank every single byte; {len(missing)} are missing "
                             f"(e.g. {missing[:3]})")
        self.ranks = ranks
        self.tokens = {r: t for t, r in ranks.items()}
        self._split = regex.compile(pattern)
        self._piece = functools.lru_cache(maxsize=1 << 16)(self._merge)

    @classmethod
    def from_file(cls, path: str | Path, pattern: str = LLAMA3_PATTERN) -> "RankBPE":
        ranks: dict[bytes, int] = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a `base64 rank` line ({e})") from None
        return cls(ranks, pattern)

    @property
    def size(self) -> int:
        return max(self.ranks.values()) + 1

    def _merge(self, piece: bytes) -> tuple[int, ...]:
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        return tuple(self.ranks[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._split.findall(text):
            out += self._piece(piece.encode("utf-8"))
        return out

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.tokens[i] for i in ids).decode("utf-8", errors="replace")
