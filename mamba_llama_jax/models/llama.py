"""Llama-family decoder in flax.nnx: RMSNorm, RoPE (plain / llama3 / linear scaling), GQA attention with a
preallocated KV cache, SwiGLU MLP, tied or untied LM head.

Parameters are stored in `param_dtype` (fp32 for training) and carry logical axis names (`out_sharding`, applied
by `train/mesh.py` rules); matmuls run in `dtype` (bf16 by default); norms, RoPE, softmax and logits in fp32.
Linear kernels are (in, out). `DecoderLM` is the body shared with the hybrid model: each layer holds a *mixer*
(attention here, Mamba in `models/mamba.py`) with the call signature `mixer(x, ctx, cache) -> (y, cache)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_llama_jax.config import LlamaConfig, RopeScaling
from mamba_llama_jax.models.cache import DecodeState, KVCache, empty_state
from mamba_llama_jax.ops.partials import row_scale
from mamba_llama_jax.train.mesh import constrain_batch

NEG_INF = -1e30  # finite, so a fully masked row (a padding query) gives no NaN


def param(rngs: nnx.Rngs | None, init: Any, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype: Any) -> nnx.Param:
    """A parameter with logical axis names; `rngs=None` allocates zeros (shapes only, weights loaded later)."""
    value = jnp.zeros(shape, dtype) if rngs is None else init(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _dt(name: str) -> Any:
    return jnp.dtype(name)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored (in, out) in param_dtype, applied in the compute dtype."""

    def __init__(self, din: int, dout: int, axes: tuple[str | None, str | None], *, dtype: str,
                 param_dtype: str, rngs: nnx.Rngs | None, use_bias: bool = False, std: float = 0.02):
        self.kernel = param(rngs, nnx.initializers.normal(std), (din, dout), axes, _dt(param_dtype))
        self.bias = param(rngs, nnx.initializers.zeros, (dout,), (axes[1],), _dt(param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = _dt(self.dtype)
        y = jnp.dot(x.astype(dt), self.kernel[...].astype(dt))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y


class Embed(nnx.Module):
    """Token embedding table (vocab, D); also the LM head when embeddings are tied."""

    def __init__(self, vocab: int, dim: int, *, dtype: str, param_dtype: str, rngs: nnx.Rngs | None):
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (vocab, dim), ("vocab", "embed"),
                               _dt(param_dtype))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(_dt(self.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype: str, param_dtype: str, axis_name: str = "embed"):
        self.weight = nnx.Param(jnp.ones((dim,), _dt(param_dtype)), out_sharding=(axis_name,), eager_sharding=False)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32) * row_scale(x, self.eps)[..., None]
        return (xf * self.weight[...].astype(jnp.float32)).astype(_dt(self.dtype))


# --------------------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies (head_dim/2,), with Llama 3.1's band-wise scaling or linear scaling applied."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv / scaling.factor).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape positions.shape + (head_dim/2,), fp32."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's rotate-half convention; x: (b, t, heads, d), cos/sin: (b, t, d/2)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# ------------------------------------------------------------------------------------------------------ context


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-call inputs every mixer may need; built once per forward inside the jitted function.

    positions: (b, t) RoPE positions. token_mask: (b, t) False at padding. segment_ids: (b, t) document ids of a
    packed batch (None: one document per row). cos/sin: RoPE tables. With a cache: `index` is the slot of the
    first new token, `valid` the cache's valid slots *after* this chunk is written; `prefill` (static) says the
    cache was empty, so attention only needs the chunk itself.
    """

    positions: jax.Array
    token_mask: jax.Array
    segment_ids: jax.Array | None
    cos: jax.Array
    sin: jax.Array
    index: jax.Array | None = None
    valid: jax.Array | None = None
    prefill: bool = False


# ---------------------------------------------------------------------------------------------------- attention


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q: (b,t,h,d); k,v: (b,s,kv,d); mask: (b,t,s) bool. Softmax in fp32."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def chunk_mask(ctx: Context) -> jax.Array:
    """(b, t, t) mask for attention within the chunk: causal, same document, real keys only."""
    t = ctx.positions.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    mask = causal & ctx.token_mask[:, None, :]
    if ctx.segment_ids is not None:
        mask = mask & (ctx.segment_ids[:, :, None] == ctx.segment_ids[:, None, :])
    return mask


def cache_mask(ctx: Context, slots: int) -> jax.Array:
    """(b, t, slots) mask for a chunk written at slots [index, index + t): valid slots up to each query's own."""
    t = ctx.positions.shape[1]
    slot = jnp.arange(slots, dtype=jnp.int32)[None, None, :]
    last = ctx.index + jnp.arange(t, dtype=jnp.int32)[None, :, None]
    return ctx.valid[:, None, :] & (slot <= last)


class Attention(nnx.Module):
    """Llama GQA self-attention; projection names follow HF (q_proj, k_proj, v_proj, o_proj)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "q_heads"), **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_heads * hd, d, ("q_heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.dtype = cfg.dtype

    def init_cache(self, batch: int, slots: int) -> KVCache:
        return KVCache.allocate(batch, slots, self.num_kv_heads, self.head_dim, _dt(self.dtype))

    def __call__(self, x: jax.Array, ctx: Context, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            start = (0, ctx.index, 0, 0)
            cache = KVCache(
                jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
            )
        if cache is None or ctx.prefill:
            out = attend(q, k, v, chunk_mask(ctx))
        else:
            out = attend(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), cache_mask(ctx, cache.k.shape[1]))
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, mixer: nnx.Module, *, rngs: nnx.Rngs | None):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mixer = mixer
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, ctx: Context, cache: Any, verify: bool = False) -> tuple[jax.Array, Any]:
        # Inference copies (`inference.generate.prepare_for_inference`) give the mixer and the MLP methods that
        # take the norm and the residual too: at a decode step they fold RMSNorm into the next projection and the
        # residual add into the previous one (fused small-batch kernels: fewer launches per layer).
        # A speculative verify chunk (k+1 tokens a row) goes the same way, its b·(k+1) tokens taken as rows.
        fold = hasattr(self.mixer, "decode_residual") and cache is not None and not ctx.prefill
        if fold and verify:
            x, cache = self.mixer.verify_residual(x, self.input_layernorm, ctx, cache)
        elif fold and x.shape[1] == 1:
            # an MLP that takes the norm itself may get its rows weighed by the o-projection (`WeighedRows`)
            nxt = self.post_attention_layernorm if hasattr(self.mlp, "norm_residual") else None
            x, cache = self.mixer.decode_residual(x, self.input_layernorm, ctx, cache, next_norm=nxt)
        else:
            h = self.input_layernorm(x)
            # Verification needs every prefix's recurrent state; attention needs nothing extra (its rollback is
            # a mask).
            if verify and hasattr(self.mixer, "multistep"):
                y, cache = self.mixer.multistep(h, ctx, cache)
            else:
                y, cache = self.mixer(h, ctx, cache)
            x = x + y
        if hasattr(self.mlp, "norm_residual"):
            return self.mlp.norm_residual(x, self.post_attention_layernorm), cache
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class DecoderLM(nnx.Module):
    """Embeddings, a stack of `Block`s with any mixers, final norm and LM head.

    Subclasses choose each layer's mixer. Call with a `DecodeState` to prefill or decode; without one for
    training. `prefill=True` promises that the cache is empty, so attention skips the (empty) cached part.
    """

    def __init__(self, cfg: LlamaConfig, mixers: list[nnx.Module], *, rngs: nnx.Rngs | None):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  rngs=rngs)
        self.layers = nnx.List([Block(cfg, m, rngs=rngs) for m in mixers])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            rngs=rngs)
        self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def init_cache(self, batch: int, slots: int) -> DecodeState:
        """Allocates an empty decode state for `batch` rows and `slots` positions."""
        return empty_state(tuple(layer.mixer.init_cache(batch, slots) for layer in self.layers), batch, slots)

    def hidden(self, tokens: jax.Array, *, token_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               cache: DecodeState | None = None, prefill: bool = False,
               verify: bool = False) -> tuple[jax.Array, DecodeState | None]:
        """Final-norm hidden states (b, t, D) and the advanced cache.

        `verify=True` (speculative verification; needs a cache, all tokens real, no segment ids): Mamba layers
        run `multistep`, so their entries of the returned cache hold the state after *every* prefix of the chunk
        (axis 1) — a pending state that `inference.speculative.Pending.commit` cuts to the accepted length.
        """
        b, t = tokens.shape
        mask = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
        if positions is None:
            start = jnp.zeros((b,), jnp.int32) if cache is None else cache.positions
            positions = start[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
            if segment_ids is not None:
                positions = _segment_positions(segment_ids)
        cos, sin = rope_tables(positions, self._inv_freq)
        index = valid = None
        if cache is not None:
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
        ctx = Context(positions, mask, segment_ids, cos, sin, index, valid, prefill)
        # Between layers the hidden states stay split over the batch axes when a mesh is in context (training):
        # with `embed` sharded over `fsdp` GSPMD would otherwise reshard activations rather than gather weights.
        x = constrain_batch(self.embed_tokens(tokens))
        new_layers = []
        remat = getattr(self, "remat", "none")
        for i, layer in enumerate(self.layers):
            if remat != "none" and cache is None:
                x, c = remat_layer(layer, x, ctx, remat), None
            else:
                x, c = layer(x, ctx, None if cache is None else cache.layers[i], verify)
            x = constrain_batch(x)
            new_layers.append(c)
        x = self.norm(x)
        if cache is not None:
            cache = DecodeState(tuple(new_layers), index + t, valid,
                                cache.positions + jnp.sum(mask, axis=1, dtype=jnp.int32))
        return x, cache

    def logits(self, h: jax.Array) -> jax.Array:
        """LM head on hidden states, fp32 logits."""
        dt = _dt(self.cfg.dtype)
        if self.lm_head is None:
            w = self.embed_tokens.embedding[...].astype(dt)
            return jnp.einsum("...d,vd->...v", h.astype(dt), w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...].astype(dt)
        return jnp.einsum("...d,dv->...v", h.astype(dt), w, preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, **kw: Any) -> tuple[jax.Array, DecodeState | None]:
        h, cache = self.hidden(tokens, **kw)
        return self.logits(h), cache


# Rematerialisation policies for training (`StageConfig.remat`; set as `DecoderLM.remat`): with 'full' the backward
# pass keeps only each layer's input and recomputes the rest, trading ~1/3 more FLOPs for activations that no
# longer grow with depth; 'dots' also keeps the matmul outputs (less recompute, more memory).
REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_layer(layer: Block, x: jax.Array, ctx: Context, policy: str) -> jax.Array:
    """One decoder layer (no cache) under `jax.checkpoint`; the context's arrays are closed over (no gradients)."""
    graphdef, state = nnx.split(layer)

    def f(state: Any, x: jax.Array) -> jax.Array:
        y, _ = nnx.merge(graphdef, state)(x, ctx, None)
        return y
    return jax.checkpoint(f, policy=REMAT[policy])(state, x)


def _segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 where a new document of a packed row begins."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first


class LlamaLM(DecoderLM):
    """The teacher: every layer is attention. `rngs=None` builds zero weights to be filled by a converter."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None = None):
        super().__init__(cfg, [Attention(cfg, rngs=rngs) for _ in range(cfg.num_layers)], rngs=rngs)
