"""A `DecoderLM` whose one layer copies its input (an exact induction "head"), so metrics have known answers.

Everything but the mixer is the real model: embeddings (identity), the decoder block (zero MLP), final norm and
tied LM head; `Scorer` and `Generator` run it through their production paths (split/merge, jit, caches, padding).

The mixer: at each position t, find the latest earlier position s whose preceding tokens match the longest
suffix (up to N_GRAM tokens) ending at t, and predict the token at s — what the input did after the same context
before. With a match the prediction gets logit ~52 (p ≈ 1); with none the output cancels the residual, so the
logits are all 0: exactly uniform, log p = -log V. Hence on text that repeats, ppl -> 1, with a closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_llama_jax.config import LlamaConfig
from mamba_llama_jax.models.llama import Context, DecoderLM

N_GRAM = 12
BIG = 1000.0
HEAD_SCALE = 3.0  # final norm weight: the predicted token's logit is HEAD_SCALE * sqrt(V)


class CopyMixer(nnx.Module):
    def __init__(self, vocab: int):
        self.vocab = vocab

    def init_cache(self, batch: int, slots: int) -> jax.Array:
        return jnp.zeros((batch, slots), jnp.int32)

    def __call__(self, x: jax.Array, ctx: Context, cache: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        b, t, _ = x.shape
        ids = jnp.argmax(x, axis=-1).astype(jnp.int32)
        if cache is None:
            hist, valid, q = ids, ctx.token_mask, jnp.arange(t)
            seg = ctx.segment_ids if ctx.segment_ids is not None else jnp.zeros((b, t), jnp.int32)
        else:
            cache = jax.lax.dynamic_update_slice(cache, ids, (0, ctx.index))
            hist, valid, q = cache, ctx.valid, ctx.index + jnp.arange(t)
            seg = jnp.zeros(hist.shape, jnp.int32)
        n = hist.shape[1]
        s = jnp.arange(n)

        def at(pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            """ids, valid, segment at positions pos (b-independent index array), invalid where pos < 0."""
            p = jnp.clip(pos, 0, n - 1)
            ok = (pos >= 0) & jnp.take(valid, p, axis=1)
            return jnp.take(hist, p, axis=1), ok, jnp.take(seg, p, axis=1)

        seg_q = at(q)[2]
        run = jnp.ones((b, t, n), bool)
        length = jnp.zeros((b, t, n), jnp.float32)
        for i in range(N_GRAM):
            qi, qok, qseg = at(q - i)
            si, sok, sseg = at(s - 1 - i)
            same = ((qi[:, :, None] == si[:, None, :]) & qok[:, :, None] & sok[:, None, :]
                    & (qseg[:, :, None] == seg_q[:, :, None]) & (sseg[:, None, :] == seg_q[:, :, None]))
            run = run & same
            length = length + run
        target_ok = (s[None, :] <= q[:, None])[None] & at(s)[1][:, None, :] & (at(s)[2][:, None, :] == seg_q[:, :, None])
        length = jnp.where(target_ok, length, 0.0)
        score = length * n + s[None, None, :]  # longest match first, then the latest
        best = jnp.argmax(jnp.where(length > 0, score, -1.0), axis=-1)
        matched = jnp.max(length, axis=-1) > 0
        pred = jnp.take_along_axis(jnp.broadcast_to(hist[:, None, :], (b, t, n)), best[..., None], axis=-1)[..., 0]
        cur = jax.nn.one_hot(ids, self.vocab, dtype=x.dtype)
        y = jnp.where(matched[..., None], BIG * jax.nn.one_hot(pred, self.vocab, dtype=x.dtype), 0.0) - cur
        return y, cache


def copy_model(vocab: int, max_len: int = 4096) -> DecoderLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=8, tie_word_embeddings=True, dtype="float32",
                      max_position_embeddings=max_len)
    model = DecoderLM(cfg, [CopyMixer(vocab)], rngs=nnx.Rngs(0))
    model.embed_tokens.embedding.set_value(jnp.eye(vocab, dtype=jnp.float32))
    mlp = model.layers[0].mlp
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        lin.kernel.set_value(jnp.zeros_like(lin.kernel[...]))
    model.norm.weight.set_value(jnp.full((vocab,), HEAD_SCALE, jnp.float32))
    return model
