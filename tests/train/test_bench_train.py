"""benchmarks/bench_train.py: its FLOP count, one variant run in-process on a tiny model (the code path the GPU run
takes, bar the device), and (slow) the whole script in --tiny mode: workers, deadlines, train.json and train.md."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def bt(load_benchmark):
    return load_benchmark("bench_train")


def test_analytic_flops_by_hand(bt):
    from mamba_llama_jax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=2)
    B, L, Q = 1, 3, 4
    f = bt.analytic_flops(cfg, {1}, B, L, "mamba", "full", Q)  # layer 0 Mamba2 (trained), layer 1 attention
    T = B * L
    attn = 2 * T * 4 * (4 + 2 * 2) + 2 * T * 4 * 4 + 2 * 2 * B * 2 * L * L * 2
    mamba_in = 2 * T * 4 * (2 * 4 + 2 * 2 + 2)
    mamba = mamba_in + 2 * T * 4 * 4 + 2 * T * 2 * (Q * 2 + Q * 2 + 2 * 2 * 2)
    mlp, head = 2 * T * 3 * 4 * 6, 2 * T * 4 * 10
    assert f["teacher_forward"] == 2 * (attn + mlp) + head
    assert f["student_forward"] == attn + mamba + 2 * mlp + head
    ssd = mamba - mamba_in - 2 * T * 4 * 4
    core = 2 * 2 * B * 2 * L * L * 2
    assert f["student_input_grads"] == head + (attn + mlp + core) + (mamba + mlp + ssd) - mamba_in
    assert f["student_weight_grads"] == mamba_in + 2 * T * 4 * 4
    assert f["hardware_flops"] - f["model_flops"] == attn + mamba + 2 * mlp


def test_one_variant_in_process(bt):
    """The default variant on the tiny model: finite loss, >= the timed steps, and the analytic FLOPs within 15 %
    of XLA's own count (XLA also counts elementwise work; no Pallas call or loop hides anything here)."""
    args = argparse.Namespace(tiny=True, steps=2, warmup=1)
    models = bt.build_models(True)

    r = bt.run_variant(bt.BY_NAME["default"], models, args, 60.0)
    assert r["loss_finite"] and r["steps_timed"] == 2 and r["tokens_per_s"] > 0
    assert r["implementations"]["ssd"].startswith("xla_chunked")
    assert 0.85 < r["flops"]["model_flops"] / r["cost_analysis_flops"] < 1.05
    assert r["memory_analysis"]["temp_size_in_bytes"] > 0


@pytest.mark.slow
def test_tiny_run_writes_results(tmp_path):
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--out", str(out),
                        "--variants", "default,plain,pallas,flash-preview", "--cache-dir", str(tmp_path / "xla")],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((out / "train.json").read_text())
    res = {x["name"]: x for x in data["results"]}
    assert set(res) == {"default", "plain", "pallas", "flash-preview", "substeps:pallas"} or \
        set(res) == {"default", "plain", "pallas", "flash-preview", "substeps:default"}
    for name in ("default", "plain", "pallas"):
        assert res[name]["loss_finite"] and res[name]["steps_timed"] == 3, res[name]
    assert res["pallas"]["implementations"]["ssd"] == "dispatch.ssd -> reference_chunked"  # CPU: the reference
    assert "needs a GPU" in res["flash-preview"]["skipped"]
    sub = next(x for n, x in res.items() if n.startswith("substeps:"))
    assert set(sub["ms"]) == {"teacher_forward", "student_fwd_bwd", "optimizer"}
    md = (out / "train.md").read_text()
    assert "| plain |" in md and "Where the time goes" in md and "2·T·D·V" in md
    assert data["meta"]["versions"]["jax"] and data["meta"]["command"].startswith("python bench_train.py")
