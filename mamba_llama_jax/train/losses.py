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

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

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


def top1_agreement(teacher_logits: jax.Array, student_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """The share of unmasked tokens where the student's argmax is the teacher's (a metric, no gradient). When the
    teacher is a speculative target and the text its own greedy output, this is the draft's per-token agreement
    that `eval.acceptance` turns into acceptance."""
    same = (jnp.argmax(teacher_logits, axis=-1) == jnp.argmax(student_logits, axis=-1)).astype(F32)
    return jax.lax.stop_gradient(reduce_masked(same, mask, "token_mean"))


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


# ------------------------------------------------------------------------------ fused, chunked distillation loss
#
# `distill_loss` above takes logits: at SmolLM2's vocabulary (49,152) a batch of 8 x 2048 has fp32 logits of 3.2 GB
# per model, and the softmaxes, the KL and their gradients each make further copies of that size. The step is then
# bound by memory traffic over those tensors, not by matmuls. `fused_distill_loss` takes the final hidden states
# and the LM-head matrices instead and walks the sequence in chunks: per chunk it computes both models' logits
# (fp32 accumulation), the KL and CE, and at once the gradient of the loss with respect to the student's logits,
# which it immediately turns into the gradients of the student's hidden states and (only if it is trained) head
# matrix. No [B, L, V] array ever exists, nothing of the chunk is kept for the backward pass, and no logits are
# recomputed: the FLOPs are exactly those of the unfused step. `distill_loss` stays the reference it must equal.

LOGIT_CHUNK_TOKENS = 4096  # rows (batch x positions) of logits per chunk: 2 x 4096 x V fp32 live at a time


def _lse(a: jax.Array) -> jax.Array:
    m = jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True))
    return (m + jnp.log(jnp.sum(jnp.exp(a - m), axis=-1, keepdims=True)))[..., 0]


def _dot(a: jax.Array, b: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]]) -> jax.Array:
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32)


def _fused_chunks(h_s: jax.Array, w_s: jax.Array, h_t: jax.Array, w_t: jax.Array, targets: jax.Array,
                  wk: jax.Array, wc: jax.Array, valid: jax.Array, temperature: float, chunk: int,
                  need_dh: bool, need_dw: bool):
    """The chunk loop. h_*: (B, L, D) compute dtype, L a multiple of `chunk`; w_*: (D, V); targets, wk, wc, valid:
    (B, L). Returns (loss, sums (Σkl_T, Σce, Σkl_1, Σ[argmax agrees]) over `valid`, dh or None, dw or None)."""
    b, l, d = h_s.shape
    n = l // chunk
    t = float(temperature)
    to_chunks = lambda a: jnp.moveaxis(a.reshape((b, n, chunk) + a.shape[2:]), 1, 0)
    xs = tuple(map(to_chunks, (h_s, h_t, targets, wk, wc, valid.astype(F32))))

    def body(dw, inp):
        hs, ht, tg, k, c, v = inp
        ls = _dot(hs, w_s, ((2,), (0,)))  # (B, chunk, V) fp32
        lt = _dot(ht, w_t, ((2,), (0,)))
        logq = ls / t - _lse(ls / t)[..., None]
        logp = lt / t - _lse(lt / t)[..., None]
        p = jnp.exp(logp)
        kl = jnp.sum(p * (logp - logq), axis=-1) * (t * t)
        if t == 1.0:
            logq1, p1, kl1 = logq, p, kl
        else:
            logq1 = ls - _lse(ls)[..., None]
            logp1 = lt - _lse(lt)[..., None]
            p1 = jnp.exp(logp1)
            kl1 = jnp.sum(p1 * (logp1 - logq1), axis=-1)
        hot = jax.nn.one_hot(tg, ls.shape[-1], dtype=F32)
        ce = -jnp.sum(hot * logq1, axis=-1)
        loss = jnp.sum(k * kl + c * ce)
        agree = (jnp.argmax(ls, axis=-1) == jnp.argmax(lt, axis=-1)).astype(F32)
        sums = jnp.stack([jnp.sum(v * kl), jnp.sum(v * ce), jnp.sum(v * kl1), jnp.sum(v * agree)])
        dh = None
        if need_dh or need_dw:
            # d loss / d student logits: T·(q_T − p_T) per KL unit, softmax − onehot per CE unit.
            g = (k * t)[..., None] * (jnp.exp(logq) - p) + c[..., None] * (jnp.exp(logq1) - hot)
            g = g.astype(hs.dtype)  # the two matmuls below run in the compute dtype, accumulating in fp32
            if need_dh:
                dh = _dot(g, w_s, ((2,), (1,))).astype(hs.dtype)  # (B, chunk, D)
            if need_dw:
                dw = dw + _dot(hs, g, ((0, 1), (0, 1)))  # (D, V)
        return dw, (loss, sums, dh)

    dw0 = jnp.zeros(w_s.shape, F32) if need_dw else None
    dw, (loss, sums, dh) = jax.lax.scan(body, dw0, xs)
    if dh is not None:
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, l, d)
    return jnp.sum(loss), jnp.sum(sums, axis=0), dh, (None if dw is None else dw.astype(w_s.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _fused(h_s, w_s, h_t, w_t, targets, wk, wc, valid, temperature, chunk):
    loss, sums, _, _ = _fused_chunks(h_s, w_s, h_t, w_t, targets, wk, wc, valid, temperature, chunk, False, False)
    return loss, sums


def _fused_fwd(h_s, w_s, h_t, w_t, targets, wk, wc, valid, temperature, chunk):
    # symbolic_zeros: each argument says whether it is differentiated, so a frozen head gets no weight gradient.
    need_dh, need_dw = h_s.perturbed, w_s.perturbed
    args = [a.value for a in (h_s, w_s, h_t, w_t, targets, wk, wc, valid)]
    loss, sums, dh, dw = _fused_chunks(*args, temperature, chunk, need_dh, need_dw)
    return (loss, sums), (dh, dw)


def _fused_bwd(temperature, chunk, res, cts):
    dh, dw = res
    g = cts[0]  # the metric sums are returned under stop_gradient: their cotangents are zero
    if isinstance(g, SymbolicZero):
        return (None,) * 8
    scale = lambda a: None if a is None else (a.astype(F32) * g).astype(a.dtype)
    return (scale(dh), scale(dw)) + (None,) * 6


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def fused_distill_loss(h_student: jax.Array, w_student: jax.Array, h_teacher: jax.Array, w_teacher: jax.Array,
                       targets: jax.Array, mask: jax.Array, *, ce_weight: float = 0.0, kl_weight: float = 1.0,
                       temperature: float = 1.0, ce_normalization: str = "token_mean",
                       kl_normalization: str = "token_mean",
                       chunk_tokens: int = LOGIT_CHUNK_TOKENS) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`distill_loss` on logits = h @ w that are never materialised whole; returns (loss, {'ce', 'kl', 'kl_token',
    'agree'}).

    h_*: (B, L, D) final hidden states in the compute dtype; w_*: (D, V) LM-head matrices in the compute dtype
    (a tied embedding passes its transpose); targets, mask: (B, L) aligned with h (the position that predicts
    nothing, e.g. the last, is masked). 'kl_token' is the per-token KL at T = 1 whatever the weights, as the
    unfused objective reports it; 'agree' the share of tokens whose argmax the student shares (`top1_agreement`).
    Gradients flow to h_student and w_student only (the teacher's side is
    constant), in the compute dtype: the student-logit gradient is rounded to it for the two gradient matmuls,
    as the unfused backward's matmuls do with their bf16 operands.
    """
    b, l, d = h_student.shape
    if h_teacher.shape != h_student.shape or w_student.shape != w_teacher.shape or w_student.shape[0] != d:
        raise ConfigError(f"fused_distill_loss: hidden states {h_student.shape} / {h_teacher.shape} and head "
                         f"matrices {w_student.shape} / {w_teacher.shape} must match as (B, L, D) and (D, V)")
    for norm in (kl_normalization, ce_normalization):
        if norm not in NORMALIZATIONS:
            raise ConfigError(f"unknown loss normalisation {norm!r}; expected one of {list(NORMALIZATIONS)}")
    m = mask.astype(F32)
    count = jnp.maximum(jnp.sum(m), 1.0)
    # the two normalisations of `reduce_masked`: per unmasked token, or per batch row
    den = lambda norm: count if norm == "token_mean" else jnp.asarray(float(b), F32)
    dk, dc = den(kl_normalization), den(ce_normalization)
    chunk = max(1, min(l, chunk_tokens // max(b, 1)))
    pad = (-l) % chunk
    padl = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a
    wk, wc = kl_weight * m / dk, ce_weight * m / dc
    loss, sums = _fused(padl(h_student), w_student, padl(jax.lax.stop_gradient(h_teacher)),
                        jax.lax.stop_gradient(w_teacher), padl(targets.astype(jnp.int32)), padl(wk), padl(wc),
                        padl(m), float(temperature), int(chunk))
    sums = jax.lax.stop_gradient(sums)
    return loss, {"kl": sums[0] / dk, "ce": sums[1] / dc, "kl_token": sums[2] / count, "agree": sums[3] / count}
