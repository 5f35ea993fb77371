"""Training stages as objectives over one step function (`train/trainer.py`).

An objective is two pure functions of a model and a batch:
- `reference(teacher, batch)`: what the frozen model contributes (teacher logits, reference log-probs, teacher
  layer activations); run outside `value_and_grad`, so the teacher costs a forward pass and no optimizer state;
- `loss(student, batch, ref, loss_cfg)`: the scalar to differentiate and a dict of metrics.

Stages of the recipes, as `StageConfig(objective=..., train=...)`:
- layer-wise distillation (official first stage): distill, train 'mamba', CE (token mean) + 0.1·KL (batchmean),
  computed by the fused chunked loss (`losses.fused_distill_loss`: no [B, L, V] logits are materialised);
- end-to-end distillation: distill, train 'all', ce_weight 0, kl_weight 1;
- SFT: distill, train 'all', CE + KL;
- DPO: dpo against a frozen copy of the student at the stage's start (the "teacher" slot holds it);
- MOHAWK matrix orientation: orient, train 'mamba' — each Mamba2 mixer's materialised SSD matrix matches the
  teacher attention's softmax matrix on the teacher's own input of that layer (`train/mohawk.py`);
- MOHAWK hidden-state alignment: hidden, train 'mamba' — each Mamba mixer, fed the teacher's own normalised
  input of that layer, matches the teacher attention's output (all layers at once, independently);
- progressive conversion / stepwise: consecutive stages whose `hybrid` layouts have fewer attention layers
  (25 % Mamba → 50 % → ..., or one layer at a time); `run_recipe` converts the new layers from the previous
  stage's attention weights.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_llama_jax.config import LossConfig
from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.models.llama import Attention, Context, DecoderLM, _segment_positions, rope_tables
from mamba_llama_jax.train import losses, mohawk

Batch = dict[str, jax.Array]


def trainable_filter(model: DecoderLM, train: str) -> Callable[[tuple[Any, ...], Any], bool]:
    """An nnx filter: True for parameters that train. 'mamba': parameters inside a non-attention mixer (the
    official layer-wise stage freezes attention, MLPs, norms and embeddings); 'all': every parameter."""
    if train == "all":
        return lambda path, x: isinstance(x, nnx.Param)
    if train != "mamba":
        raise ConfigError(f"train must be 'mamba' or 'all', got {train!r}")
    mamba = {i for i, layer in enumerate(model.layers) if not isinstance(layer.mixer, Attention)}
    if not mamba:
        raise ConfigError("train='mamba' on a model without Mamba layers: nothing would train")

    def filt(path: tuple[Any, ...], x: Any) -> bool:
        return (isinstance(x, nnx.Param) and len(path) > 2 and path[0] == "layers" and path[1] in mamba
                and path[2] == "mixer")
    return filt


def context(model: DecoderLM, tokens: jax.Array, token_mask: jax.Array,
            segment_ids: jax.Array | None) -> Context:
    """The per-forward context of a full-sequence (training) call, as `DecoderLM.hidden` builds it."""
    if segment_ids is not None:
        positions = _segment_positions(segment_ids)
    else:
        positions = jnp.maximum(jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0)
    cos, sin = rope_tables(positions, model._inv_freq)
    return Context(positions, token_mask, segment_ids, cos, sin)


def _inputs(batch: Batch, prefix: str = "") -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    tokens, seg = batch[prefix + "tokens"], batch[prefix + "segment_ids"]
    return tokens, seg > 0, seg, batch[prefix + "loss_mask"]


def _logits(model: DecoderLM, tokens: jax.Array, mask: jax.Array, seg: jax.Array) -> jax.Array:
    logits, _ = model(tokens, token_mask=mask, segment_ids=seg)
    return logits


# ----------------------------------------------------------------------------------------------- distillation


def head_matrix(model: DecoderLM) -> jax.Array:
    """The LM head as a (D, V) matrix in the compute dtype (a tied embedding transposed): logits = h @ head."""
    dt = jnp.dtype(model.cfg.dtype)
    if model.lm_head is None:
        return model.embed_tokens.embedding[...].astype(dt).T
    return model.lm_head.kernel[...].astype(dt)


def _aligned_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """`losses.shift_targets` padded back to length L (the last position predicts nothing: masked), so that
    targets line up with the hidden states of every position."""
    tokens, _, seg, loss_mask = _inputs(batch)
    targets, tmask = losses.shift_targets(tokens, loss_mask, seg)
    return jnp.pad(targets, ((0, 0), (0, 1))), jnp.pad(tmask, ((0, 0), (0, 1)))


def distill_reference(teacher: DecoderLM, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The teacher's final hidden states (B, L, D) and head matrix: its logits are formed chunk by chunk inside
    the fused loss, never as a whole [B, L, V] array."""
    tokens, mask, seg, _ = _inputs(batch)
    h, _ = teacher.hidden(tokens, token_mask=mask, segment_ids=seg)
    return h, head_matrix(teacher)


def distill_loss(student: DecoderLM, batch: Batch, ref: tuple[jax.Array, jax.Array],
                 cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ce_weight·CE + kl_weight·KL(teacher ‖ student) through `losses.fused_distill_loss` (equal to the
    materialised `distill_loss_full`; tests pin it)."""
    tokens, mask, seg, _ = _inputs(batch)
    h, _ = student.hidden(tokens, token_mask=mask, segment_ids=seg)
    targets, tmask = _aligned_targets(batch)
    h_t, w_t = ref
    return losses.fused_distill_loss(h, head_matrix(student), h_t, w_t, targets, tmask, ce_weight=cfg.ce_weight,
                                     kl_weight=cfg.kl_weight, temperature=cfg.temperature,
                                     ce_normalization=cfg.ce_normalization, kl_normalization=cfg.kl_normalization)


def distill_reference_full(teacher: DecoderLM, batch: Batch) -> jax.Array:
    """The plain path: the teacher's whole fp32 logits (B, L-1, V). The reference for the fused objective and the
    baseline of benchmarks/bench_train.py; not used by training."""
    tokens, mask, seg, _ = _inputs(batch)
    return _logits(teacher, tokens, mask, seg)[:, :-1]


def distill_loss_full(student: DecoderLM, batch: Batch, ref: jax.Array,
                      cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    tokens, mask, seg, loss_mask = _inputs(batch)
    logits = _logits(student, tokens, mask, seg)[:, :-1]
    targets, tmask = losses.shift_targets(tokens, loss_mask, seg)
    loss, parts = losses.distill_loss(ref, logits, targets, tmask, ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight,
                                      temperature=cfg.temperature, ce_normalization=cfg.ce_normalization,
                                      kl_normalization=cfg.kl_normalization)
    # Per-token KL at T = 1 whatever the weights, so that runs with different recipes compare.
    parts["kl_token"] = losses.kl_loss(ref, logits, tmask, normalization="token_mean")
    parts["agree"] = losses.top1_agreement(ref, logits, tmask)
    return loss, parts


# -------------------------------------------------------------------------------------------------------- DPO


def _pair_logps(model: DecoderLM, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) sequence log-probs, both halves in one forward pass of 2B rows."""
    cat = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]], axis=0)
           for k in ("tokens", "loss_mask", "segment_ids")}
    tokens, mask, seg, loss_mask = _inputs(cat)
    logits = _logits(model, tokens, mask, seg)[:, :-1]
    targets, tmask = losses.shift_targets(tokens, loss_mask, seg)
    lp = losses.sequence_logprobs(logits, targets, tmask)
    b = batch["chosen_tokens"].shape[0]
    return lp[:b], lp[b:]


def dpo_reference(reference: DecoderLM, batch: Batch) -> tuple[jax.Array, jax.Array]:
    return _pair_logps(reference, batch)


def dpo_loss(student: DecoderLM, batch: Batch, ref: tuple[jax.Array, jax.Array],
             cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    pc, pr = _pair_logps(student, batch)
    return losses.dpo_loss(pc, pr, ref[0], ref[1], beta=cfg.dpo_beta)


# ------------------------------------------------------------------------------- MOHAWK hidden-state alignment


def layer_io(model: DecoderLM, batch: Batch) -> tuple[list[jax.Array], list[jax.Array]]:
    """For every layer: its mixer's input (after input_layernorm) and its mixer's output, full sequence."""
    tokens, mask, seg, _ = _inputs(batch)
    ctx = context(model, tokens, mask, seg)
    x = model.embed_tokens(tokens)
    ins, outs = [], []
    for layer in model.layers:
        h = layer.input_layernorm(x)
        y, _ = layer.mixer(h, ctx, None)
        ins.append(h)
        outs.append(y)
        x = x + y
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return ins, outs


def hidden_reference(teacher: DecoderLM, batch: Batch) -> tuple[list[jax.Array], list[jax.Array]]:
    return layer_io(teacher, batch)


def hidden_loss(student: DecoderLM, batch: Batch, ref: tuple[list[jax.Array], list[jax.Array]],
                cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over the student's Mamba layers of the masked MSE between its mixer output on the teacher's layer
    input and the teacher attention's output there (layers trained independently, as in MOHAWK stage 2)."""
    del cfg
    tokens, mask, seg, _ = _inputs(batch)
    ctx = context(student, tokens, mask, seg)
    ins, outs = ref
    terms = []
    for i, layer in enumerate(student.layers):
        if isinstance(layer.mixer, Attention):
            continue
        y, _ = layer.mixer(ins[i], ctx, None)
        terms.append(losses.hidden_mse(y, outs[i], mask))
    if not terms:
        raise ConfigError("objective 'hidden' needs a student with Mamba layers")
    loss = jnp.mean(jnp.stack(terms))
    return loss, {"hidden_mse": loss}


OBJECTIVES: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "distill": (distill_reference, distill_loss),
    "dpo": (dpo_reference, dpo_loss),
    "hidden": (hidden_reference, hidden_loss),
    "orient": (mohawk.orient_reference, mohawk.orient_loss),
}


def objective(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


# Objectives that pair student layer i with teacher layer i; the others compare logits (or log-probs) only.
PER_LAYER = ("hidden", "orient")


def check_depths(name: str, student_layers: int, teacher_layers: int) -> None:
    """Refuses, before anything compiles, a per-layer objective between models of different depths (a shallow
    student built with keep_layers): its layer i would be matched with an unrelated teacher layer i."""
    if name in PER_LAYER and student_layers != teacher_layers:
        raise ConfigError(f"objective {name!r} matches each student layer with the teacher layer of the same index, "
                          f"but the student has {student_layers} layers and the teacher {teacher_layers} (a "
                          "shallow student, keep_layers?): train it with objective 'distill', which compares "
                          "logits only")


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens that the step really computes on (not padding), for tokens/s."""
    return int(sum((v > 0).sum() for k, v in batch.items() if k.endswith("segment_ids")))
