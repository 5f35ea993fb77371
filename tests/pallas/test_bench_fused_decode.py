"""benchmarks/bench_fused_decode.py on the CPU (interpret mode, small shapes): every GEMV, the XLA reference and
each kernel block, agreeing with the reference, with a device time from the profile and a report."""

import json
import math
import sys
from pathlib import Path

from pallas_kernels.triton_call import CHECK_BOUNDS_ENV

ROOT = Path(__file__).parents[2]


def test_tiny_run_measures_every_variant(tmp_path, monkeypatch):
    monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")  # timed by profile events, which host callbacks do not leave
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


def test_tiny_cold_run_cycles_weight_copies(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_fused_decode", None)
    import bench_fused_decode as bfd

    # the cold program calls the GEMV once per copy: every copy's output comes back (none dropped by XLA)
    mb = 12 * 4096 / 2 ** 20  # twelve copies of a 4 kB matrix
    args, ref, ker, wbytes = bfd.make_fns("matmul_residual", 64, 32, 1, True, cold=mb)
    assert wbytes == 64 * 32 * 2 and len(args[1]) == 12
    assert len(ref(*args)) == 12 and len(ker(16, 4)(*args)) == 12
    assert bfd.main(["--tiny", "--cold-mb", "0.02", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "fused_decode_cold_tiny.json").read_text())
    assert data["meta"]["cold"] == 0.02
    assert all("error" not in r and r["max_abs_diff"] < 0.05 for r in data["rows"])
    assert {r["copies"] for r in data["rows"]} == {max(2, math.ceil(0.02 * 2 ** 20 / r["weight_bytes"]))
                                                    for r in data["rows"]}
    assert "MB of weight copies" in (tmp_path / "fused_decode_cold_tiny.md").read_text()


def test_tiny_dot_sweep_traces_every_tiling(tmp_path, monkeypatch):
    """--dot: the dot path's kernels (gate·up on normalised rows, matmul + residual) at 16 rows, each tiling of
    the grid traced anew (its label names it), agreeing with XLA's reference."""
    monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_fused_decode", None)
    import bench_fused_decode as bfd

    assert bfd.main(["--tiny", "--dot", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "fused_decode_dot_tiny.json").read_text())["rows"]
    assert {r["gemv"] for r in rows} == set(bfd.TINY_DOT_SHAPES)
    for r in rows:
        assert "error" not in r and r["max_abs_diff"] < 0.05 and r["device_us"] > 0, r
    assert sorted(r["impl"] for r in rows if r["gemv"] == "gate_up") == [
        "pallas g16 db16 ds2 dk32 w4", "pallas g16 db32 ds2 dk32 w4", "xla"]
