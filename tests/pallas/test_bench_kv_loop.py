"""benchmarks/bench_kv_loop.py on the CPU (interpret mode, tiny shapes): each probe of the decode attention loop and
the kernel checked against their references, timed by profile events, and a report; unknown variants refused."""

import json
import sys
from pathlib import Path

import pytest

from pallas_kernels.triton_call import CHECK_BOUNDS_ENV

ROOT = Path(__file__).parents[2]


def _bench(monkeypatch):
    monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")  # timed by profile events: the checked interpreter leaves none
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_kv_loop", None)
    import bench_kv_loop
    return bench_kv_loop


@pytest.mark.slow  # 20 s on 2 cores (2026-12-07): `make test-slow`
def test_tiny_run_checks_and_times_each_variant(tmp_path, monkeypatch):
    bkl = _bench(monkeypatch)
    variants = ["xla_sum", "sum@hm", "dot+valid+where", "dot+valid_pf", "kernel"]
    assert bkl.main(["--tiny", "--out", str(tmp_path), "--variants", ",".join(variants)]) == 0
    data = json.loads((tmp_path / "kv_loop.json").read_text())
    assert [r["variant"] for r in data["rows"]] == variants and data["meta"]["stages"] == 2
    for r in data["rows"]:
        assert "error" not in r, r
        assert r["us_per_layer"] > 0 and r["gb_s"] > 0, r
        if r["variant"] != "xla_sum":  # XLA's sum is the bandwidth yardstick, no attention to check
            assert r["max_abs_err"] < 1e-4, r
    assert "| tiny | dot+valid_pf |" in (tmp_path / "kv_loop.md").read_text()


def test_probe_reference_sees_the_mask_and_the_new_token():
    """The probes' jnp reference: the padding mask and the substituted new token change its answer (so a probe
    that dropped either would fail its check)."""
    import jax
    import jax.numpy as jnp

    bkl = sys.modules.get("bench_kv_loop")
    if bkl is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import bench_kv_loop as bkl
    k = jax.random.split(jax.random.key(1), 3)
    kc, vc = (jax.random.normal(x, (2, 32, 2, 16)) for x in k[:2])
    q = jax.random.normal(k[2], (16, 16))
    valid = jnp.ones((2, 32), jnp.int32).at[:, :5].set(0)
    kw = dict(head_major=False, block=16)
    plain = bkl.probe_reference(kc, vc, q, 20, valid, form="dot", **kw)
    assert float(jnp.max(jnp.abs(plain - bkl.probe_reference(kc, vc, q, 20, valid, form="dot+valid", **kw)))) > 1e-3
    assert float(jnp.max(jnp.abs(plain - bkl.probe_reference(kc, vc, q, 20, valid, form="dot+where", **kw)))) > 1e-3


def test_unknown_variant_or_shape_is_refused(tmp_path, monkeypatch):
    bkl = _bench(monkeypatch)
    with pytest.raises(SystemExit):
        bkl.main(["--out", str(tmp_path), "--variants", "dot+nope"])
    with pytest.raises(SystemExit):
        bkl.main(["--out", str(tmp_path), "--shapes", "b9-9"])
    assert not (tmp_path / "kv_loop.json").exists()
