"""benchmarks/bench_speculative.py's comparison of speculative with plain greedy output."""

import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_first_divergence(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    assert bs.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bs.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bs.first_divergence([9, 2, 3], [1, 2, 4]) == 0
    assert bs.first_divergence([1, 2], [1, 2, 3]) == 2
    assert bs._median_or_dash([]) == "—" and bs._median_or_dash([3, 7, 100]) == "7"
    sys.modules.pop("bench_speculative", None)
