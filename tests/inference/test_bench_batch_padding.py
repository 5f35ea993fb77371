"""benchmarks/bench_batch_padding.py on the CPU: both sides run, the rows each decoded are recorded."""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_tiny_run_records_both_sides(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_batch_padding as bp
    from mamba_llama_jax.inference.generate import PAD_BATCH_ENV, Generator

    # the CPU runs no decode kernels, so nothing would be padded: pretend they run (the XLA path decodes the rows)
    monkeypatch.setattr(Generator, "uses_kernel", lambda self: True)
    monkeypatch.setattr(bp, "use_decode_flags", lambda: "added")
    bp.main(["--tiny", "--batches", "5,2", "--out", str(tmp_path), "--stem", "bp"])
    res = json.loads((tmp_path / "bp.json").read_text())
    assert [(r["batch"], r["off"]["rows"], r["on"]["rows"]) for r in res["rows"]] == [(5, 5, 16), (2, 2, 2)]
    assert all(r[s]["decode_ms_per_step"] > 0 and r[s]["runs"] == 2 for r in res["rows"] for s in ("off", "on"))
    assert all(isinstance(r["same"], bool) for r in res["rows"])
    assert res["date"] and res["device"] and "jax" in res["versions"]
    md = (tmp_path / "bp.md").read_text()
    assert "| 5 | 5 | 16 |" in md and PAD_BATCH_ENV not in os.environ
    sys.modules.pop("bench_batch_padding", None)
