"""benchmarks/bench_param_dtype.py on the CPU: every side runs, the cast halves the bytes the decode step reads and
the uncast side is only the old behaviour inside its context."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_tiny_run_records_each_side(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_param_dtype as bpd
    from mamba_llama_jax.inference import generate as G

    keep = G._param_name
    monkeypatch.setattr(bpd, "use_decode_flags", lambda: "added")
    bpd.main(["--tiny", "--models", "draft6", "--batches", "1", "--out", str(tmp_path), "--stem", "pd"])
    assert G._param_name is keep  # cast_skipped restored the cast
    res = json.loads((tmp_path / "pd.json").read_text())
    (row,) = res["rows"]
    assert (row["model"], row["batch"]) == ("draft6", 1)
    mb = {s: row[s]["param_mb"] for s in ("cast", "uncast", "bf16")}
    # the weight matrices are nearly all of the bytes: cast to bf16, about half the fp32 copy's; the cast keeps the
    # norms and Mamba scalars fp32, which a model created in bf16 holds in bf16
    assert mb["bf16"] < mb["cast"] < 1.05 * mb["bf16"] and 1.8 < mb["uncast"] / mb["cast"] < 2.0
    assert row["uncast"]["same"] is True  # batch 1: the same bf16 values reach the same ops
    assert all(row[s]["decode_ms_per_step"] > 0 for s in mb)
    assert "| draft6 | 1 |" in (tmp_path / "pd.md").read_text()
    with pytest.raises(SystemExit):
        bpd.main(["--tiny", "--models", "draft7", "--out", str(tmp_path)])
    sys.modules.pop("bench_param_dtype", None)
