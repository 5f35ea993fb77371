"""Shared tiny models and data for the trainer tests and their subprocess workers (not a test module)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from mamba_llama_jax.config import (DataConfig, HybridConfig, LlamaConfig, LossConfig, MambaConfig, OptimConfig,
                                    StageConfig)
from mamba_llama_jax.convert.from_attention import build_hybrid
from mamba_llama_jax.models.llama import LlamaLM
from mamba_llama_jax.models.mamba import make_mixer

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  dtype="float32", max_position_embeddings=128)
HYB = HybridConfig(attn_fraction=0.5, mamba=MambaConfig(chunk_size=8))


def teacher(seed: int = 0, scale: float = 1.0) -> LlamaLM:
    """A random Llama; `scale` multiplies every matrix so that its predictions are peaked, not near-uniform."""
    t = LlamaLM(CFG, rngs=nnx.Rngs(seed))
    if scale != 1.0:
        st = nnx.state(t, nnx.Param)
        nnx.update(t, jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, st))
    return t


def hybrid(t: LlamaLM, seed: int = 1, random_mamba: bool = False, hyb: HybridConfig = HYB):
    h = build_hybrid(t, hyb, rngs=nnx.Rngs(seed))
    if random_mamba:  # the same layout with freshly initialised Mamba mixers (no attention weights)
        rngs = nnx.Rngs(seed + 7)
        for i in h.mamba_layers:
            h.layers[i].mixer = make_mixer(CFG, hyb.mamba, rngs=rngs)
    return h


def token_examples(n: int = 64, seed: int = 0, lo: int = 6, hi: int = 20) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi))
        toks = rng.integers(1, CFG.vocab_size, k).tolist()
        out.append({"tokens": toks, "loss_mask": [0] * 2 + [1] * (k - 2)})
    return out


def stage(**kw) -> StageConfig:
    base = dict(name="lw", data=DataConfig(source="-", kind="tokens", seq_len=32, num_epochs=0), steps=4,
                batch_size=4, optim=OptimConfig(lr=3e-3, warmup_steps=1),
                loss=LossConfig(ce_weight=1.0, kl_weight=0.1))
    base.update(kw)
    return StageConfig(**base)


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


class PadTok:
    pad_token_id = 0


def under_jit(fn, model):
    """fn(model, *args) as one compiled program, the model split into graph and state, as the trainer runs its
    teacher: eagerly each of the model's ops would compile on its own at every new batch shape."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, *args: fn(nnx.merge(graphdef, s), *args))
    return lambda *args: run(state, *args)
