"""benchmarks/bench_decode_attention.py on the CPU (interpret mode, tiny shapes): the XLA reference and each tiling
of the kernel timed on donated caches, the tiling `plan` picks marked, and a report; the same for verify chunks."""

import json
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow  # 22 s on 2 cores (2026-12-08): `make test-slow`; the decode tiny run above stays
def test_tiny_verify_run_times_every_split(tmp_path, monkeypatch):
    monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")  # timed by profile events (above)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_decode_attention", None)
    import bench_decode_attention as bda

    assert bda.main(["--tiny", "--verify-tokens", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "verify_attention_tiny.json").read_text())
    assert data["meta"]["verify_tokens"] == 3
    rows = data["rows"]
    assert [r["impl"] for r in rows] == ["xla", "b16 s1 w4", "b16 s2 w4", "b32 s1 w4"]
    for r in rows:
        assert "error" not in r, r
        assert r["device_us"] > 0 and r["wall_us"] > 0, r
    assert [r["impl"] for r in rows if r["planned"]] == ["b32 s1 w4"]  # short caches: unsplit, the largest block
    assert "Verify attention (3-token chunks)" in (tmp_path / "verify_attention_tiny.md").read_text()
    assert not (tmp_path / "decode_attention_tiny.json").exists()


def test_verify_contexts_must_hold_the_chunk(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_decode_attention as bda

    with pytest.raises(SystemExit) as e:  # the default contexts put the new token in the last slot
        bda.main(["--verify-tokens", "4", "--out", str(tmp_path)])
    assert e.value.code == 2 and "4096:4095" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_step_carries_its_donated_caches(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import numpy as np

    import bench_decode_attention as bda

    step = bda.make_step(1, 32, 5, 16, 2, 4, heads=4, kv=2, d=16, interpret=True)
    a, b = np.asarray(step(), np.float32), np.asarray(step(), np.float32)
    # the second call reads the caches the first one wrote (same token into the same slot: same result)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
    # a verify chunk: the same, its 3 tokens rewritten into the same slots
    step = bda.make_step(1, 32, 5, 16, 2, 4, heads=4, kv=2, d=32, interpret=True, verify_tokens=3)
    a, b = np.asarray(step(), np.float32), np.asarray(step(), np.float32)
    assert a.shape == (1, 3, 4 * 32)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


def test_tilings_restrict_the_sweep_and_stem_names_the_files(tmp_path, monkeypatch, capsys):
    import pytest

    monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")  # timed by profile events (above)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_decode_attention", None)
    import bench_decode_attention as bda

    assert bda.main(["--tiny", "--tilings", "32:1:1,16:2:1,64:1:1", "--stem", "slope", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "slope_tiny.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["xla", "b32 s1 w1", "b16 s2 w1"]  # 64 slots do not tile a 32-slot cache
    for bad in ("64:1", "64:x:4", "64:0:4"):
        with pytest.raises(SystemExit) as e:
            bda.main(["--tilings", bad, "--out", str(tmp_path)])
        assert e.value.code == 2 and "block:splits:warps" in capsys.readouterr().err
