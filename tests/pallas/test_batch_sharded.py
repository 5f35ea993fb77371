"""Kernels under a batch-sharded jit run per device shard (`dispatch.batch_sharded`), equal to the unsharded call.

A Pallas kernel is a custom call on a GPU, which GSPMD cannot partition: without `shard_map` it gathers the
batch-split operands and runs the whole batch on every device. On a CPU the interpret-mode kernels are plain HLO,
yet GSPMD still gathers them (their grid indexes the batch), so "no all-gather" tells the two paths apart here too.

Runs `batch_sharded_worker.py` in a subprocess: the 8 fake CPU devices need XLA_FLAGS set before jax is imported.
Tolerance: relative 1e-5 — the rows are computed alike; only the gradients of the shared parameters (A, D,
dt_bias) are summed over the shards in another order (measured: ≤ 1.2e-6).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _report(part: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for k in ("XLA_FLAGS", "MAMBA_LLAMA_FORCE_REFERENCE"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "batch_sharded_worker.py"), part], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@pytest.mark.slow  # ~25-36 s on 2 cores: `make test-slow`
def test_kernels_run_per_batch_shard_under_a_context_mesh():
    rep = _report("ops")
    for name in ("ssd_kernel", "ssd_reference", "verify", "selective_scan"):
        v = rep[name]
        assert v["shard_map"], name
        assert v["max_rel"] < 1e-5, (name, v)
        # operands stay split; only the shared parameters' gradients are summed (all-reduce)
        assert set(v["collectives"]) <= {"all-reduce"}, (name, v)
    assert rep["ssd_kernel"]["n_compared"] == 10  # y, final state and the 8 float arguments' gradients
    assert rep["verify_choice"] == rep["selective_scan_choice"] == "pallas_triton"  # the kernels, not a fallback
    # a batch the mesh does not split evenly: the plain call (left to GSPMD), same result
    assert not rep["ssd_uneven_batch"]["shard_map"] and rep["ssd_uneven_batch"]["max_rel"] == 0.0
    assert rep["no_mesh"] is None


# 52 s on 2 cores (CI, 2026-12-04): `make test-slow`; the kernels-per-shard test above stays in the default run
@pytest.mark.slow
def test_train_step_runs_kernels_per_batch_shard():
    """`trainer.build_step` makes its mesh the context while tracing: on a data-parallel mesh (parameters
    replicated) the step with a Mamba1 kernel scan compiles with no all-gather and equals the 1-device step."""
    rep = _report("trainer")
    assert rep["choice"] == "pallas_triton"
    assert rep["collectives"] == ["all-reduce"], rep
    assert rep["loss_diff"] < 1e-5, rep
