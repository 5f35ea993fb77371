"""benchmarks/train_scaling.py (`bench_train.py --devices N`): the HLO collective count, the profile's interval
arithmetic on hand-made planes, the scaling ratios and report, and (slow) the whole run on a fake 4-device CPU
mesh: data parallel and FSDP steps, and a checkpoint saved on 4 devices restored on 1 bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def ts(load_benchmark):
    return load_benchmark("train_scaling")


HLO = """\
  %all-reduce-start.1 = (f32[576,1545]{1,0}, f32[576,1545]{1,0}) all-reduce-start(f32[576,1545]{1,0} %p), replica_groups={{0,1}}
  %all-reduce-done.1 = f32[576,1545]{1,0} all-reduce-done((f32[576,1545]{1,0}, f32[576,1545]{1,0}) %all-reduce-start.1)
  %all-gather.2 = bf16[49152,576]{1,0} all-gather(bf16[24576,576]{1,0} %q), dimensions={0}
  ROOT %reduce-scatter.3 = f32[288]{0} reduce-scatter(f32[576]{0} %g), dimensions={0}
  %fusion.4 = f32[8]{0} fusion(f32[8]{0} %x), kind=kLoop, calls=%all-reduce-lookalike
"""


def test_hlo_collectives_counts_ops_once_with_result_bytes(ts):
    got = ts.hlo_collectives(HLO)
    assert got == {"all-reduce": {"count": 1, "bytes": 576 * 1545 * 4},
                   "all-gather": {"count": 1, "bytes": 49152 * 576 * 2},
                   "reduce-scatter": {"count": 1, "bytes": 288 * 4}}


def ev(name, a, b):
    return NS(name=name, start_ns=a, end_ns=b)


def test_collective_time_from_stream_lines(ts):
    """Two steps on one GPU: a collective kernel 0–100 ns half overlapped by compute 50–150 on another stream,
    and one 200–260 alone; the 'XLA Ops' line (op-level duplicates) is not read when stream lines exist."""
    gpu = NS(name="/device:GPU:0", lines=[
        NS(name="Stream #13(Compute)", events=[ev("fusion.1", 50, 150), ev("gemm", 300, 400)]),
        NS(name="Stream #20(NCCL)", events=[ev("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 0, 100),
                                             ev("ncclDevKernel_AllGather_RING_LL", 200, 260)]),
        NS(name="XLA Ops", events=[ev("all-reduce-start.1", 0, 1000)]),
    ])
    host = NS(name="/host:CPU", lines=[NS(name="python", events=[ev("all-reduce in python", 0, 5000)])])
    r = ts.collective_time([gpu, host], steps=2)
    assert r["devices"] == 1
    assert r["collective_ms"] == pytest.approx(160 / 1e6 / 2)
    assert r["exposed_ms"] == pytest.approx((50 + 60) / 1e6 / 2)  # 0–50 and 200–260 overlap nothing
    assert r["busy_ms"] == pytest.approx((150 + 60 + 100) / 1e6 / 2)
    assert set(r["top_collectives_ms"]) == {"ncclDevKernel_AllReduce_Sum_f32_RING_LL",
                                            "ncclDevKernel_AllGather_RING_LL"}
    assert r["per_device"][0]["lines"] == ["Stream #13(Compute)", "Stream #20(NCCL)"]


def test_interval_difference(ts):
    assert ts._minus([(0, 10), (20, 30)], [(2, 4), (8, 22), (25, 26)]) == [(0, 2), (4, 8), (22, 25), (26, 30)]
    assert ts._minus([(0, 10)], []) == [(0, 10)]
    assert ts._union([(5, 7), (0, 2), (1, 3), (7, 9)]) == [(0, 3), (5, 9)]


def test_ratios_and_report(ts):
    one = {"name": "scale:layerwise:1", "tokens_per_s": 100.0, "devices": 1}
    res = {
        "scale:layerwise:1": one,
        "scale:layerwise:data": {"name": "scale:layerwise:data", "tokens_per_s": 190.0, "devices": 2},
        "scale:layerwise:fsdp": {"name": "scale:layerwise:fsdp", "error": "deadline: compile + timing"},
    }
    rat = ts.ratios(res)
    assert rat == {"layerwise:data": {"ratio": 1.9, "per_device_efficiency": 0.95, "devices": 2}}
    full = {"step_ms_median": 10.0, "batch": 8, "mesh_shape": [1, 1, 1], "mfu": 0.1, "compile_s": 3,
            "profile": {"error": "CUPTI unavailable"}, "hlo_collectives": {}, "implementations": {"ssd": "x"},
            "seq_len": 2048}
    res["scale:layerwise:1"] = {**one, **full}
    res["scale:layerwise:data"] = {**res["scale:layerwise:data"], **full, "mesh_shape": [2, 1, 1],
                                   "hlo_collectives": {"all-reduce": {"count": 3, "bytes": 2_000_000}},
                                   "profile": {"collective_ms": 1.5, "exposed_ms": 0.25}}
    meta = {"devices": 2, "date": "d", "device": "GPU", "device_count": 2, "versions": {"jax": "0"},
            "command": "c", "env": {"NCCL_NVLS_ENABLE": "0"}, "tiny": False}
    md = ts.markdown(meta, res)
    assert "| 1.90x | 0.95 |" in md and "all-reduce ×3 (2.0 MB)" in md and "| 1.50 | 0.25 |" in md
    assert "profile failed: CUPTI unavailable" in md and "deadline: compile + timing" in md
    assert "- layerwise:data: 1.90x on 2 devices, efficiency 0.95: met" in md
    assert "NCCL_NVLS_ENABLE=0" in md and "- not run" in md  # no resume item


@pytest.mark.slow
def test_tiny_scaling_run_on_four_cpu_devices(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--devices", "4",
                        "--out", str(out), "--cache-dir", ""], capture_output=True, text=True, timeout=900,
                       cwd=str(ROOT), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((out / "train_scaling.json").read_text())
    res = {x["name"]: x for x in data["results"]}
    assert list(res) == ["scale:layerwise:1", "scale:layerwise:data", "scale:layerwise:fsdp", "resume:fsdp",
                         "scale:all:1", "scale:all:data", "scale:all:fsdp"]
    for name, x in res.items():
        if name.startswith("scale:"):
            assert x["loss_finite"] and x["steps_timed"] == 3, x
            assert x["batch"] == 2 * x["devices"] and x["devices"] == (1 if name.endswith(":1") else 4)
    assert res["scale:all:1"]["hlo_collectives"] == {}
    assert "all-reduce" in res["scale:all:data"]["hlo_collectives"]  # gradients summed over the replicas
    assert res["scale:all:data"]["n_sharded_parameters"] == 0
    fsdp = res["scale:all:fsdp"]
    assert "all-gather" in fsdp["hlo_collectives"] and fsdp["n_sharded_parameters"] > 0
    resume = res["resume:fsdp"]
    assert resume["exact"] and resume["saved_sharded_arrays"] > 0
    assert resume["1 device"]["bit_identical"] == resume["1 device"]["leaves"] > 10
    assert set(data["ratios"]) == {"layerwise:data", "layerwise:fsdp", "all:data", "all:fsdp"}
    md = (out / "train_scaling.md").read_text()
    assert "Exact resume across device counts" in md and "exact: **True**" in md
