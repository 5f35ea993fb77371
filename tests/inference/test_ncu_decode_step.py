"""benchmarks/ncu_decode_step.py: its reading of Nsight Compute's CSV pages (in ncu's layout: the details page a row
per metric, the raw page a header, a units row and a row per kernel), a run through an ncu stand-in, and a CPU run
of its workers (ncu itself runs on the device)."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

def _csv(rows: list[list[str]]) -> str:
    return "".join(",".join(f'"{c}"' for c in r) + "\n" for r in rows)


_HEAD = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
         "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
_ATT = ["0", "1", "python3", "h", "decode_attention", "1", "7", "(128, 1, 1)", "(64, 3, 1)", "0", "9.0"]
_GEMM = ["1", "1", "python3", "h", "gemm_fusion_dot_211", "1", "7", "(128, 1, 1)", "(9, 1, 1)", "0", "9.0"]
_SOL = "GPU Speed Of Light Throughput"
DETAILS = _csv([
    _HEAD,
    _ATT + [_SOL, "Duration", "usecond", "10.56"],
    _ATT + [_SOL, "DRAM Throughput", "%", "31.20"],
    _ATT + ["Launch Statistics", "Registers Per Thread", "register/thread", "168"],
    _ATT + ["Launch Statistics", "Dynamic Shared Memory Per Block", "Kbyte/block", "32.77"],
    _ATT + ["Occupancy", "Achieved Occupancy", "%", "6.10"],
    _ATT + ["Occupancy", "Block Limit Registers", "block", "3"],
    _GEMM + [_SOL, "Duration", "nsecond", "3,120.00"],
    _GEMM + ["Scheduler Statistics", "No Eligible", "%", "n/a"],
])

_STALLS = [f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio"
           for r in ("long_scoreboard", "barrier", "wait", "math_pipe_throttle")]
RAW = _csv([
    ["ID", "Kernel Name", "dram__bytes_read.sum", "dram__bytes_write.sum"] + _STALLS,
    ["", "", "Mbyte", "Kbyte", "ratio", "ratio", "ratio", "ratio"],
    ["0", "decode_attention", "9.44", "48.00", "5.5", "0.25", "1.5", "0.0"],
    ["1", "gemm_fusion_dot_211", "0.70", "0", "0.8", "2.0", "0.1", "0.3"],
])


@pytest.fixture()
def nds(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("ncu_decode_step", None)
    import ncu_decode_step

    return ncu_decode_step


def test_pages_parse_into_one_record_a_kernel(nds):
    ks = nds.merge(nds.parse_details(DETAILS), nds.parse_raw(RAW))
    assert [k["name"] for k in ks] == ["decode_attention", "gemm_fusion_dot_211"]
    att, gemm = ks
    assert att["duration"] == pytest.approx(10.56) and gemm["duration"] == pytest.approx(3.12)  # ns -> µs
    assert att["dram_pct"] == pytest.approx(31.2) and att["regs"] == 168 and att["ach_occ_pct"] == 6.1
    assert att["dyn_smem"] == pytest.approx(32770)
    assert "no_eligible_pct" not in gemm  # "n/a" is no figure
    assert att["grid"] == "(64, 3, 1)"
    assert att["dram_bytes"] == pytest.approx(9.44e6 + 48e3)
    assert att["dram_gbs"] == pytest.approx((9.44e6 + 48e3) / 10.56e-6 / 1e9)
    assert list(att["top_stalls"]) == ["long_scoreboard", "wait", "barrier"]
    assert list(gemm["top_stalls"]) == ["barrier", "long_scoreboard", "math_pipe_throttle"]
    md = nds.render_md({"meta": {"device": "d", "date": "t", "versions": {"jax": "x"}, "command": "c", "batch": 64,
                                 "context": 192, "skip": 30, "kernels": 2}, "kernels": ks})
    assert "| 0 | `decode_attention` | (64, 3, 1) | (128, 1, 1) | 168 | 10.56 | 9.49 | 898 |" in md
    assert "long_scoreboard 5.5, wait 1.5, barrier 0.2" in md


def test_missing_ncu_is_a_clear_error(nds, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(nds, "find_ncu", lambda: None)
    assert nds.main(["--out", str(tmp_path)]) == 2
    assert "ncu (Nsight Compute) not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nds.main(["--kernels", "0"])


def test_worker_runs_the_decode_loop_on_cpu(nds, capsys):
    nds.main(["--worker", "--tiny", "--batch", "2", "--context", "8", "--steps", "2"])
    assert "batch 2, context 8, 2 steps profiled" in capsys.readouterr().out


def test_attention_worker_runs_the_kernel_on_cpu(nds, capsys):
    nds.main(["--worker", "--what", "attention", "--tiny", "--batch", "2", "--context", "20", "--steps", "2"])
    out = capsys.readouterr().out
    # the cache in whole 128-slot blocks, as the decode loop's
    from pallas_kernels.decode_attention import planned_stages

    said = re.search(r"worker: decode attention (\d+)-slot blocks, (\d+) split\(s\), (\d+) warps, (\d+) stages, "
                     r"over 128 slots; batch 2, context 20, 2 steps profiled", out)
    assert said and int(said.group(4)) == planned_stages(2), out


def _fake_ncu(tmp_path: Path, rc: int) -> str:
    """An ncu stand-in: profiling writes the report (or fails with `rc`), `-i` prints the pages above."""
    (tmp_path / "details.csv").write_text(DETAILS)
    (tmp_path / "raw.csv").write_text(RAW)
    exe = tmp_path / "ncu"
    exe.write_text(f"""#!/bin/sh
case "$*" in
  *--version*) echo "NVIDIA (R) Nsight Compute"; echo "Version 0.0 (fake)";;
  *"--page details --print-details"*) echo "details text";;
  *"--csv --page details"*) cat {tmp_path}/details.csv;;
  *"--csv --page raw"*) cat {tmp_path}/raw.csv;;
  *) [ {rc} -ne 0 ] && exit {rc}
     echo "ncu_decode_step worker: decode attention 64-slot blocks, 1 split(s), 4 warps, 3 stages, over 256 slots;\
 batch 64, context 192, 2 steps profiled"
     while [ "$1" != "-o" ]; do shift; done; touch "$2.ncu-rep";;
esac
""")
    exe.chmod(0o755)
    return str(exe)


def test_a_run_writes_its_report_and_a_failed_one_keeps_the_last(nds, monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(nds, "find_ncu", lambda: _fake_ncu(tmp_path, 0))
    assert nds.main(["--what", "attention", "--batch", "64", "--out", str(out)]) == 0
    r = json.loads((out / "ncu_attention_b64.json").read_text())
    assert [k["name"] for k in r["kernels"]] == ["decode_attention", "gemm_fusion_dot_211"]
    assert r["meta"]["ncu"] == "Version 0.0 (fake)" and r["meta"]["what"] == "attention"
    assert (out / "ncu_attention_b64.ncu-rep").exists() and (out / "ncu_attention_b64_details.txt").exists()
    # what the worker said it ran (its tiling) named in the report
    assert r["meta"]["ran"] == "decode attention 64-slot blocks, 1 split(s), 4 warps, 3 stages, over 256 slots"
    assert (f"(`--what attention`: {r['meta']['ran']}), teacher heads, batch 64, the new token at slot 192; 2 calls"
            in (out / "ncu_attention_b64.md").read_text())
    before = (out / "ncu_attention_b64.md").read_text()
    monkeypatch.setattr(nds, "find_ncu", lambda: _fake_ncu(tmp_path, 139))
    assert nds.main(["--what", "attention", "--batch", "64", "--out", str(out)]) == 1
    assert "ncu exited 139" in capsys.readouterr().err
    assert (out / "ncu_attention_b64.md").read_text() == before and (out / "ncu_attention_b64.ncu-rep").exists()
