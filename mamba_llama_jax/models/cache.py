"""Decode caches as plain pytrees: passed into every jitted step and returned, never hidden module state.

Slots are shared by the batch: every row writes its t-th new token to slot `index + t`. Rows of a left-padded
batch mark their padding slots invalid, and carry their own RoPE position, so prompts of different lengths share
one cache layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


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
    `Mamba*.multistep` returns one with an extra axis 1 of size k: the state after each prefix.
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
