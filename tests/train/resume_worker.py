"""Subprocess worker for the kill -9 resume test: trains the tiny hybrid for `steps` steps in `out` (resuming from
any checkpoint there), optionally SIGKILLing itself right after step `kill_at`, and saves the final parameters."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

import tiny  # noqa: E402
from mamba_llama_jax.config import CheckpointConfig  # noqa: E402
from mamba_llama_jax.data import pipeline  # noqa: E402
from mamba_llama_jax.train import trainer  # noqa: E402


def main(out: str, steps: int, kill_at: int) -> None:
    t = tiny.teacher()
    h = tiny.hybrid(t)
    st = tiny.stage(steps=steps, grad_accum=2)
    ds = pipeline.build_dataset(tiny.token_examples(), tiny.PadTok(), st.data, batch_size=st.batch_size)

    def killer(step: int, metrics: dict) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.fit(st, h, t, ds, out_dir=out, checkpoint=CheckpointConfig(every=2, keep=2, async_save=True),
                log_every=1, progress=False, callbacks=[killer])
    from flax import nnx
    flat = trainer.Flattener(nnx.state(h, nnx.Param))
    np.savez(Path(out) / "final.npz", **{k.replace("/", "."): np.asarray(v) for k, v in flat.flat(nnx.state(h, nnx.Param)).items()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
