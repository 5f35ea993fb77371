"""One process of the 2-process CPU test (test_multihost.py): joins the run through
`mesh.initialize_distributed`, trains the tiny hybrid a few steps with `trainer.fit` on a mesh spanning both
processes (each feeding its own shard of the data), and saves the final trainable parameters as npz.

argv: process_id num_processes port out_dir  (num_processes 1 and port 0: a plain single-process run)"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # one CPU device per process
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

from mamba_llama_jax.train import mesh as mesh_lib  # noqa: E402

if nproc > 1:
    mesh_lib.initialize_distributed(f"127.0.0.1:{port}", nproc, pid)

import tiny  # noqa: E402
from mamba_llama_jax.config import CheckpointConfig, DataConfig, OptimConfig  # noqa: E402
from mamba_llama_jax.data import pipeline  # noqa: E402
from mamba_llama_jax.train import trainer  # noqa: E402

assert jax.process_count() == nproc and jax.device_count() == nproc, (jax.process_count(), jax.device_count())
t = tiny.teacher(scale=3.0)
h = tiny.hybrid(t)
st = tiny.stage(steps=3, batch_size=4, optim=OptimConfig(lr=3e-3, eps=1e-6),
                data=DataConfig(source="-", kind="tokens", seq_len=32, num_epochs=0, pack=False))
data = pipeline.build_dataset(tiny.token_examples(), tiny.PadTok(), st.data, batch_size=st.batch_size,
                              shard_index=jax.process_index(), shard_count=jax.process_count())
res = trainer.fit(st, h, t, data, out_dir=os.path.join(out, "run"), mesh=mesh_lib.make_mesh(), log_every=1,
                  progress=False, checkpoint=CheckpointConfig(every=1000, async_save=False))
from flax import nnx  # noqa: E402

params = {"/".join(map(str, k)): np.asarray(v.get_value().addressable_data(0))
          for k, v in nnx.to_flat_state(nnx.state(h, nnx.Param))}
np.savez(os.path.join(out, f"params-{pid}.npz"), **params)
print("LOSSES", [r["loss"] for r in res.metrics], flush=True)
