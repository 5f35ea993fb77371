"""Helpers shared by the model tests."""

import functools

import jax
from flax import nnx


def jitted(model):
    """model(tokens, **kw) under one jax.jit (nnx.split/merge): one compile per shape, not one per primitive, and
    repeated decode steps compile once."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("prefill",))
    def run(state, tokens, cache=None, token_mask=None, segment_ids=None, prefill=False):
        return nnx.merge(graphdef, state)(tokens, cache=cache, token_mask=token_mask, segment_ids=segment_ids,
                                          prefill=prefill)

    return lambda tokens, **kw: run(state, tokens, **kw)
