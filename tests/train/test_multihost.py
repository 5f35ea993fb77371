"""Two CPU processes on localhost form one JAX run (`jax.distributed.initialize`, coordinator on 127.0.0.1), each
feeding its own half of every batch (`make_array_from_process_local_data`), and train the tiny hybrid three
steps with `trainer.fit`: both end with the same parameters, equal to a single-process run on the whole batches
within 1e-5 (the gradient all-reduce sums in another order)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[2]
WORKER = Path(__file__).parent / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow  # ~25-36 s on 2 cores: `make test-slow`
@pytest.mark.timeout(300)
def test_two_processes_train_like_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(tmp_path / "multi")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run([sys.executable, str(WORKER), "0", "1", "0", str(tmp_path / "single")], env=env,
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _load(tmp_path / "multi" / "params-0.npz"), _load(tmp_path / "multi" / "params-1.npz")
    s = _load(tmp_path / "single" / "params-0.npz")
    assert a.keys() == b.keys() == s.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_allclose(a[k], s[k], atol=1e-5, err_msg=k)
    losses = lambda out: eval(next(ln for ln in out.splitlines() if ln.startswith("LOSSES"))[len("LOSSES "):])
    multi, one = losses(outs[0][0]), losses(single.stdout)
    assert len(multi) == 3 and np.allclose(multi, one, atol=1e-5), (multi, one)
    assert multi[-1] < multi[0]  # it trained
