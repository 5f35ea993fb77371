"""benchmarks/bench_fused_decode.py on the CPU (interpret mode, small shapes): every GEMV, the XLA reference and
each kernel block, agreeing with the reference, with a device time from the profile and a report."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_tiny_run_measures_every_variant(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_fused_decode", None)
    import bench_fused_decode as bfd

    assert bfd.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "fused_decode_tiny.json").read_text())["rows"]
    assert {r["gemv"] for r in rows} == set(bfd.TINY_SHAPES)
    for r in rows:
        assert "error" not in r, r
        assert r["max_abs_diff"] < 0.05, r  # bf16: summation order only
        assert r["device_us"] > 0 and r["wall_us"] > 0, r
    assert sum(r["impl"] == "xla" for r in rows) == len(bfd.TINY_SHAPES)
    assert "Best kernel per GEMV" in (tmp_path / "fused_decode_tiny.md").read_text()
