"""Faults during training and saving: SIGTERM saves and stops; SIGKILL at random moments and a write error while
saving lose no complete checkpoint and the resumed run is bit-identical; half-written checkpoints are skipped;
NaN/inf batches stop the run (naming step, stage, last good checkpoint) or are skipped without touching the state;
atomic writes of exports and gen-labels parts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "train"))

import tiny  # noqa: E402
import train_worker  # noqa: E402
from mamba_llama_jax.config import CheckpointConfig  # noqa: E402
from mamba_llama_jax.data import pipeline  # noqa: E402
from mamba_llama_jax.errors import Preempted, TrainingError  # noqa: E402
from mamba_llama_jax.train import trainer  # noqa: E402


def params_of(model) -> dict[str, np.ndarray]:
    st = nnx.state(model, nnx.Param)
    return {k: np.asarray(v) for k, v in trainer.Flattener(st).flat(st).items()}


def data(st, n=64, seed=0):
    return pipeline.build_dataset(tiny.token_examples(n, seed), tiny.PadTok(), st.data, batch_size=st.batch_size)


def step_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def teacher():
    return tiny.teacher()


# the fits here compile the same few steps again (the SIGTERM test's three runs, the non-finite cases)
pytestmark = pytest.mark.usefixtures("compile_cache")


# ---------------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_and_stops_then_resume_is_exact(teacher, tmp_path):
    st = tiny.stage(steps=6)
    ck = CheckpointConfig(every=4, keep=10, async_save=True)
    h = tiny.hybrid(teacher)
    trainer.fit(st, h, teacher, data(st), out_dir=tmp_path / "full", checkpoint=ck, progress=False)
    want = params_of(h)

    def term(step, m):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: the loop saves step 3 and stops

    h2 = tiny.hybrid(teacher)
    with pytest.raises(Preempted, match=r"stage lw: stopped by SIGTERM after step 3; saved checkpoint step 3"):
        trainer.fit(st, h2, teacher, data(st), out_dir=tmp_path / "cut", checkpoint=ck, progress=False,
                    callbacks=[term])
    assert step_dirs(tmp_path / "cut") == ["3"]  # on disk and complete before fit returned
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
    h3 = tiny.hybrid(teacher)
    trainer.fit(st, h3, teacher, data(st), out_dir=tmp_path / "cut", checkpoint=ck, progress=False)
    got = params_of(h3)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_cli_exits_143_on_preemption(monkeypatch, capsys):
    from mamba_llama_jax import cli

    def preempt(args):
        raise Preempted("stage x: stopped by SIGTERM after step 3; saved checkpoint step 3 in d")

    monkeypatch.setattr(cli, "cmd_pipeline", preempt)
    assert cli.main(["pipeline", "--config", "c.yaml"]) == 143
    assert capsys.readouterr().err.startswith("preempted: stage x")


# ------------------------------------------------------------------------------- SIGKILL and write errors


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
    return train_worker.subprocess_env(tmp_path_factory.mktemp("xla"))


def _run(recipe: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "train_worker.py"), str(recipe), *flags], env=env,
                          capture_output=True, text=True, timeout=600)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_write_error_keeps_previous_checkpoint_and_resume_is_exact(tmp_path, worker_env):
    """RLIMIT_FSIZE makes the OS refuse the checkpoint writes after step 4 (EFBIG, as a full disk would); the run
    stops with a CheckpointError naming the intact step 3, and a rerun resumes from it bit-for-bit."""
    full = train_worker.write_recipe(tmp_path / "full", steps=8, every=3)
    r = _run(full, worker_env)
    assert r.returncode == 0, r.stderr[-3000:]
    # synchronous saves: step 3 is on disk before the cap, so the failing write is step 6's
    cut = train_worker.write_recipe(tmp_path / "cut", steps=8, every=3, async_save=False)
    ckdir = tmp_path / "cut" / "run" / "distill" / "checkpoints"
    r = _run(cut, worker_env, "--fsize-at", "4")
    assert r.returncode == 2, r.stderr[-3000:]
    # orbax's background threads may log after the worker's own one-line message
    err = next(ln for ln in reversed(r.stderr.splitlines()) if ln.startswith("error: "))
    assert err.startswith("error: writing a checkpoint failed") and "step 3" in err and "is intact" in err, err
    before = _files(ckdir / "3")
    assert any(".orbax-checkpoint-tmp" in p.name for p in ckdir.iterdir())  # the half-written save
    r = _run(cut, worker_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _files(ckdir / "3") == before  # the complete checkpoint was never touched
    a, b = np.load(tmp_path / "full" / "run" / "final.npz"), np.load(tmp_path / "cut" / "run" / "final.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_soak_three_kills(tmp_path):
    """The soak script with 3 SIGKILLs, a SIGTERM and a write fault: bit-identical, nothing lost."""
    out = tmp_path / "soak.json"
    script = HERE.parents[1] / "benchmarks" / "soak_preemption.py"
    r = subprocess.run([sys.executable, str(script), "--kills", "3", "--steps", "36", "--sigterms", "1",
                        "--write-faults", "1", "--workdir", str(tmp_path / "w"), "--json", str(out), "--no-report"],
                       capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parents[1])))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import json
    res = json.loads(out.read_text())
    assert res["bit_identical"] and res["bytes_lost"] == 0 and res["kills_survived"] >= 2
    assert res["sigterms_ok"] == res["sigterms_sent"] and res["write_faults_ok"] == res["write_faults_injected"]


# --------------------------------------------------------------------------- half-written checkpoints


def _abstract(teacher, st):
    step = trainer.build_step(st, tiny.hybrid(teacher), teacher, trainer.mesh_lib.make_mesh())
    return trainer._abstract({"trainable": step.student.trainable, "frozen": step.student.frozen,
                              "opt_state": trainer.init_opt_state(step),
                              "rng": jax.random.key_data(jax.random.key(0)), "step": jnp.zeros((), jnp.int32)})


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory):
    """A 4-step run with checkpoints 2 and 4 (copied by each test that damages it)."""
    d = tmp_path_factory.mktemp("trained")
    st = tiny.stage(steps=4)
    trainer.fit(st, tiny.hybrid(teacher), teacher, data(st), out_dir=d, progress=False,
                checkpoint=CheckpointConfig(every=2, keep=5, async_save=False))
    return d


@pytest.mark.parametrize("damage", ["truncate", "delete", "tmp_only"])
def test_half_written_checkpoint_is_skipped(teacher, trained, tmp_path, damage):
    import shutil

    st = tiny.stage(steps=4)
    ck = CheckpointConfig(every=2, keep=5, async_save=False)
    shutil.copytree(trained / "checkpoints", tmp_path / "checkpoints")
    cdir = tmp_path / "checkpoints"
    files = sorted(f for f in (cdir / "4").rglob("*") if f.is_file() and f.stat().st_size > 0)
    if damage == "truncate":  # every file cut in half, as an interrupted copy would leave it
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "delete":
        for f in files[::2]:
            f.unlink()
    else:  # a save killed before its rename: only orbax's temporary directory exists
        os.rename(cdir / "4", cdir / "4.orbax-checkpoint-tmp-1234")
    c = trainer.Checkpointer(cdir, ck)
    got = c.restore_latest(_abstract(teacher, st), None)
    c.close()
    assert got is not None and got[0] == 2


# ------------------------------------------------------------------------------------------ numerical faults


class _Poison:
    """A grain map that turns the batches at the given positions into ones that make the loss (or only the
    gradient) non-finite: a token id past the vocabulary flags them for the patched objective below."""

    def __init__(self, at: set[int]):
        self.at, self.i = at, 0

    def __call__(self, batch):
        self.i += 1
        if self.i in self.at:
            batch = dict(batch, tokens=np.where(batch["loss_mask"] > 0, 10_000, batch["tokens"]).astype(np.int32))
        return batch


def _poisoned_objective(monkeypatch, grad_only: bool):
    from mamba_llama_jax.train import stages

    real = stages.objective

    def objective(name):
        ref_fn, loss_fn = real(name)

        def clean(b):
            return dict(b, tokens=jnp.where(b["tokens"] >= 10_000, 1, b["tokens"]))

        def loss(model, batch, ref, cfg):
            bad = jnp.any(batch["tokens"] >= 10_000)
            value, aux = loss_fn(model, clean(batch), ref, cfg)
            if grad_only:
                # 0 * sqrt(z) at z = x - x = 0: value 0, gradient 0 * inf = NaN (z = 1 for clean batches, so
                # their gradient stays finite through the select)
                total = sum(jnp.sum(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
                z = jnp.where(bad, total - jax.lax.stop_gradient(total), 1.0)
                return value + 0.0 * jnp.sqrt(z), aux
            return jnp.where(bad, jnp.inf, value), aux

        return (lambda model, batch: ref_fn(model, clean(batch))), loss

    monkeypatch.setattr(stages, "objective", objective)


@pytest.mark.parametrize("grad_only", [False, True], ids=["loss_inf", "grad_nan"])
def test_nonfinite_stops_naming_step_stage_checkpoint(teacher, tmp_path, monkeypatch, grad_only):
    _poisoned_objective(monkeypatch, grad_only)
    st = tiny.stage(steps=6)
    ck = CheckpointConfig(every=2, async_save=False)
    ds = data(st).map(_Poison({5}))
    with pytest.raises(TrainingError, match=r"stage lw: non-finite loss .* at step 5.*last good checkpoint is step 4"):
        trainer.fit(st, tiny.hybrid(teacher), teacher, ds, out_dir=tmp_path, checkpoint=ck, progress=False)
    assert step_dirs(tmp_path) == ["2", "4"]  # the poisoned state was never saved


def test_skip_nonfinite_keeps_state_and_counts(teacher, tmp_path, monkeypatch):
    _poisoned_objective(monkeypatch, grad_only=True)
    st = tiny.replace(tiny.stage(steps=6), skip_nonfinite=2)
    ck = CheckpointConfig(every=1, keep=10, async_save=False)
    h = tiny.hybrid(teacher)
    r = trainer.fit(st, h, teacher, data(st).map(_Poison({3, 5})), out_dir=tmp_path, checkpoint=ck, log_every=1,
                    progress=False)
    assert [m["skipped"] for m in r.metrics] == [0, 0, 1, 0, 1, 0]
    assert all(np.isfinite(v).all() for v in params_of(h).values())
    import orbax.checkpoint as ocp

    read = lambda s: ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(s) / "state")
    s2, s3, s4 = read(2), read(3), read(4)
    for k in s2["trainable"]:  # step 3 was skipped: its state is step 2's; step 4 moved on
        np.testing.assert_array_equal(s2["trainable"][k], s3["trainable"][k])
    jax.tree.map(np.testing.assert_array_equal, s2["opt_state"], s3["opt_state"])
    assert any(not np.array_equal(s3["trainable"][k], s4["trainable"][k]) for k in s3["trainable"])
    # a third bad batch is one too many
    with pytest.raises(TrainingError, match=r"at step 6 after skipping 2 such batch"):
        trainer.fit(st, tiny.hybrid(teacher), teacher, data(st).map(_Poison({2, 4, 6})), out_dir=tmp_path / "b",
                    checkpoint=ck, progress=False)


def test_skip_nonfinite_is_validated():
    from mamba_llama_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="skip_nonfinite"):
        tiny.stage(skip_nonfinite=-1)


# ------------------------------------------------------------------------------------------ other atomic writes


def test_torn_metrics_line_does_not_break_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    m = trainer.MetricsLog(log, resume_step=2)
    assert [r["step"] for r in m.read()] == [1, 2]


def test_gen_labels_part_write_error_leaves_no_part(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from mamba_llama_jax.data import sources

    real = pq.write_table

    def half_then_fail(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half a part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    part = tmp_path / "part-000-00000.parquet"
    with pytest.raises(OSError):
        sources._write_parquet(part, [{"tokens": [1, 2], "loss_mask": [0, 1]}])
    assert not part.exists()  # a rerun regenerates the part instead of trusting a torn one
    monkeypatch.setattr(pq, "write_table", real)
    sources._write_parquet(part, [{"tokens": [1, 2], "loss_mask": [0, 1]}])
    assert pq.read_table(part).to_pylist() == [{"tokens": [1, 2], "loss_mask": [0, 1]}]


def test_export_write_error_keeps_previous_export(teacher, tmp_path, monkeypatch):
    import safetensors.numpy

    from mamba_llama_jax.convert.mambainllama import export_mambainllama

    h = tiny.hybrid(teacher)
    out = export_mambainllama(h, tmp_path / "exp")
    before = _files(out)

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_mambainllama(tiny.hybrid(teacher, seed=9), out, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary directory left behind
