"""benchmarks/bench_decode_attention.py on the CPU (interpret mode, tiny shapes): the XLA reference and each tiling
of the kernel timed on donated caches, the tiling `plan` picks marked, and a report."""

import json
import sys
from pathlib import Path

from pallas_kernels.triton_call import CHECK_BOUNDS_ENV

ROOT = Path(__file__).parents[2]


def test_tiny_run_times_every_tiling(tmp_path, monkeypatch):
    # it times the kernels by their profile events: the bounds-checked interpreter runs them as host callbacks,
    # which leave none
    monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_decode_attention", None)
    import bench_decode_attention as bda

    assert bda.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode_attention_tiny.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["xla", "b16 s1 w1", "b16 s2 w1", "b32 s1 w1"]
    for r in rows:
        assert "error" not in r, r
        assert r["device_us"] > 0 and r["wall_us"] > 0, r
    assert [r["impl"] for r in rows if r["planned"]] == ["b16 s2 w1"]  # plan(1, 2, 32) = (16 slots, 2 splits), 1 warp
    assert "Best tiling per case" in (tmp_path / "decode_attention_tiny.md").read_text()


def test_step_carries_its_donated_caches(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import numpy as np

    import bench_decode_attention as bda

    step = bda.make_step(1, 32, 5, 16, 2, 4, heads=4, kv=2, d=16, interpret=True)
    a, b = np.asarray(step(), np.float32), np.asarray(step(), np.float32)
    # the second call reads the caches the first one wrote (same token into the same slot: same result)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
