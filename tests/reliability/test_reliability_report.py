"""The reliability report's fuzz section: the lines no mutated input reached are listed per module where the
fuzzer recorded them, and rows from older runs (no record) add nothing."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _fuzz(coverage: dict) -> dict:
    row = dict(parser="torch_pickle", inputs=10, accepted=1, errors={"ModelFormatError": 9}, crashes={},
               coverage=coverage, slowest_input_s=0.01)
    return {"fuzz": dict(date="2026-12-05", time_limit_s=10.0, mem_limit_gib=4.0, parsers=[row], total_inputs=10,
                         total_crashes=0, versions={"jax": "x"})}


def test_unreached_lines_are_listed_only_where_recorded(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import reliability_report as rr

    cov = {"statements": 104, "missing": 2, "percent": 98.1}
    md = rr.render(_fuzz({"mamba_llama_jax/convert/torch_pickle.py": {**cov, "missing_lines": "71, 132-135"}}))
    assert "| torch_pickle | 10 | 1 | ModelFormatError 9 | 0 | torch_pickle.py 98 % | 0.010 s |" in md
    assert "Lines no mutated input reached" in md and "- torch_pickle.py: 71, 132-135" in md
    assert md.index("- torch_pickle.py: 71") < md.index("Versions: jax x.")
    older = rr.render(_fuzz({"mamba_llama_jax/convert/torch_pickle.py": cov}))
    assert "Lines no mutated input reached" not in older and "Versions: jax x." in older
    sys.modules.pop("reliability_report", None)
