"""`StageConfig.remat` recomputes layers in the backward pass without changing the gradients, and an abstract
model (`nnx.eval_shape`, no weights) goes through `build_step` and compiles: the path of
benchmarks/memory_llama3_8b.py, on the tiny model."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from mamba_llama_jax.errors import ConfigError  # noqa: E402
from mamba_llama_jax.models.hybrid import HybridLM  # noqa: E402
from mamba_llama_jax.models.llama import LlamaLM, rope_inv_freq  # noqa: E402
from mamba_llama_jax.train import mesh as mesh_lib  # noqa: E402
from mamba_llama_jax.train.trainer import build_step  # noqa: E402


@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow), "dots"])  # full: 25 s
def test_remat_keeps_gradients(policy):
    h = tiny.hybrid(tiny.teacher())
    tok = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 16)))
    loss = lambda m: jnp.mean(m(tok)[0] ** 2)

    def grads(model):  # under jit, as the trainer runs it: eagerly every op compiled on its own, twice (26 s)
        graphdef, state = nnx.split(model)  # `remat` is a static attribute: each graphdef traces its own program
        return jax.jit(jax.grad(lambda s: loss(nnx.merge(graphdef, s))))(state)

    g0 = grads(h)
    h.remat = policy
    g1 = grads(h)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_config_is_validated():
    with pytest.raises(ConfigError, match="remat"):
        tiny.stage(remat="some")


def test_abstract_models_compile_ahead_of_time():
    teacher = nnx.eval_shape(lambda: LlamaLM(tiny.CFG, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: HybridLM(tiny.CFG, tiny.HYB, rngs=nnx.Rngs(1)))
    for m in (teacher, student):
        m._inv_freq = rope_inv_freq(tiny.CFG.head_dim, tiny.CFG.rope_theta, tiny.CFG.rope_scaling)
    mesh = mesh_lib.make_mesh()
    step = build_step(tiny.stage(remat="full"), student, teacher, mesh)
    s, t = step.student, step.teacher
    assert all(isinstance(v, jax.ShapeDtypeStruct) and v.sharding is not None for v in s.trainable.values())
    opt = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                       jax.eval_shape(step.tx.init, s.trainable), step.opt_shardings)
    batch = {k: jax.ShapeDtypeStruct((4, 32), np.int32, sharding=mesh_lib.batch_sharding(mesh))
             for k in ("tokens", "loss_mask", "segment_ids")}
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=mesh_lib.replicated(mesh))
    compiled = step.fn.lower(s.trainable, opt, rng, s.frozen, {**t.trainable, **t.frozen}, batch).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
