"""benchmarks/bench_generate.py's compiled prefill + decode loop (shared with bench_decode_profile): what it runs
is what `Generator.run` produces for the same prompts, greedy, every step taken."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[2]


def test_compiled_generate_equals_the_generator(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import jax.numpy as jnp

    import bench_generate as bg
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    model = bg._jax_model(None, tiny=True)
    gen = Generator(model)
    prompts = np.random.default_rng(0).integers(1, gen.cfg.vocab_size, (2, 8))
    c = bg.compile_generate(gen, jnp.asarray(prompts, jnp.int32), 6)
    pre_s, dec_s, toks = c.once()
    assert pre_s > 0 and dec_s > 0 and toks.shape == (2, 6)
    want = gen.run([list(map(int, p)) for p in prompts], SamplingConfig(max_new_tokens=6)).ids()
    assert [list(map(int, t)) for t in np.asarray(toks)] == [list(map(int, w)) for w in want]
    first, cache = c.prefill()
    np.testing.assert_array_equal(np.asarray(c.decode(first, cache)), np.asarray(toks))  # deterministic, reusable
    sys.modules.pop("bench_generate", None)


@pytest.mark.slow  # 22 s on 2 cores (2026-12-07): `make test-slow`
def test_variants_with_profile_settings(monkeypatch, tmp_path):
    """`NAME@SETTINGS`: a bench_generate variant with bench_decode_profile's settings in force while it is traced
    (checked before any worker starts); the tiny teacher suite runs one side by side with the plain variant."""

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate as bg

    assert bg.split_variant("fused") == ("fused", "")
    assert bg.split_variant("fused@adot+cublas") == ("fused", "adot+cublas")
    for bad, msg in (("turbo@adot", "unknown variant 'turbo'"), ("fused@", "names no settings"),
                     ("fused@warp9", "unknown variant setting"), ("fused@ana+hw", "diagnostic")):
        with pytest.raises(SystemExit, match=msg):
            bg.split_variant(bad)
    # the worker traces each variant with its settings in force, and restores the defaults after
    from argparse import Namespace

    from pallas_kernels import decode_attention as da

    seen = {}

    def fake_measure(name, model, args, fuse, block, res, key=None):
        seen[name] = (da.plan(1, 3, 384, max_splits=16)[1], da.planned_dot(64))
        return None, {"variant": name, "batches": {"run": key}}
    monkeypatch.setattr(bg, "_measure_variant", fake_measure)
    default = (da.plan(1, 3, 384, max_splits=16)[1], da.planned_dot(64))
    bg.worker_jax(Namespace(teacher=None, tiny=True, variant="fused@s2+adot,fused,fused@s2+adot",
                            result=str(tmp_path / "w.json"), facts=False, save_weights=None))
    assert seen == {"fused@s2+adot": (2, True), "fused": default} and default != (2, True)
    # a name given twice: measured under its own key, kept as the first run's "again"
    w = json.loads((tmp_path / "w.json").read_text())["variants"]
    assert set(w) == {"fused@s2+adot", "fused"} and w["fused@s2+adot"]["batches"] == {"run": "fused@s2+adot"}
    assert w["fused@s2+adot"]["again"] == {"run": "fused@s2+adot (again)"} and "again" not in w["fused"]
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit, match="unknown variant setting"):  # before a worker is spawned
        monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--tiny", "--no-hf", "--variants", "fused@nope",
                                          "--out", str(tmp_path)])
        bg.main()
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--tiny", "--no-hf", "--batches", "2", "--variants",
                                      "fused,fused@s2+aew", "--out", str(tmp_path), "--deadline-s", "400",
                                      "--dump-batch", "2"])
    bg.main()
    r = json.loads((tmp_path / "generate.json").read_text())
    assert set(r["explore"]) == {"fused", "fused@s2+aew"}
    assert r["explore"]["fused@s2+aew"]["settings"] == "s2+aew" and r["explore"]["fused"]["settings"] == ""
    assert all(v["batches"] for v in r["explore"].values()) and r["jax"]["batches"]["2"]["decode_tokens_per_s"] > 0
    # the baseline (first variant) ran again after the others, and the report shows both of its runs
    assert set(r["explore"]["fused"]["again"]) == {"1", "64"} and "again" not in r["explore"]["fused@s2+aew"]
    assert "- fused (" in (md := (tmp_path / "generate.md").read_text()) and "; again last: b=1 " in md
    # the decode loop's optimised HLO at the batch asked for (the workers are told it), its while loop inside
    dump = bg.hlo_dump_name(2, r["jax"]["variant"])
    assert re.fullmatch(r"decode_b2_[A-Za-z0-9_.-]+\.hlo\.txt", dump)
    assert "while" in (tmp_path / dump).read_text()
    sys.modules.pop("bench_generate", None)


ROW = {"prefill_tokens_per_s": 1e4, "decode_ms_per_step": 0.5, "decode_tokens_per_s": 2e3}


def _fake_spawn(calls: list, each=lambda: None):
    """A stand-in for bench_generate._spawn's jax workers: records (variants, batches, timeout), calls `each` (e.g.
    to advance a fake clock) and returns every named variant measured, a repeated name folded into the first's
    "again" as worker_jax does."""
    def spawn(mode, args, extra, xla_flags="", timeout=600, env_extra=None):
        names = extra[extra.index("--variant") + 1].split(",")
        batches = extra[extra.index("--batches") + 1].split(",")
        calls.append((names, batches, timeout))
        each()
        out = {n: {"variant": n, "xla_flags": xla_flags, "fused": True, "window_block": 128,
                   "batches": {b: dict(ROW) for b in batches}} for n in names}
        if len(names) > 1 and names[0] == names[-1]:
            out[names[0]]["again"] = {b: dict(ROW) for b in batches}
        return {"variants": out}
    return spawn


def _orchestrate_args(tmp_path, **kw):
    from argparse import Namespace

    return Namespace(**{**dict(out=str(tmp_path), variants="fused,fused@aew", batches=[1, 64], runs=21, no_hf=True,
                               prompt_len=128, new_tokens=256, hf_runs=2, teacher=None), **kw})


def test_report_says_which_batches_the_final_run_skipped(monkeypatch):
    """A deadline reached during the variants' exploration leaves the final table empty: the report says so
    (session 17's first run on the H100 printed an empty table and nothing else)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate as bg

    r = {"date": "d", "device": "cpu", "versions": {}, "command": "c", "best_variant": "fused", "hf": None,
         "config": {"model": "m", "prompt_len": 8, "new_tokens": 4, "jax_runs": 21},
         "jax": {"xla_flags": "", "fused": True, "window_block": 128, "batches": {"1": ROW},
                 "skipped": ["batch 64: deadline"]}}
    md = bg.render_md(r)
    assert "**Not in the final run**: batch 64: deadline" in md and "| 1 | 10,000 | 0.500 |" in md
    del r["jax"]["skipped"]
    assert "Not in the final run" not in bg.render_md(r)
    r["jax"]["facts"] = {"copy_bandwidth_GBps": 2600.0, "copy_bandwidth_median_GBps": 2000.0, "weight_bytes": 2e8,
                         "kv_bytes_per_token": 23e3, "lm_head_plus_argmax_ms_b1": 0.04,
                         "lm_head_plus_argmax_ms_b64": 0.05}
    assert "Measured copy bandwidth 2,600 GB/s (read + write, best of 40; median 2,000)" in bg.render_md(r)
    sys.modules.pop("bench_generate", None)


def test_variants_leave_the_final_run_its_share_of_the_deadline(monkeypatch, tmp_path):
    """The variants tried first stop where FINAL_SHARE of --deadline-s is left: the final table gets measured, and
    the report names what was not tried."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from types import SimpleNamespace

    import bench_generate as bg

    clock = [1000.0]
    monkeypatch.setattr(bg, "time", SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0]))
    calls = []

    def advance():
        clock[0] += 30.0  # every worker takes 30 s of the 100
    monkeypatch.setattr(bg, "_spawn", _fake_spawn(calls, advance))
    bg.orchestrate(_orchestrate_args(tmp_path, deadline_s=100.0, explore_processes=True))
    # 60 s for the variants: the baseline and the challenger ran, the baseline's second run did not
    assert [(c[0], c[1]) for c in calls] == [(["fused"], ["1", "64"]), (["fused@aew"], ["1", "64"]),
                                             (["fused"], ["1", "64"])]
    assert calls[0][2] <= 60 and calls[1][2] <= 30
    r = json.loads((tmp_path / "generate.json").read_text())
    assert r["explore_not_tried"] == ["fused (again)"] and set(r["jax"]["batches"]) == {"1", "64"}
    md = (tmp_path / "generate.md").read_text()
    assert "Not tried (the time left to the final run, 40% of --deadline-s): fused (again)." in md
    sys.modules.pop("bench_generate", None)


def test_variants_sharing_their_xla_flags_are_explored_in_one_process(monkeypatch, tmp_path):
    """Variants with the same XLA flags go to one worker (the baseline named again last); the report says how they
    ran. A variant with flags of its own still gets a process of its own."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate as bg

    calls = []
    monkeypatch.setattr(bg, "_spawn", _fake_spawn(calls))
    args = _orchestrate_args(tmp_path, deadline_s=300.0, explore_processes=False)
    bg.orchestrate(args)
    # the explore in one worker, then the final run
    assert [c[0] for c in calls] == [["fused", "fused@aew", "fused"], ["fused"]]
    r = json.loads((tmp_path / "generate.json").read_text())
    assert r["explore_mode"] == "one process" and "again" in r["explore"]["fused"] and not r["explore_not_tried"]
    assert "in this order, one process, decode ms/step" in (tmp_path / "generate.md").read_text()
    calls.clear()
    args.variants, args.out = "fused,attn+splitk1", str(tmp_path / "b")  # another variant's XLA flags
    bg.orchestrate(args)
    assert [c[0] for c in calls] == [["fused"], ["attn+splitk1"], ["fused"], ["fused"]]
    assert json.loads((tmp_path / "b" / "generate.json").read_text())["explore_mode"] == "a process each"
    sys.modules.pop("bench_generate", None)
