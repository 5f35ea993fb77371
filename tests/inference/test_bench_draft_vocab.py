"""bench_draft_vocab's retokenization: the rank-file BPE (`benchmarks/rank_bpe.py`) and its coverage table."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from rank_bpe import RankBPE  # noqa: E402


def write_ranks(path: Path, merges: list[bytes]) -> Path:
    """A byte-level rank file: the 256 bytes, then `merges` in rank order."""
    toks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks)))
    return path


def test_merges_go_by_rank_not_by_position(tmp_path):
    bpe = RankBPE.from_file(write_ranks(tmp_path / "r.model", [b"bc", b"ab", b"xy"]))
    assert bpe.size == 259
    # "abc": bc (256) outranks ab (257), and a + bc is no token: [a, bc]; a left-first merge would give [ab, c]
    assert bpe.encode("abc") == [ord("a"), 256]
    assert bpe.encode("ab") == [257]
    # pieces split before merging: " xy" is one piece (space + letters), "xy" merges inside it
    assert bpe.encode("ab xy") == [257, ord(" "), 258]


def test_round_trip_and_pieces(tmp_path):
    bpe = RankBPE.from_file(write_ranks(tmp_path / "r.model", [b"he", b"hel", b"hell", b"hello", b" w"]))
    text = "hello world 12345 naïve — café!\n\n"
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode("hello")[0] == 259 and len(bpe.encode("hello")) == 1
    assert bpe.encode("1234") == [ord("1"), ord("2"), ord("3"), ord("4")]  # digits in runs of <= 3, no merges


def test_bad_rank_files(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match="bad.model:2"):
        RankBPE.from_file(bad)
    few = tmp_path / "few.model"
    few.write_text("IQ== 0\n")
    with pytest.raises(ValueError, match="every single byte"):
        RankBPE.from_file(few)


def test_retokenized_coverage(tmp_path):
    import bench_draft_vocab as bdv

    path = write_ranks(tmp_path / "r.model", [b"ab", b"cd"])

    class Tok:  # the target's tokenizer: ids 0..3 are the texts "ab", "cd", "e", "ab"
        def decode(self, ids):
            return "".join(["ab", "cd", "e", "ab"][i] for i in ids)

    res = bdv.retokenized([[0, 1, 2]], [[3, 3]], Tok(), path, specials=2, sizes=[256, 257, 258, 999])
    # held-out text "abcde" -> [ab=256, cd=257, e=101]: ids < 256: 1 of 3, < 257: 2 of 3, < 258: all
    assert res["vocab"] == 260 and res["heldout_tokens"] == 3 and res["train_tokens"] == 2
    assert [r["size"] for r in res["rows"]] == [256, 257, 258]  # sizes past the vocabulary dropped
    assert [round(r["first_n"], 3) for r in res["rows"]] == [0.333, 0.667, 1.0]
    assert res["rows"][0]["frequency_top_n"] == pytest.approx(2 / 3)  # "ab" (256) most frequent in training
    md = bdv.render_md(dict(device="cpu", dtype="float32", date="d", versions={}, command="c", wall_s=1.0,
                            target="t", vocab=4, heldout_prompts=1, heldout_tokens=3, train_prompts=1,
                            train_tokens=2, new_tokens=3, rows=res["rows"], retokenized=res))
    assert "r.model" in md and md.count("| N | head |") == 2
