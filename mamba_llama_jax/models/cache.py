"""Decode caches as plain pytrees: passed into every jitted step and returned, never hidden module state.

Slots are shared by the batch: every row writes its t-th new token to slot `index + t`. Rows of a left-padded
batch mark their padding slots invalid, and carry their own RoPE position, so prompts of different lengths share
one cache layout.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp

from mamba_llama_jax.ops import scan as scan_ops
from pallas_kernels import dispatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of one attention layer: (batch, slots, kv_heads, head_dim)."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def allocate(cls, batch: int, slots: int, kv_heads: int, head_dim: int, dtype: Any) -> "KVCache":
        shape = (batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything a decode step needs besides the parameters.

    layers: one cache per layer (KVCache for attention; the Mamba mixers add their own state types).
    index: () int32, the next slot to write.
    valid: (batch, slots) bool, slots that hold a real (non-padding) token.
    positions: (batch,) int32, the RoPE position the next real token of each row gets.
    """

    layers: tuple[Any, ...]
    index: jax.Array
    valid: jax.Array
    positions: jax.Array

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]


def empty_state(layers: tuple[Any, ...], batch: int, slots: int) -> DecodeState:
    """A DecodeState with nothing written yet."""
    return DecodeState(
        layers=layers,
        index=jnp.zeros((), jnp.int32),
        valid=jnp.zeros((batch, slots), bool),
        positions=jnp.zeros((batch,), jnp.int32),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MambaCache:
    """Decode state of one Mamba layer; its size does not grow with the context.

    conv: (batch, channels, d_conv) the last d_conv conv inputs, newest last (the official layout), compute dtype.
    ssm: fp32; Mamba2 (batch, heads, head_dim, d_state), Mamba1 (batch, d_inner, d_state).
    `prefix` picks from one with an extra axis 1 (a state per prefix); `Mamba*.multistep` returns a `MambaChunk`.
    """

    conv: jax.Array
    ssm: jax.Array

    @classmethod
    def allocate(cls, batch: int, channels: int, d_conv: int, ssm_shape: tuple[int, ...], dtype: Any) -> "MambaCache":
        return cls(jnp.zeros((batch, channels, d_conv), dtype), jnp.zeros((batch,) + tuple(ssm_shape), jnp.float32))

    def prefix(self, accepted: jax.Array) -> "MambaCache":
        """From a per-prefix cache (axis 1 = prefix), the state after `accepted` (b,) tokens (1-based, >= 1)."""
        idx = (accepted - 1).astype(jnp.int32)
        pick = lambda a: jnp.take_along_axis(a, idx.reshape((-1,) + (1,) * (a.ndim - 1)), axis=1)[:, 0]
        return MambaCache(pick(self.conv), pick(self.ssm))


def rolled_window(history: jax.Array, chunk: jax.Array, accepted: jax.Array) -> jax.Array:
    """The conv window (b, c, width) after the first accepted[r] (0..t) tokens of an all-real chunk (b, t, c):
    a slice of (old window ++ chunk), so rolling back costs a gather, not a recomputation."""
    b, c, width = history.shape
    full = jnp.concatenate([history, jnp.swapaxes(chunk, 1, 2).astype(history.dtype)], axis=2)  # (b, c, width + t)
    start = jnp.clip(accepted.astype(jnp.int32), 0, chunk.shape[1])
    idx = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None]  # (b, width)
    return jnp.take_along_axis(full, jnp.broadcast_to(idx[:, None, :], (b, c, width)), axis=2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MambaChunk:
    """A Mamba layer after a verify chunk of t real tokens, before acceptance (speculative decoding).

    It keeps the cache from before the chunk, the cache after all of it (`latest`: a draft goes on from there) and
    the chunk's inputs, never a state per token: `advance(n)` rebuilds the cache after n tokens from `before` (the
    multistep-verify op with `accepted`; the conv window is a slice of old window ++ chunk inputs). Algorithm 2 of
    "The Mamba in the Llama": the one cached state moves by the accepted count only.

    conv_in: (b, t, channels) the chunk's conv inputs, in the conv cache's dtype.
    x: ssm inputs after conv + SiLU, Mamba2 (b, t, h, p) / Mamba1 (b, t, d); dt: step sizes with softplus applied,
    (b, t, h) / (b, t, d) fp32; B: (b, t, groups, n); A: (h,) / (d, n) fp32, the layer's -exp(A_log).
    variant: "mamba2" or "mamba1" (static): which recurrence `advance` runs.
    """

    before: MambaCache
    latest: MambaCache
    conv_in: jax.Array
    x: jax.Array
    dt: jax.Array
    B: jax.Array
    A: jax.Array
    variant: str = dataclasses.field(default="mamba2", metadata=dict(static=True))

    @property
    def length(self) -> int:
        return self.conv_in.shape[1]

    def inputs(self) -> tuple[jax.Array, ...]:
        """The per-token arrays (conv_in, x, dt, B), time on axis 1: what a draft step hands to `extend`."""
        return self.conv_in, self.x, self.dt, self.B

    def extend(self, inputs: tuple[jax.Array, ...], latest: MambaCache) -> "MambaChunk":
        """This chunk followed by more tokens (their `inputs()`, time on axis 1) that ended in `latest`."""
        cat = [jnp.concatenate([a, b.astype(a.dtype)], axis=1) for a, b in zip(self.inputs(), inputs)]
        return MambaChunk(self.before, latest, *cat, self.A, self.variant)

    def advance(self, accepted: jax.Array) -> MambaCache:
        """The cache after the first accepted[r] (0..t) tokens of row r (0: `before` itself)."""
        acc = accepted.astype(jnp.int32)
        conv = rolled_window(self.before.conv, self.conv_in, acc)
        if self.variant == "mamba2":
            # y is not wanted here; C only feeds y, so B stands in for it
            _, ssm = dispatch.verify(self.before.ssm, self.x, self.dt, self.A, self.B, self.B, dt_softplus=False,
                                     accepted=acc)
        else:
            # dt = 0 past the accepted count is an exact no-op step (decay exp(0) = 1, input 0): the sequential
            # scan's final state is the accepted one, without stacking per-step states
            keep = jnp.arange(self.length, dtype=jnp.int32)[None, :] < acc[:, None]
            dt = jnp.where(keep[..., None], self.dt, 0.0)
            _, ssm = scan_ops.selective_scan(self.x, dt, self.A, self.B, self.B, delta_softplus=False,
                                             initial_state=self.before.ssm)
        return MambaCache(conv, ssm)

    def prefix(self, accepted: jax.Array) -> MambaCache:
        """`MambaCache.prefix`'s contract (the cache after accepted (b,) >= 1 tokens), for per-prefix callers."""
        return self.advance(accepted)


def advance_all(chunks: list[MambaChunk], accepted: jax.Array) -> list[MambaCache]:
    """`[c.advance(accepted) for c in chunks]`, with the Mamba2 layers of one shape advanced as one chunk: their
    heads (state, x, dt, B, A) and conv channels side by side, so one multistep-verify call and one conv-window
    gather for all of them (A is per head, so layers need nothing else of their own).

    A speculative round commits every Mamba layer of the target and of the draft; one call per layer is a launch
    per layer for a latency-bound step (a few microseconds each at batch 1). Each head's and channel's steps are
    the per-layer call's (the kernel and the reference are per head), so the states are the same."""
    out: list[MambaCache | None] = [None] * len(chunks)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(chunks):
        if c.variant == "mamba2":
            groups.setdefault(tuple((a.shape, a.dtype) for a in jax.tree.leaves(c)), []).append(i)
        else:
            out[i] = c.advance(accepted)
    for idx in groups.values():
        cs = [chunks[i] for i in idx]
        cat = lambda get, axis: jnp.concatenate([get(c) for c in cs], axis=axis)
        before = MambaCache(cat(lambda c: c.before.conv, 1), cat(lambda c: c.before.ssm, 1))
        # `advance` reads no `latest`; `before` fills the field
        merged = MambaChunk(before, before, cat(lambda c: c.conv_in, 2), cat(lambda c: c.x, 2),
                            cat(lambda c: c.dt, 2), cat(lambda c: c.B, 2), cat(lambda c: c.A, 0), "mamba2")
        done = merged.advance(accepted)
        convs = _split(done.conv, [c.before.conv.shape[1] for c in cs])
        for i, conv, ssm in zip(idx, convs, _split(done.ssm, [c.before.ssm.shape[1] for c in cs])):
            out[i] = MambaCache(conv, ssm)
    return out


def _split(a: jax.Array, sizes: list[int]) -> list[jax.Array]:
    """`a` cut on axis 1 into pieces of `sizes`."""
    return jnp.split(a, list(itertools.accumulate(sizes))[:-1], axis=1)
