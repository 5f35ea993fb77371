"""Subprocess worker for the sharded-step test (needs 8 fake CPU devices, set before jax is imported): runs two
steps of the tiny distillation step on one device and on meshes (8,1,1), (2,4,1), (2,2,2) and prints a JSON
report: max differences of loss and parameters, per-device shard sizes, and the collectives in the compiled step."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

import tiny  # noqa: E402
from mamba_llama_jax.config import LossConfig, OptimConfig  # noqa: E402
from mamba_llama_jax.data import pipeline  # noqa: E402
from mamba_llama_jax.train import mesh as mesh_lib  # noqa: E402
from mamba_llama_jax.train import trainer  # noqa: E402


def run(shape, devices, train):
    t = tiny.teacher()
    h = tiny.hybrid(t)
    st = tiny.stage(steps=2, batch_size=8, train=train, grad_accum=1,
                    optim=OptimConfig(lr=1e-3, eps=1e-6), loss=LossConfig(ce_weight=1.0, kl_weight=0.1))
    mesh = mesh_lib.make_mesh(shape, devices)
    # donated, as `fit` runs it: a trainable array that still shares a buffer with the teacher fails here
    step = trainer.build_step(st, h, t, mesh)
    tr, fr = step.student.trainable, step.student.frozen
    opt = trainer.init_opt_state(step)
    rng = jax.random.key_data(jax.random.key(0))
    teacher_p = {**step.teacher.trainable, **step.teacher.frozen}
    it = iter(pipeline.build_dataset(tiny.token_examples(), tiny.PadTok(), st.data, batch_size=8))
    losses = []
    compiled = None
    for _ in range(2):
        batch = mesh_lib.global_batch(next(it), mesh)
        if compiled is None:  # compile once and run the compiled step, so its HLO is the one that ran
            compiled = step.fn.lower(tr, opt, rng, fr, teacher_p, batch).compile()
        tr, opt, rng, m = compiled(tr, opt, rng, fr, teacher_p, batch)
        losses.append(float(m["loss"]))
    shards = {k: [tuple(v.shape), tuple(v.addressable_shards[0].data.shape)] for k, v in tr.items()}
    return losses, {k: np.asarray(v) for k, v in tr.items()}, shards, compiled.as_text()


def main():
    report = {}
    for train in sys.argv[1:] or ("all",):
        ref_loss, ref_p, _, _ = run((1, 1, 1), jax.devices()[:1], train)
        for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
            loss, p, shards, hlo = run(shape, None, train)
            report[f"{train}-{shape}"] = {
                "loss_diff": max(abs(a - b) for a, b in zip(loss, ref_loss)),
                "loss": loss,
                "param_diff": max(float(np.max(np.abs(p[k] - ref_p[k]))) for k in p),
                "split": sorted(k for k, (g, s) in shards.items() if np.prod(s) < np.prod(g)),
                "all_reduce": "all-reduce" in hlo,
                "all_gather": "all-gather" in hlo,
                "reduce_scatter": "reduce-scatter" in hlo,
            }
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
