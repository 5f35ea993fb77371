"""The trainer: one jitted, sharded step for every stage; optax; orbax checkpoints with exact resume; metrics.

Why it is built this way:
- The step is `jax.jit` over pure functions (`nnx.split` once, `nnx.merge` inside), not `nnx.jit`: the graph
  traversal happens once at trace time and the compiled step is a plain function of arrays.
- The student is split into *trainable* and *frozen* parameters by the stage's filter. Only the trainable ones are
  differentiated and given optimizer state, so a frozen parameter has no gradient computed, no Adam moments and
  cannot change (this is what `optax.masked`/`multi_transform` would do, minus the wasted weight gradients).
  `optax.masked` still applies weight decay to matrices only.
- Parameters travel as flat dicts {"layers/3/mixer/in_proj/kernel": array}: plain pytrees for optax and orbax,
  with one NamedSharding each from their logical axes (`train/mesh.py`). The teacher is sharded by the same rules.
- The frozen teacher (or DPO reference) runs before `value_and_grad`, under `stop_gradient`.
- Gradient accumulation scans over micro-batches inside the step; the loss is the mean of the micro-batch
  losses (each normalised within its micro-batch, as the official HF-Trainer-based code does).
- Everything that decides the future of a run is in the checkpoint — parameters, optimizer state, data-iterator
  state, RNG, step — so a resumed run continues bit-for-bit. A non-finite loss stops the run before anything is
  saved, so the newest checkpoint on disk is always a good one.
- SIGTERM (what a preempted VM receives) sets a flag; after the current step the run saves a checkpoint, waits
  until it is on disk and raises `Preempted`. A failed save raises `CheckpointError` naming the intact previous one.
- With a stage's `skip_nonfinite`, a batch with a non-finite loss or gradient leaves parameters and optimizer state
  as they were (a select inside the jitted step, since its inputs are donated), up to that many times.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from mamba_llama_jax.config import (
    CheckpointConfig, HybridConfig, OptimConfig, StageConfig, TrainConfig, load_config,
)
from mamba_llama_jax.errors import CheckpointError, ConfigError, Preempted, TrainingError
from mamba_llama_jax.models.llama import DecoderLM
from mamba_llama_jax.train import mesh as mesh_lib
from mamba_llama_jax.train import stages

log = logging.getLogger(__name__)
Flat = dict[str, jax.Array]


# --------------------------------------------------------------------------------------------- flat parameters


class Flattener:
    """nnx.State <-> flat dict keyed by 'a/b/0/c', keeping the State's tree structure for the way back."""

    def __init__(self, state: nnx.State):
        paths, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        # The last key of each path is the Variable's own `value` attribute: not part of the parameter's name.
        self.names = ["/".join(_key(k) for k in (p[:-1] if p and _key(p[-1]) == "value" else p)) for p, _ in paths]
        if len(set(self.names)) != len(self.names):
            raise TrainingError("parameter names collide when flattened")

    def flat(self, state: nnx.State) -> Flat:
        return dict(zip(self.names, jax.tree.leaves(state)))

    def unflat(self, flat: Flat) -> nnx.State:
        return jax.tree.unflatten(self.treedef, [flat[n] for n in self.names])


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


@dataclasses.dataclass
class SplitModel:
    """A model split for training: static graph, trainable and frozen parameter dicts, other state."""

    graphdef: Any
    trainable: Flat
    frozen: Flat
    rest: nnx.State
    t_flat: Flattener
    f_flat: Flattener
    shardings: dict[str, Any]  # name -> NamedSharding, for trainable and frozen alike

    def merge(self, trainable: Flat | None = None, frozen: Flat | None = None) -> Any:
        return nnx.merge(self.graphdef, self.t_flat.unflat(self.trainable if trainable is None else trainable),
                         self.f_flat.unflat(self.frozen if frozen is None else frozen), self.rest)


def split_model(model: DecoderLM, train: str, mesh: jax.sharding.Mesh) -> SplitModel:
    """Splits `model` by the stage's trainable filter and places its parameters on `mesh`."""
    filt = stages.trainable_filter(model, train)
    graphdef, tr, fr, rest = nnx.split(model, filt, nnx.Param, ...)
    tf, ff = Flattener(tr), Flattener(fr)
    shard = {**tf.flat(mesh_lib.state_shardings(tr, mesh)), **ff.flat(mesh_lib.state_shardings(fr, mesh))}
    # Trainable arrays are donated to the step: they need buffers of their own, since a converted model shares
    # buffers with its teacher (copied weights are the same arrays).
    trainable = _fresh({k: _place(v, shard[k]) for k, v in tf.flat(tr).items()})
    frozen = {k: _place(v, shard[k]) for k, v in ff.flat(fr).items()}
    return SplitModel(graphdef, trainable, frozen, rest, tf, ff, shard)


def _fresh(arrays: Flat) -> Flat:
    """Copies of `arrays` in new buffers, same shardings. `device_put(..., may_alias=False)` is not enough: placing
    an array that lives on one device onto a sharding over several devices including that one reuses its buffer
    for that device's shard (jax 0.12), and a donated step then fails on its first multi-device run. A jitted
    identity never returns an input buffer it was not donated."""
    if not arrays or any(isinstance(v, jax.ShapeDtypeStruct) for v in arrays.values()):
        return arrays
    return jax.jit(lambda a: a, out_shardings={k: v.sharding for k, v in arrays.items()})(arrays)


def _place(v: Any, sharding: Any) -> Any:
    """An array on its sharding; an abstract one (a model from `nnx.eval_shape`, for ahead-of-time compilation of
    models too big to materialise: benchmarks/memory_llama3_8b.py) just carries the sharding."""
    if isinstance(v, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
    if jax.process_count() > 1 and not sharding.is_fully_addressable:
        # Several hosts: every host holds the same full value (same weights, same seeds); each places its own
        # shards. (device_put of a host-local array onto a multi-host sharding gives arrays orbax cannot save.)
        host = np.asarray(v)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.device_put(v, sharding)


# ------------------------------------------------------------------------------------------------- optimizer


def lr_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine to end_lr_ratio·lr at `steps` (or constant)."""
    warm = min(cfg.warmup_steps, max(steps - 1, 0))
    if cfg.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)],
                                    [warm])
    return optax.warmup_cosine_decay_schedule(0.0 if warm else cfg.lr, cfg.lr, warm, max(steps, warm + 1),
                                              end_value=cfg.lr * cfg.end_lr_ratio)


def make_optimizer(cfg: OptimConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) after global-norm clipping."""
    sched = lr_schedule(cfg, steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), sched


# ------------------------------------------------------------------------------------------------------- step


@dataclasses.dataclass
class Step:
    """The compiled step and what it needs: `step(trainable, opt_state, rng, frozen, teacher, batch)`."""

    fn: Callable[..., Any]
    student: SplitModel
    teacher: SplitModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    opt_shardings: Any


def frozen_in_compute_dtype(params: Flat, dtype: Any) -> Flat:
    """The frozen model's matrices (Linear kernels, the embedding) stored in the compute dtype. Every use casts
    them to it anyway (`models.llama.Linear`, `Embed`, `DecoderLM.logits`), so results are bit-identical, while
    the teacher's weights take half the memory and the step reads and casts nothing per call. Other parameters
    (norm weights, conv weights, A_log, biases) are used in fp32 and keep their dtype."""
    def one(name: str, v: Any) -> Any:
        if not (name.endswith("/kernel") or name == "embed_tokens/embedding") or jnp.dtype(v.dtype).itemsize <= \
                jnp.dtype(dtype).itemsize:
            return v
        if isinstance(v, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(v.shape, dtype, sharding=v.sharding)
        return v.astype(dtype)  # keeps the array's sharding
    return {k: one(k, v) for k, v in params.items()}


def _micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """(B, ...) -> (n, B/n, ...) with micro-batch a holding rows a, a+n, a+2n, ...: every device keeps a share of
    every micro-batch (a contiguous split would leave devices idle)."""
    def one(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def build_step(stage: StageConfig, student: DecoderLM, teacher: DecoderLM, mesh: jax.sharding.Mesh,
               *, donate: bool = True,
               objective_fns: tuple[Callable[..., Any], Callable[..., Any]] | None = None) -> Step:
    """The stage's jitted train step over `mesh`. The teacher is the DPO reference for objective 'dpo'.

    With `stage.skip_nonfinite`, a step whose loss or gradient norm is not finite returns the parameters, optimizer
    state it was given (metric `skipped` = 1): the choice is made inside the step because its inputs are donated.
    `objective_fns`: (reference, loss) functions replacing the stage objective's (benchmarks compare
    implementations of one objective this way, e.g. `stages.distill_loss_full`)."""
    if objective_fns is None:
        stages.check_depths(stage.objective, len(student.layers), len(teacher.layers))
    # static: part of the graphdef split below (the teacher never differentiates); set every time, so that a model
    # reused by several stages takes each stage's own choice
    student.remat = stage.remat
    s = split_model(student, stage.train, mesh)
    t = split_model(teacher, "all", mesh)
    t.trainable = frozen_in_compute_dtype(t.trainable, jnp.dtype(teacher.cfg.dtype))
    tx, sched = make_optimizer(stage.optim, stage.steps)
    ref_fn, loss_fn = objective_fns or stages.objective(stage.objective)
    loss_cfg, accum, skip = stage.loss, stage.grad_accum, stage.skip_nonfinite > 0

    def one_micro(trainable: Flat, frozen: Flat, teacher_p: Flat, mb: dict[str, jax.Array]):
        ref = jax.lax.stop_gradient(ref_fn(t.merge(teacher_p), mb))

        def f(tr: Flat):
            return loss_fn(s.merge(tr, frozen), mb, ref, loss_cfg)
        return jax.value_and_grad(f, has_aux=True)(trainable)

    def step(trainable: Flat, opt_state: Any, rng: jax.Array, frozen: Flat, teacher_p: Flat,
             batch: dict[str, jax.Array]):
        # The mesh as context while tracing (set here, inside the traced function, so that `fn(...)` and
        # `fn.lower(...)` both see it): the model's batch-sharding hints and the dispatcher's per-shard kernels
        # read it (`train.mesh.batch_split_axes`).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return traced_step(trainable, opt_state, rng, frozen, teacher_p, batch)

    def traced_step(trainable: Flat, opt_state: Any, rng: jax.Array, frozen: Flat, teacher_p: Flat,
                    batch: dict[str, jax.Array]):
        if accum == 1:
            (loss, metrics), grads = one_micro(trainable, frozen, teacher_p, batch)
        else:
            def body(acc, mb):
                (l, m), g = one_micro(trainable, frozen, teacher_p, mb)
                return jax.tree.map(jnp.add, acc, g), (l, m)
            zeros = jax.tree.map(jnp.zeros_like, trainable)
            grads, (ls, ms) = jax.lax.scan(body, zeros, _micro(batch, accum))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, metrics = jnp.mean(ls), jax.tree.map(jnp.mean, ms)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new_tr = optax.apply_updates(trainable, updates)
        gnorm = optax.tree.norm(grads)
        metrics = dict(metrics, loss=loss, grad_norm=gnorm)
        if skip:
            finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
            keep = lambda new, old: jnp.where(finite, new, old)
            new_tr, new_opt = jax.tree.map(keep, new_tr, trainable), jax.tree.map(keep, new_opt, opt_state)
            metrics["skipped"] = 1 - finite.astype(jnp.int32)
        trainable, opt_state = new_tr, new_opt
        rng, _ = jax.random.split(rng)  # consumed by stochastic objectives; advanced every step for exact resume
        return trainable, opt_state, rng, metrics

    t_shard = {k: s.shardings[k] for k in s.trainable}
    opt_shard = _opt_shardings(tx, s, mesh)
    repl = mesh_lib.replicated(mesh)
    fn = jax.jit(step, donate_argnums=(0, 1) if donate else (),
                 out_shardings=(t_shard, opt_shard, repl, repl))
    return Step(fn, s, t, tx, sched, mesh, opt_shard)


def _opt_shardings(tx: optax.GradientTransformation, s: SplitModel, mesh: jax.sharding.Mesh) -> Any:
    """Shardings of the optimizer state: every moment like the parameter it belongs to; counters replicated."""
    abstract = jax.eval_shape(tx.init, s.trainable)
    repl = mesh_lib.replicated(mesh)

    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        for k in reversed(path):
            name = _key(k)
            if name in s.trainable and getattr(leaf, "shape", None) == s.trainable[name].shape:
                return s.shardings[name]
        return repl
    return jax.tree_util.tree_map_with_path(one, abstract)


def init_opt_state(step: Step) -> Any:
    """Optimizer state created directly in its sharded layout."""
    return jax.jit(step.tx.init, out_shardings=step.opt_shardings)(step.student.trainable)


# ------------------------------------------------------------------------------------------------ checkpoints


class Checkpointer:
    """orbax CheckpointManager over items `state` (params, optimizer, rng, step), `data` (grain iterator), `meta`.

    Saves are async; the manager writes each step to a temporary directory and renames it when complete, so a
    killed save leaves no step directory. A step directory that exists but cannot be read (corrupt, truncated,
    edited) raises `CheckpointError` naming it; `restore_latest` then falls back to the previous step.
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        self.dir = Path(directory).absolute()
        self.cfg = cfg
        opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                            create=True)
        self.mngr = ocp.CheckpointManager(self.dir, options=opts, item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, step: int, state: dict[str, Any], data_iter: Any, meta: dict[str, Any]) -> None:
        import grain

        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            # also where an earlier async save's write error surfaces
            self.mngr.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore/OS errors alike mean the write failed
            raise self._save_failed(step, e) from e

    def complete_steps(self) -> list[int]:
        """Steps whose directory is on disk under its final name: orbax writes a step to a temporary directory and
        renames it when every file is written, so these are the complete ones (read from disk, not orbax's cache)."""
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit() and p.is_dir())

    def _save_failed(self, step: int | None, e: BaseException) -> CheckpointError:
        done = [s for s in self.complete_steps() if step is None or s < step]
        intact = (f"the previous checkpoint, step {done[-1]} in {self.dir}, is intact and training can resume from it"
                  if done else f"no complete checkpoint exists in {self.dir} yet")
        # async saves report a failed write at the next save or at close, so the failing step may be an earlier one
        when = f" (reported while saving step {step})" if step is not None else ""
        detail = " ".join(str(e).split())[:300]  # one line: tensorstore's messages span several
        return CheckpointError(f"writing a checkpoint failed{when}: {type(e).__name__}: {detail}; {intact}. "
                               "Free disk space or fix the output directory, then rerun to resume")

    def restore(self, step: int, abstract_state: dict[str, Any], data_iter: Any) -> tuple[dict[str, Any], dict]:
        import grain

        args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax/tensorstore raise many types for unreadable files
            raise CheckpointError(
                f"checkpoint step {step} in {self.dir} cannot be restored ({type(e).__name__}: {e}); it is corrupt "
                f"or incomplete: delete {self.dir / str(step)} to resume from an earlier step") from e
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state: dict[str, Any], data_iter: Any
                       ) -> tuple[int, dict[str, Any], dict] | None:
        """The newest readable checkpoint (older ones tried in turn), or None when there is none."""
        steps = self.steps()
        errors = []
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, abstract_state, data_iter)
                if errors:
                    log.warning("resumed from step %d; newer checkpoints were unreadable:\n%s", step,
                                "\n".join(errors))
                return step, state, meta
            except CheckpointError as e:
                log.warning("%s", e)
                errors.append(str(e))
        if errors:
            raise CheckpointError(f"no readable checkpoint in {self.dir}:\n" + "\n".join(errors))
        return None

    def quarantine_after(self, step: int) -> None:
        """Renames step directories newer than `step` (unreadable ones that restore skipped) to
        `<step>.unreadable`, so the resumed run can save those steps again; nothing is deleted."""
        newer = [s for s in self.steps() if s > step]
        for s in newer:
            src = self.dir / str(s)
            dst = self.dir / f"{s}.unreadable"
            n = 1
            while dst.exists():
                dst, n = self.dir / f"{s}.unreadable{n}", n + 1
            os.replace(src, dst)
            log.warning("moved unreadable checkpoint %s aside to %s", src, dst)
        if newer:
            self.mngr.reload()

    def wait(self) -> None:
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an async save's write error
            raise self._save_failed(None, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.mngr.close()


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def _step_array(step: int, mesh: jax.sharding.Mesh) -> jax.Array:
    """The step counter as a global array replicated over the mesh: on several hosts orbax refuses host-local
    arrays, and every host holds the same value."""
    return jax.device_put(np.asarray(step, np.int32), mesh_lib.replicated(mesh))


# ----------------------------------------------------------------------------------------------------- metrics


class MetricsLog:
    """Append-only jsonl of per-step metrics; on resume, lines past the restored step are dropped (rewritten
    atomically), so the file always describes the run that produced the checkpoint."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if (r := _record(ln)) and r.get("step", 0) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            # Advisory output: a full disk must not end the run here; the next checkpoint save reports it, naming
            # the intact checkpoint to resume from.
            log.warning("could not append to %s: %s", self.path, e)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [r for ln in self.path.read_text().splitlines() if (r := _record(ln))]


class TensorBoardLog:
    """Scalars of every logged step as TensorBoard event files in `directory` (tensorboardX: no TensorFlow needed),
    one tag per metric under the stage's name. Missing tensorboardX only skips them, with a log note."""

    def __init__(self, directory: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.info("tensorboardX is not installed: no TensorBoard scalars (pip install tensorboardX)")
            self.writer = None
            return
        self.writer = SummaryWriter(logdir=str(directory), flush_secs=30)

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        stage, step = record.get("stage", ""), int(record["step"])
        for k, v in record.items():
            if k not in ("stage", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"{stage}/{k}" if stage else k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _record(line: str) -> dict[str, Any] | None:
    """A metrics line, or None for a torn one (a kill during its write, a full disk): the log is advisory."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) else None


class _SigtermFlag:
    """Turns SIGTERM into a flag the training loop checks between steps (main thread only; restored on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> "_SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def plot_losses(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """loss vs step as a PNG; None (with a log note) when matplotlib is not installed (`pip install '.[bench]'`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipping the loss plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in dict.fromkeys(r.get("stage", "") for r in records):
        rs = [r for r in records if r.get("stage", "") == stage]
        ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], label=stage or None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if records and all(r["loss"] > 0 for r in records):  # a DPO or skipped-batch loss can be <= 0
        ax.set_yscale("log")
    if len(records) and records[0].get("stage"):
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------------- fit


@dataclasses.dataclass
class FitResult:
    model: DecoderLM
    steps: int  # the last step run: the stage's `steps`, or fewer when a callback stopped it
    metrics: list[dict[str, Any]]
    checkpoint_dir: Path
    stopped_early: bool = False


def _warn_if_schedule_changed(stage: StageConfig, start: int, saved_steps: Any, schedule: optax.Schedule) -> None:
    """Extending a run (resuming with more `steps`, say) is allowed, but the learning-rate schedule is a function
    of `steps`: a cosine that had nearly reached its floor restarts from higher up. Says so, with the rates at the
    resumed step (`schedule`: the one this run trains with), rather than let the loss curve jump unexplained.
    Checkpoints from before `steps` was saved: quiet."""
    if not isinstance(saved_steps, int) or saved_steps == stage.steps:
        return
    was, now = float(lr_schedule(stage.optim, saved_steps)(start)), float(schedule(start))
    log.warning("stage %s: resuming step %d of a run planned for %d steps with steps=%d: the learning-rate schedule "
                "now spans %d steps (lr at step %d: %.3g -> %.3g)", stage.name, start, saved_steps, stage.steps,
                stage.steps, start, was, now)


def fit(stage: StageConfig, student: DecoderLM, teacher: DecoderLM, data: Any, *, out_dir: str | Path,
        mesh: jax.sharding.Mesh | None = None, seed: int = 0, checkpoint: CheckpointConfig = CheckpointConfig(),
        log_every: int = 10, progress: bool = True,
        callbacks: Sequence[Callable[[int, dict[str, float]], bool | None]] = ()) -> FitResult:
    """Runs (or resumes) one stage: `data` is a grain IterDataset of per-host batches (see `data/pipeline.py`).

    Checkpoints go to `out_dir/checkpoints`, metrics to `out_dir/metrics.jsonl`. If a checkpoint exists the run
    continues from it — same parameters, optimizer state, data position and RNG — so the result equals an
    uninterrupted run's. `callbacks(step, metrics)` run after every step (after its checkpoint, if any); one that
    returns True stops the stage there (a time budget, say): that step is checkpointed, so rerunning continues
    from it, and the student still gets the trained parameters. An exception from a callback aborts the stage
    without them. Returns the trained student (the model object passed in, updated in place).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    mesh = mesh or mesh_lib.make_mesh()
    step_obj = build_step(stage, student, teacher, mesh)
    s = step_obj.student
    data_iter = iter(data)
    ckpt = Checkpointer(out / "checkpoints", checkpoint)

    opt_state = init_opt_state(step_obj)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), mesh_lib.replicated(mesh))
    state = {"trainable": s.trainable, "frozen": s.frozen, "opt_state": opt_state, "rng": rng,
             "step": _step_array(0, mesh)}
    restored = ckpt.restore_latest(_abstract(state), data_iter)
    start = 0
    if restored is not None:
        start, state, meta = restored
        if meta.get("stage") != stage.name:
            raise CheckpointError(f"{ckpt.dir} holds stage {meta.get('stage')!r}, not {stage.name!r}: use another "
                                  "output directory")
        log.info("stage %s: resuming from step %d", stage.name, start)
        _warn_if_schedule_changed(stage, start, meta.get("steps"), step_obj.schedule)
        ckpt.quarantine_after(start)
    trainable, opt_state, frozen = state["trainable"], state["opt_state"], state["frozen"]
    rng = state["rng"]
    teacher_p = {**step_obj.teacher.trainable, **step_obj.teacher.frozen}
    metrics_log = MetricsLog(out / "metrics.jsonl", start)
    tb = TensorBoardLog(out / "tensorboard") if jax.process_index() == 0 else None

    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, disable=not progress, dynamic_ncols=True)
    last_good = start if restored is not None else None
    skipped = 0
    t_last, tok_since = time.perf_counter(), 0

    def save(step: int, loss: float) -> None:
        ckpt.save(step, {"trainable": trainable, "frozen": frozen, "opt_state": opt_state, "rng": rng,
                         "step": _step_array(step, mesh)}, data_iter,
                  {"stage": stage.name, "step": step, "loss": loss, "steps": stage.steps})

    def log_step(step: int, m: dict[str, float]) -> None:
        nonlocal t_last, tok_since
        now = time.perf_counter()
        rate = tok_since / max(now - t_last, 1e-9)
        t_last, tok_since = now, 0
        rec = {"stage": stage.name, "step": step, **m, "tokens_per_s": rate}
        if jax.process_index() == 0:
            metrics_log.write(rec)
            if tb is not None:
                tb.write(rec)
        extra = {"agree": f"{m['agree']:.3f}"} if "agree" in m else {}  # distillation: top-1 agreement
        bar.set_postfix(loss=f"{m['loss']:.4g}", **extra, tok_s=f"{rate:,.0f}")

    sigterm = _SigtermFlag()
    last_step, stopped_early = start, False
    m: dict[str, float] = {"loss": float("nan")}  # the last step's metrics (none yet)
    try:
        with sigterm:
            for step in range(start + 1, stage.steps + 2):
                if sigterm.requested:
                    # Preemption: keep the work since the last checkpoint, make sure it is on disk, then stop.
                    done = step - 1
                    if done > (last_good or 0):
                        save(done, m["loss"])
                        last_good = done
                    ckpt.wait()
                    where = (f"checkpoint step {last_good} in {ckpt.dir}" if last_good is not None
                             else "no checkpoint (no step had run)")
                    raise Preempted(f"stage {stage.name}: stopped by SIGTERM after step {done}; saved {where}. Rerun "
                                    "the same command to resume")
                if step > stage.steps:
                    break
                try:
                    local = next(data_iter)
                except StopIteration:
                    raise TrainingError(f"stage {stage.name}: the data ran out after {step - 1} of {stage.steps} "
                                        "steps; raise data.num_epochs (0 = repeat) or lower steps") from None
                batch = mesh_lib.global_batch(local, mesh)
                trainable, opt_state, rng, m = step_obj.fn(trainable, opt_state, rng, frozen, teacher_p, batch)
                m = {k: float(v) for k, v in m.items()}
                m["lr"] = float(step_obj.schedule(step - 1))
                if not all(math.isfinite(v) for v in (m["loss"], m["grad_norm"])):
                    skipped += 1
                    where = (f"the last good checkpoint is step {last_good} in {ckpt.dir}" if last_good is not None
                             else "no checkpoint was written yet")
                    if skipped > stage.skip_nonfinite:
                        allowed = (f" after skipping {stage.skip_nonfinite} such batch(es) (skip_nonfinite)"
                                   if stage.skip_nonfinite else "")
                        raise TrainingError(
                            f"stage {stage.name}: non-finite loss {m['loss']} (grad norm {m['grad_norm']}) at step "
                            f"{step}{allowed}; stopped without saving — {where}. Lower optim.lr, raise "
                            "optim.grad_clip's strictness, check the data, or set the stage's skip_nonfinite")
                    # The step kept the previous parameters and optimizer state (see build_step).
                    log.warning("stage %s: non-finite loss %s (grad norm %s) at step %d: batch skipped (%d of %d "
                                "allowed); %s", stage.name, m["loss"], m["grad_norm"], step, skipped,
                                stage.skip_nonfinite, where)
                tok_since += stages.real_tokens(local) * jax.process_count()
                if step % checkpoint.every == 0 or step == stage.steps:
                    save(step, m["loss"])
                    last_good = step
                if step % log_every == 0 or step == stage.steps:
                    log_step(step, m)
                bar.update(1)
                last_step = step
                if any([bool(cb(step, m)) for cb in callbacks]):  # a list: every callback sees the step
                    if last_good != step:
                        save(step, m["loss"])
                        last_good = step
                    if step % log_every != 0 and step != stage.steps:
                        log_step(step, m)  # the last step run is always in the metrics
                    stopped_early = step < stage.steps
                    break
    finally:
        bar.close()
        if tb is not None:
            tb.close()
        try:
            ckpt.close()
        except CheckpointError:
            if sys.exc_info()[1] is None:
                raise
            log.exception("closing the checkpoint manager failed while another error was raised")
    nnx.update(student, s.t_flat.unflat(trainable), s.f_flat.unflat(frozen))
    records = metrics_log.read()
    if jax.process_index() == 0 and records:
        plot_losses(records, out / "loss.png")
    return FitResult(student, last_step, records, ckpt.dir, stopped_early)


# ---------------------------------------------------------------------------------------------------- recipes


def _stage_data(stage: StageConfig, tokenizer: Any) -> Any:
    from mamba_llama_jax.data import pipeline, sources

    ex = sources.load_examples(stage.data.source, stage.data.kind, split=stage.data.split,
                               max_examples=stage.data.max_examples)
    return pipeline.build_dataset(ex, tokenizer, stage.data, batch_size=stage.batch_size,
                                  shard_index=jax.process_index(), shard_count=jax.process_count())


def run_recipe(config_path: str | Path, overrides: Sequence[str] = (), *, progress: bool = True,
               config: TrainConfig | None = None, teacher: Any = None,
               stage_callbacks: Callable[[StageConfig], Sequence[Callable[[int, dict[str, float]], bool | None]]]
               | None
               = None, init: DecoderLM | None = None, export: bool = True) -> DecoderLM:
    """Runs every stage of a recipe in order (the CLI's `pipeline`, and `distill|sft|dpo` for one-stage recipes),
    each resuming from its own checkpoints and starting from the previous stage's result; returns the final
    student, also exported (MambaInLlama format, fp32) to `output_dir/model` unless `export=False`.

    `teacher`: an already loaded `convert.Teacher` (the demo has one in memory; loading it again costs seconds),
    else the recipe's is loaded. `init`: a hybrid to start from (e.g. one trained by an earlier recipe, loaded with
    `convert.mambainllama.import_mambainllama`) instead of converting the teacher: the first stage's layout is
    reached from it as progressive conversion reaches a stage's from the previous one. `stage_callbacks(stage)`:
    the `fit` callbacks of each stage."""
    from mamba_llama_jax.convert import load_teacher
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.models.hybrid import HybridLM

    cfg = config or load_config(TrainConfig, config_path, list(overrides))
    loaded = teacher or load_teacher(cfg.teacher, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    teacher_cfg, teacher, tok = loaded
    layout: HybridConfig = cfg.hybrid
    for stage in cfg.stages:  # a late stage that cannot run must not wait for the early ones to train
        layout = stage.hybrid or layout
        stages.check_depths(stage.objective, len(layout.kept_layers(teacher_cfg.num_layers)),
                            teacher_cfg.num_layers)
        if stage.objective in stages.PER_LAYER and isinstance(teacher, HybridLM):
            raise ConfigError(f"stage {stage.name}: objective {stage.objective!r} matches Mamba layers with the "
                              "teacher's attention layers, but this teacher is a hybrid: use objective 'distill'")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    out = Path(cfg.output_dir)
    student: DecoderLM | None = init
    layout = cfg.hybrid
    for i, stage in enumerate(cfg.stages):
        layout = stage.hybrid or layout
        rngs = nnx.Rngs(cfg.seed + 1000 * i)
        student = build_hybrid(teacher, layout, rngs=rngs, previous=student,  # type: ignore[arg-type]
                               quiet=cfg.quiet_start)
        ref = nnx.clone(student) if stage.objective == "dpo" else teacher
        fit(stage, student, ref, _stage_data(stage, tok), out_dir=out / stage.name, mesh=mesh,
            seed=cfg.seed + i, checkpoint=cfg.checkpoint, log_every=cfg.log_every, progress=progress,
            callbacks=stage_callbacks(stage) if stage_callbacks else ())
    if export:
        export_student(student, out / "model", tok)  # type: ignore[arg-type]
    return student  # type: ignore[return-value]


def export_student(student: Any, path: Path, tokenizer: Any) -> Path | None:
    """The trained hybrid as a MambaInLlama directory (what `--model DIR` loads: generate, chat, eval, and the
    next `distill|sft|dpo --model`), replacing an earlier export. On several hosts the parameters are spread
    over processes that each hold only their shards: skipped with a log line (export from one host)."""
    from mamba_llama_jax.convert.mambainllama import export_mambainllama

    if jax.process_count() > 1:
        log.warning("several processes: not exporting %s (restore the checkpoint on one host to export)", path)
        return None
    try:
        return export_mambainllama(student, path, dtype="float32", tokenizer=tokenizer, overwrite=True)
    except OSError as e:  # the export is atomic: an earlier one, if any, is still whole
        raise CheckpointError(f"exporting the trained model to {path} failed ({e}); the stages' checkpoints under "
                              f"{path.parent} are intact: free space and rerun the same command to export") from e
