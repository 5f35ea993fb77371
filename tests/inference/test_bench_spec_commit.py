"""benchmarks/bench_spec_commit.py on the CPU: both commit sides run and give the same tokens, `perlayer` commits
each Mamba layer by its own multistep-verify call and conv-window gather, `batched` each model's layers by one call
and one gather, and the perlayer side's context leaves the batched commit in place afterwards."""

import contextlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_tiny_run_records_both_sides(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_spec_commit as bsc
    from mamba_llama_jax.inference import speculative as S
    from mamba_llama_jax.models import cache as C
    from pallas_kernels import dispatch

    keep, side_commit, verify = S.advance_all, bsc.commit, dispatch.verify
    side, heads = [None], {}

    @contextlib.contextmanager
    def tagged(name):
        side[0] = name
        with side_commit(name):
            yield

    def counted(*a, **kw):  # the head count of each traced multistep-verify call, by side
        heads.setdefault(side[0], set()).add(a[1].shape[2])
        return verify(*a, **kw)

    window = C.rolled_window
    gathers = {}

    def counted_window(*a, **kw):  # conv-window gathers traced, by side
        gathers[side[0]] = gathers.get(side[0], 0) + 1
        return window(*a, **kw)

    monkeypatch.setattr(C, "rolled_window", counted_window)
    monkeypatch.setattr(bsc, "commit", tagged)
    monkeypatch.setattr(dispatch, "verify", counted)
    monkeypatch.setattr(bsc, "use_decode_flags", lambda: "added")
    bsc.main(["--tiny", "--k", "2", "--runs", "1", "--out", str(tmp_path), "--stem", "sc"])
    assert S.advance_all is keep  # the perlayer side's context restored the batched commit
    res = json.loads((tmp_path / "sc.json").read_text())
    rows = {r["side"]: r for r in res["rows"]}
    assert set(rows) == {"perlayer", "batched"} and rows["batched"]["same"] is True
    assert all(r["rounds"] > 0 and r["round_ms"] > 0 and r["loop"]["1.0"] > 0 for r in rows.values())
    assert "| 2 | batched |" in (tmp_path / "sc.md").read_text()
    # The tiny target has 2 Mamba2 layers of 4 heads, the 2-layer draft 2 more: a batched commit sees 8 heads (a
    # model's two layers side by side), a per-layer commit 4, as every verify chunk does.
    assert heads == {"perlayer": {4}, "batched": {4, 8}}
    assert gathers == {"perlayer": 4, "batched": 2}  # a gather per layer, or per model
    with pytest.raises(SystemExit):
        bsc.main(["--tiny", "--k", "0", "--out", str(tmp_path)])
    sys.modules.pop("bench_spec_commit", None)
