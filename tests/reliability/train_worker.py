"""Subprocess worker for the preemption and save-fault tests and `benchmarks/soak_preemption.py` (not a test module).

    python train_worker.py RECIPE.yaml [--sigkill-at N] [--sigterm-at N] [--fsize-at N]

Runs the recipe with `run_recipe` (resuming from any checkpoint in its output_dir) and, when it finishes, writes
the final student parameters to `<output_dir>/final.npz` (atomically). Fault hooks run after step N of the stage:
--sigkill-at kills the process, --sigterm-at sends it SIGTERM (the trainer saves and raises `Preempted`: exit 143),
--fsize-at caps the size of any file it writes to 4 KiB from then on (RLIMIT_FSIZE: the next checkpoint save fails
with EFBIG, a real write error from the OS). Project errors exit 2 with `error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
TEACHER = ROOT / "tests" / "fixtures" / "tiny_llama_tied"


def write_recipe(directory: Path, *, steps: int = 40, every: int = 3, keep: int = 1000,
                 async_save: bool = True) -> Path:
    """A one-stage CPU distillation of the tiny fixture teacher into a 50 % hybrid, checkpointing every `every`."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    msgs = lambda i: [{"role": "user", "content": f"question {i} about {i % 7}"},
                      {"role": "assistant", "content": f"answer {i} is {i * 3} and {i % 5}"}]
    data = directory / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": msgs(i)}) + "\n" for i in range(24)))
    recipe = {
        "output_dir": str(directory / "run"), "teacher": str(TEACHER), "dtype": "float32", "seed": 3,
        "hybrid": {"attn_fraction": 0.5, "mamba": {"chunk_size": 16}}, "log_every": 1,
        "checkpoint": {"every": every, "keep": keep, "async_save": async_save},
        "stages": [{"name": "distill", "steps": steps, "batch_size": 2,
                    "data": {"source": str(data), "seq_len": 48, "num_epochs": 0},
                    "optim": {"lr": 1e-3, "warmup_steps": 2}}],
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    """Environment for workers: CPU, and a persistent compilation cache shared by every run (one compile)."""
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _hook(args: argparse.Namespace) -> Any:
    def hook(step: int, metrics: dict[str, float]) -> None:
        if step == args.sigkill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == args.fsize_at:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return hook


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--sigkill-at", type=int, default=-1)
    p.add_argument("--sigterm-at", type=int, default=-1)
    p.add_argument("--fsize-at", type=int, default=-1)
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from flax import nnx

    from mamba_llama_jax.config import TrainConfig, load_config
    from mamba_llama_jax.errors import MambaLlamaError, Preempted
    from mamba_llama_jax.train import trainer

    fit, hook = trainer.fit, _hook(args)
    trainer.fit = lambda *a, callbacks=(), **k: fit(*a, callbacks=[*callbacks, hook], **k)
    cfg = load_config(TrainConfig, args.recipe)
    try:
        student = trainer.run_recipe(args.recipe, progress=False, config=cfg)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return 143
    except MambaLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = nnx.state(student, nnx.Param)
    flat = trainer.Flattener(st).flat(st)
    out = Path(cfg.output_dir)
    tmp = out / "final.tmp.npz"
    np.savez(tmp, **{k.replace("/", "."): np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, out / "final.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
