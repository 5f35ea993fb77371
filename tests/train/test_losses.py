"""Losses: hand-computed KL/CE values, the two normalisations, target shifting across packed documents, and a DPO
example whose loss and gradients are worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.train import losses


def test_kl_hand_value_and_temperature():
    t = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
    s = jnp.log(jnp.array([[[0.25, 0.5, 0.25]]]))
    want = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    np.testing.assert_allclose(losses.kl_per_token(t, s), [[want]], rtol=1e-6)
    np.testing.assert_allclose(losses.kl_per_token(t, t), [[0.0]], atol=1e-7)
    # T = 2 softens both distributions, then scales by T^2.
    pt, ps = jax.nn.softmax(t / 2), jax.nn.softmax(s / 2)
    want2 = 4 * float(jnp.sum(pt * (jnp.log(pt) - jnp.log(ps))))
    np.testing.assert_allclose(losses.kl_per_token(t, s, 2.0), [[want2]], rtol=1e-5)


def test_normalisations():
    per = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    # token_mean: (1+2+5+6+7)/5; sequence_sum (= torch batchmean over [B, L, V]): (1+2+5+6+7)/2
    np.testing.assert_allclose(losses.reduce_masked(per, mask, "token_mean"), 21 / 5)
    np.testing.assert_allclose(losses.reduce_masked(per, mask, "sequence_sum"), 21 / 2)
    np.testing.assert_allclose(losses.reduce_masked(per, jnp.zeros_like(mask), "token_mean"), 0.0)
    with pytest.raises(ConfigError, match="normalisation"):
        losses.reduce_masked(per, mask, "batchmean")


def test_batchmean_matches_torch_definition():
    """sequence_sum KL == sum over B, L, V of p_t (log p_t - log p_s) / B, the official `batchmean`."""
    k1, k2 = jax.random.split(jax.random.key(0))
    t, s = jax.random.normal(k1, (3, 5, 7)), jax.random.normal(k2, (3, 5, 7))
    lt, ls = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
    want = float(jnp.sum(jnp.exp(lt) * (lt - ls)) / 3)
    got = losses.kl_loss(t, s, jnp.ones((3, 5), bool), normalization="sequence_sum")
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ce_and_weighted_sum():
    logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5]]]))
    targets = jnp.array([[1, 0]])
    mask = jnp.array([[True, True]])
    ce = losses.ce_loss(logits, targets, mask)
    np.testing.assert_allclose(ce, (-math.log(0.75) - math.log(0.5)) / 2, rtol=1e-6)
    loss, parts = losses.distill_loss(logits, logits, targets, mask, ce_weight=1.0, kl_weight=0.1,
                                      kl_normalization="sequence_sum")
    np.testing.assert_allclose(loss, parts["ce"] + 0.1 * parts["kl"], rtol=1e-6)
    np.testing.assert_allclose(parts["kl"], 0.0, atol=1e-7)


def test_top1_agreement_counts_unmasked_tokens():
    t = jnp.asarray([[[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]])
    s = jnp.asarray([[[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 0.0, 4.0], [0.0, 9.0, 0.0]]])  # agree, no, agree, no
    assert float(losses.top1_agreement(t, s, jnp.ones((1, 4), bool))) == pytest.approx(0.5)
    assert float(losses.top1_agreement(t, s, jnp.asarray([[True, False, True, False]]))) == pytest.approx(1.0)
    assert jax.grad(lambda x: losses.top1_agreement(t, x, jnp.ones((1, 4), bool)))(s).sum() == 0  # a metric


def test_shift_targets_respects_documents():
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    loss_mask = jnp.array([[0, 1, 1, 0, 1, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    targets, mask = losses.shift_targets(tokens, loss_mask, seg)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0]])
    # predicting 8 (first token of document 2) from 7 is not allowed, nor padding
    np.testing.assert_array_equal(mask, [[True, True, False, True, False]])


def test_dpo_hand_example():
    beta = 0.5
    pc, pr, rc, rr = jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5])
    loss, m = losses.dpo_loss(pc, pr, rc, rr, beta=beta)
    margin = 0.5 * 0.5 - 0.5 * (-0.5)  # = 0.5
    np.testing.assert_allclose(loss, math.log1p(math.exp(-margin)), rtol=1e-6)  # -log sigmoid(0.5) = 0.474077
    np.testing.assert_allclose(m["reward_accuracy"], 1.0)
    np.testing.assert_allclose(m["chosen_reward"], 0.25, rtol=1e-6)
    g = jax.grad(lambda a, b: losses.dpo_loss(a, b, rc, rr, beta=beta)[0], argnums=(0, 1))(pc, pr)
    sig = 1 / (1 + math.exp(margin))  # sigma(-margin)
    np.testing.assert_allclose(g[0], [-beta * sig], rtol=1e-6)  # -0.188771
    np.testing.assert_allclose(g[1], [beta * sig], rtol=1e-6)


def test_dpo_through_sequence_logprobs():
    """Two-token vocab, logits chosen so that every probability is 1/4 or 3/4: log-probs by hand."""
    l3 = math.log(3.0)
    logits = jnp.array([[[0.0, l3], [l3, 0.0], [0.0, 0.0]]])  # p(1)=3/4, p(0)=3/4, uniform
    lp = losses.sequence_logprobs(logits, jnp.array([[1, 1, 0]]), jnp.array([[True, True, False]]))
    np.testing.assert_allclose(lp, [math.log(0.75) + math.log(0.25)], rtol=1e-6)
