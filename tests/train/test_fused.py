"""The fused chunked distillation loss equals the materialised one (loss, metrics, gradients of every trainable
parameter, head trained or frozen, chunks that do not divide the length), skips the head's weight gradient when the
head is frozen, and storing the teacher's matrices in the compute dtype changes nothing."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from mamba_llama_jax.config import LossConfig  # noqa: E402
from mamba_llama_jax.errors import ConfigError  # noqa: E402
from mamba_llama_jax.models.llama import LlamaLM  # noqa: E402
from mamba_llama_jax.train import losses, stages, trainer  # noqa: E402


def _batch(b=3, l=21, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, l), np.int32)
    seg[0, 9:] = 2
    seg[1, 15:] = 0  # padding
    return {"tokens": jnp.asarray(rng.integers(1, tiny.CFG.vocab_size, (b, l)), jnp.int32),
            "loss_mask": jnp.asarray(rng.integers(0, 2, (b, l)), jnp.int32), "segment_ids": jnp.asarray(seg)}


def _value_and_grads(model, teacher, batch, cfg, train, fns):
    ref_fn, loss_fn = fns
    graphdef, tr, rest = nnx.split(model, stages.trainable_filter(model, train), ...)
    ref = tiny.under_jit(ref_fn, teacher)(batch)
    f = lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, ref, cfg)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(tr)


@pytest.mark.parametrize("train,cfg", [
    ("mamba", LossConfig(ce_weight=1.0, kl_weight=0.1, kl_normalization="sequence_sum")),
    pytest.param("all", LossConfig(ce_weight=0.5, kl_weight=1.0, temperature=2.0, kl_normalization="token_mean"),
                 marks=pytest.mark.slow),  # 11 s
    ("all", LossConfig(ce_weight=0.0, kl_weight=1.0, ce_normalization="sequence_sum")),
], ids=["layerwise", "all-T2", "kl-only"])
def test_fused_objective_equals_materialised(train, cfg, monkeypatch):
    monkeypatch.setattr(losses, "LOGIT_CHUNK_TOKENS", 24)  # 8 positions per chunk: 3 chunks, the last padded
    t = tiny.teacher(scale=2.0)
    h = tiny.hybrid(t)
    batch = _batch()
    (lf, mf), gf = _value_and_grads(h, t, batch, cfg, train, stages.objective("distill"))
    (lr, mr), gr = _value_and_grads(h, t, batch, cfg, train,
                                    (stages.distill_reference_full, stages.distill_loss_full))
    np.testing.assert_allclose(lf, lr, rtol=1e-5)
    assert 0.0 < float(mr["agree"]) < 1.0  # the pair agrees on some tokens, not all: the comparison means something
    for k in ("ce", "kl", "kl_token", "agree"):
        np.testing.assert_allclose(mf[k], mr[k], rtol=1e-5, err_msg=k)
    leaves_f, leaves_r = jax.tree.leaves(gf), jax.tree.leaves(gr)
    assert len(leaves_f) == len(leaves_r) and leaves_f
    for a, b in zip(leaves_f, leaves_r):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-7)


def test_frozen_head_gets_no_weight_gradient():
    """symbolic zeros: with the head matrix not differentiated, no (D, V) product appears in the gradient."""
    k = jax.random.split(jax.random.key(0), 4)
    h_s, h_t = jax.random.normal(k[0], (2, 5, 8)), jax.random.normal(k[1], (2, 5, 8))
    w = jax.random.normal(k[2], (8, 13))
    tg = jax.random.randint(k[3], (2, 5), 0, 13)
    mask = jnp.ones((2, 5), bool)
    loss = lambda hs, ws: losses.fused_distill_loss(hs, ws, h_t, w, tg, mask, ce_weight=1.0)[0]

    def dv_products(jaxpr) -> int:  # (D, V)-shaped matrix products, nested jaxprs (scan bodies) included
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                n += sum(v.aval.shape == (8, 13) for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        n += dv_products(inner)
        return n
    frozen = jax.make_jaxpr(jax.grad(lambda hs: loss(hs, w)))(h_s)
    trained = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h_s, w)
    assert dv_products(frozen.jaxpr) == 0
    assert dv_products(trained.jaxpr) >= 1


def test_fused_loss_rejects_bad_inputs():
    h = jnp.zeros((1, 4, 8))
    with pytest.raises(ConfigError, match="must match"):
        losses.fused_distill_loss(h, jnp.zeros((8, 5)), h, jnp.zeros((8, 6)), jnp.zeros((1, 4), int),
                                  jnp.ones((1, 4), bool))
    with pytest.raises(ConfigError, match="normalisation"):
        losses.fused_distill_loss(h, jnp.zeros((8, 5)), h, jnp.zeros((8, 5)), jnp.zeros((1, 4), int),
                                  jnp.ones((1, 4), bool), kl_normalization="batchmean")


def test_teacher_matrices_in_compute_dtype_change_nothing():
    """A bf16-compute teacher: its kernels and embedding stored in bf16 give bit-identical reference outputs."""
    cfg = tiny.replace(tiny.CFG, dtype="bfloat16")
    t = LlamaLM(cfg, rngs=nnx.Rngs(0))
    s = trainer.split_model(t, "all", trainer.mesh_lib.make_mesh())
    cast = trainer.frozen_in_compute_dtype(s.trainable, jnp.bfloat16)
    assert cast["embed_tokens/embedding"].dtype == jnp.bfloat16
    assert cast["layers/0/mixer/q_proj/kernel"].dtype == jnp.bfloat16
    assert cast["layers/0/input_layernorm/weight"].dtype == jnp.float32  # used in fp32: kept
    batch = _batch()
    run = jax.jit(lambda p: stages.distill_reference(s.merge(p), batch))
    for a, b in zip(jax.tree.leaves(run(s.trainable)), jax.tree.leaves(run(cast))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
