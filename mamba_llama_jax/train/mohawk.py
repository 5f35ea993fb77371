"""MOHAWK matrix orientation (Bick et al., 2024, stage 1): each Mamba layer's mixing matrix is matched to the
attention matrix of the teacher layer it replaced, on the same input.

Both mixers are linear maps over time once their input-dependent coefficients are fixed: attention's output is
P·V with P = softmax(QKᵀ/√d) (causal, per head), and a Mamba2 head's SSD output is M·x + D·x with

    M_ij = (C_i · B_j) · exp(Σ_{j<k≤i} dt_k·A) · dt_j        (i ≥ j, same document; 0 elsewhere)

i.e. L ∘ (C Bᵀ) with the source position's step size folded in (the SSD feeds x·dt), so M acts on x exactly as P
acts on V — and the attention initialisation maps V → x, K → B, Q → C head by head. Orientation trains B, C, dt
and the conv (everything M depends on) so that M ≈ P before the layers' outputs are aligned (`hidden`).

Per layer the loss is Σ (M − P)² over the valid entries (causal, same document, real tokens) divided by
heads × real query positions: the squared distance between matching rows, averaged. The objective's total is the
mean over the student's Mamba layers; each layer sees the teacher's own normalised input of that layer, so the
layers train independently (only the Mamba parameters train: `train: mamba`).

Memory: one (B, heads, L, L) fp32 matrix per model per layer at a time, so this stage runs at short lengths
(the recipe uses 512). GQA: query head h reads KV head h // (heads / kv_heads), as HF's repeat_kv orders them
and as the Mamba B heads are repeated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mamba_llama_jax.config import LossConfig
from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.models.llama import NEG_INF, Attention, Context, DecoderLM, apply_rope, chunk_mask
from mamba_llama_jax.models.mamba import Mamba2, causal_conv
from mamba_llama_jax.ops.ssd import _segsum

F32 = jnp.float32
Batch = dict[str, jax.Array]


def valid_pairs(ctx: Context) -> jax.Array:
    """(B, L, L) bool: query i may read key j — causal, same document, both real tokens."""
    return chunk_mask(ctx) & ctx.token_mask.astype(bool)[:, :, None]


def rotated_qk(attn: Attention, h: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array]:
    """The attention's RoPE-rotated queries (B, L, H, d) and keys (B, L, KV, d) for input h."""
    b, t, _ = h.shape
    q = attn.q_proj(h).reshape(b, t, attn.num_heads, attn.head_dim)
    k = attn.k_proj(h).reshape(b, t, attn.num_kv_heads, attn.head_dim)
    return apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)


def attention_matrix(q: jax.Array, k: jax.Array, ctx: Context) -> jax.Array:
    """softmax(QKᵀ/√d) per head, (B, H, L, L) fp32, zero outside `valid_pairs` (as `llama.attend` computes it)."""
    rep = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, rep, axis=2)  # [kv0, kv0, ..., kv1, ...]: head h reads KV head h // rep
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=F32) / math.sqrt(q.shape[-1])
    valid = valid_pairs(ctx)[:, None]
    probs = jax.nn.softmax(jnp.where(chunk_mask(ctx)[:, None], scores, NEG_INF), axis=-1)
    return jnp.where(valid, probs, 0.0)


def mamba2_matrix(mixer: Mamba2, h: jax.Array, ctx: Context) -> jax.Array:
    """The mixer's SSD matrix M (B, H, L, L) fp32 on input h (module docstring), zero outside `valid_pairs`."""
    _, xbc, dt = mixer._project(h, ctx)  # dt: softplus'd, fp32, zero at padding
    bias = None if mixer.conv1d.bias is None else mixer.conv1d.bias[...]
    conv = causal_conv(xbc, mixer.conv1d.weight[...], bias, None, ctx.segment_ids)
    _, B, C = mixer._heads(jax.nn.silu(conv).astype(xbc.dtype))
    A = -jnp.exp(mixer.A_log[...].astype(F32))
    dth = jnp.moveaxis(dt, 1, 2)  # (B, H, L)
    decay = jnp.exp(_segsum(dth * A[None, :, None]))  # (B, H, L, L): exp(Σ_{j<k≤i} dt_k A), 0 above the diagonal
    cb = jnp.einsum("bihn,bjhn->bhij", C.astype(F32), B.astype(F32))
    return jnp.where(valid_pairs(ctx)[:, None], cb * decay * dth[:, :, None, :], 0.0)


def orient_reference(teacher: DecoderLM, batch: Batch) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
    """For every teacher layer: its mixer input (after input_layernorm) and its rotated queries and keys. The
    attention matrices themselves are formed layer by layer inside the loss (one at a time, not all held)."""
    from mamba_llama_jax.train.stages import _inputs, context

    tokens, mask, seg, _ = _inputs(batch)
    ctx = context(teacher, tokens, mask, seg)
    x = teacher.embed_tokens(tokens)
    ins, qs, ks = [], [], []
    for layer in teacher.layers:
        h = layer.input_layernorm(x)
        if not isinstance(layer.mixer, Attention):
            raise ConfigError("objective 'orient' needs an all-attention teacher")
        q, k = rotated_qk(layer.mixer, h, ctx)
        y, _ = layer.mixer(h, ctx, None)
        ins.append(h)
        qs.append(q)
        ks.append(k)
        x = x + y
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return ins, qs, ks


def orient_loss(student: DecoderLM, batch: Batch, ref: tuple[list[jax.Array], list[jax.Array], list[jax.Array]],
                cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over the student's Mamba layers of Σ(M − P)² / (heads × real queries) (module docstring)."""
    del cfg
    from mamba_llama_jax.train.stages import _inputs, context

    tokens, mask, seg, _ = _inputs(batch)
    ctx = context(student, tokens, mask, seg)
    ins, qs, ks = ref
    terms = []
    for i, layer in enumerate(student.layers):
        if isinstance(layer.mixer, Attention):
            continue
        if not isinstance(layer.mixer, Mamba2):
            raise ConfigError("objective 'orient' materialises the SSD matrix of Mamba2 mixers; this student has "
                              f"a {type(layer.mixer).__name__} in layer {i} (use hybrid.mamba.variant: mamba2)")
        m = mamba2_matrix(layer.mixer, ins[i], ctx)
        p = attention_matrix(qs[i], ks[i], ctx)
        rows = jnp.maximum(jnp.sum(mask.astype(F32)), 1.0) * m.shape[1]
        terms.append(jnp.sum((m - p) ** 2) / rows)
    if not terms:
        raise ConfigError("objective 'orient' needs a student with Mamba layers")
    loss = jnp.mean(jnp.stack(terms))
    return loss, {"orient": loss}
