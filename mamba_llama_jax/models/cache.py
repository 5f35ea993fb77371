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
