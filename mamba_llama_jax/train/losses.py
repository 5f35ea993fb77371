"""Training losses: KL(teacher ‖ student) with temperature, cross-entropy, their weighted sum, DPO (sigmoid).

Every loss takes a mask and an explicit normalisation, because the official recipe mixes two:
- ``token_mean``: sum over unmasked positions / number of unmasked positions (a per-token average; CE's usual);
- ``sequence_sum``: sum over unmasked positions / batch rows. This is PyTorch's
  ``kl_div(..., reduction='batchmean')`` on [B, L, V] logits as the official layer-wise stage uses it: summed over
  positions and vocabulary, divided by B only, so per token it weighs ≈ L times a ``token_mean`` loss.

All arithmetic is fp32 whatever the logits' dtype. Logits at position t predict token t+1: callers pass aligned
(already shifted) arrays; `shift_targets` builds them from a packed batch.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from mamba_llama_jax.errors import ConfigError

Normalization = Literal["token_mean", "sequence_sum"]
NORMALIZATIONS = ("token_mean", "sequence_sum")
F32 = jnp.float32


def reduce_masked(per_token: jax.Array, mask: jax.Array, normalization: str) -> jax.Array:
    """Reduces a (B, L) per-position loss over the True positions of `mask` (B, L)."""
    m = mask.astype(F32)
    total = jnp.sum(per_token.astype(F32) * m)
    if normalization == "token_mean":
        return total / jnp.maximum(jnp.sum(m), 1.0)
    if normalization == "sequence_sum":
        return total / per_token.shape[0]
    raise ConfigError(f"unknown loss normalisation {normalization!r}; expected one of {list(NORMALIZATIONS)}")


def shift_targets(tokens: jax.Array, loss_mask: jax.Array,
                  segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Targets and mask for logits[:, :-1]: target t is token t+1, kept where `loss_mask` marks it and it belongs
    to the same document as position t (a packed row never predicts the next document's first token)."""
    targets = tokens[:, 1:]
    mask = loss_mask[:, 1:].astype(bool)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return targets, mask


def kl_per_token(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """KL(p_teacher ‖ p_student) at each position, (..., V) -> (...), both softened by `temperature`.

    Multiplied by T² (Hinton et al.) so that its gradients keep their size as T changes; at T = 1 this is the plain
    KL the official code uses.
    """
    t = jnp.asarray(temperature, F32)
    logp_t = jax.nn.log_softmax(teacher_logits.astype(F32) / t, axis=-1)
    logp_s = jax.nn.log_softmax(student_logits.astype(F32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    return kl * t * t


def kl_loss(teacher_logits: jax.Array, student_logits: jax.Array, mask: jax.Array, *, temperature: float = 1.0,
            normalization: str = "token_mean") -> jax.Array:
    """Masked KL(teacher ‖ student) over (B, L, V) logits, reduced by `normalization`."""
    return reduce_masked(kl_per_token(teacher_logits, student_logits, temperature), mask, normalization)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at each position, (B, L, V), (B, L) -> (B, L), fp32."""
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def ce_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
            normalization: str = "token_mean") -> jax.Array:
    """Masked next-token cross-entropy of aligned logits (B, L, V) and targets (B, L)."""
    return reduce_masked(-token_logprobs(logits, targets), mask, normalization)


def distill_loss(teacher_logits: jax.Array, student_logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
                 ce_weight: float = 0.0, kl_weight: float = 1.0, temperature: float = 1.0,
                 ce_normalization: str = "token_mean",
                 kl_normalization: str = "token_mean") -> tuple[jax.Array, dict[str, jax.Array]]:
    """ce_weight·CE + kl_weight·KL, each with its own normalisation; returns (loss, {'ce', 'kl'}).

    The official layer-wise stage is ce_weight=1 (token_mean) + kl_weight=0.1 (sequence_sum).
    """
    kl = kl_loss(teacher_logits, student_logits, mask, temperature=temperature, normalization=kl_normalization)
    ce = ce_loss(student_logits, targets, mask, normalization=ce_normalization)
    return ce_weight * ce + kl_weight * kl, {"ce": ce, "kl": kl}


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of log p(target) over the masked positions of each row: (B,) — a response's log-likelihood for DPO."""
    return jnp.sum(token_logprobs(logits, targets) * mask.astype(F32), axis=-1)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             *, beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO with the sigmoid loss (Rafailov et al.): mean over pairs of −log σ(β·[(π_c − r_c) − (π_r − r_r)]).

    Inputs are (B,) sequence log-probabilities of the chosen/rejected responses under the policy and a frozen
    reference (computed on the fly or precomputed). Also returns the implicit rewards and the preference accuracy.
    """
    chosen_reward = beta * (policy_chosen.astype(F32) - ref_chosen.astype(F32))
    rejected_reward = beta * (policy_rejected.astype(F32) - ref_rejected.astype(F32))
    margin = chosen_reward - rejected_reward
    loss = jnp.mean(-jax.nn.log_sigmoid(margin))
    return loss, {"chosen_reward": jnp.mean(chosen_reward), "rejected_reward": jnp.mean(rejected_reward),
                  "reward_accuracy": jnp.mean((margin > 0).astype(F32)), "margin": jnp.mean(margin)}


def hidden_mse(student: jax.Array, teacher: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked token-mean of the per-token mean squared difference of hidden states (B, L, D) (MOHAWK stage 2)."""
    d = student.astype(F32) - teacher.astype(F32)
    return reduce_masked(jnp.mean(d * d, axis=-1), mask, "token_mean")
