"""benchmarks/bench_lm_head.py on the CPU (interpret mode, a small head): every tiling's ids checked against XLA's
and a report written; benchmarks/probe_pdl.py refuses to run without a Hopper GPU and reads the timer mod 2³²."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parents[2]


def _module(monkeypatch, name):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop(name, None)
    return __import__(name)


def test_tiny_lm_head_run_reports_every_tiling_with_equal_ids(tmp_path, monkeypatch):
    blm = _module(monkeypatch, "bench_lm_head")
    assert blm.main(["--tiny", "--batches", "1,16", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "lm_head_tiny.json").read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 16]
    for r in data["rows"]:
        assert r["xla_us"] > 0 and len(r["kernel_us"]) == 2
        assert all(v["ids_equal"] and v["us"] > 0 for v in r["kernel_us"].values()), r
    assert "| 16 |" in (tmp_path / "lm_head_tiny.md").read_text()
    assert not (tmp_path / "lm_head.json").exists()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="off a GPU only")
def test_pdl_probe_needs_a_gpu(tmp_path, monkeypatch):
    probe = _module(monkeypatch, "probe_pdl")
    with pytest.raises(SystemExit, match="needs a GPU"):
        probe.main(["--out", str(tmp_path)])


def test_pdl_probe_timer_differences_wrap_mod_2_32(monkeypatch):
    probe = _module(monkeypatch, "probe_pdl")
    lo = np.array([2**31 - 10, -5, 100], np.int64)
    hi = np.array([-(2**31) + 10, 5, 40], np.int64)  # the 32-bit timer wrapped between the first pair's reads
    np.testing.assert_array_equal(probe.signed_ns(hi - lo), [20, 10, -60])
