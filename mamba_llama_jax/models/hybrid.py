"""HybridLM: a Llama decoder whose layers each hold attention (with a KV cache) or a Mamba mixer (with a
constant-size conv + ssm state), sharing the teacher's embeddings, norms and MLPs.

It is a `DecoderLM`, so generation, chat and the CLI run on it unchanged: `init_cache` allocates a `KVCache` for
attention layers and a `MambaCache` for Mamba layers inside one `DecodeState`.
"""

from __future__ import annotations

from flax import nnx

from mamba_llama_jax.config import HybridConfig, LlamaConfig
from mamba_llama_jax.models.llama import Attention, DecoderLM
from mamba_llama_jax.models.mamba import make_mixer


class HybridLM(DecoderLM):
    """`rngs` initialises embeddings, attention and MLPs (None: zeros, to be filled by a converter);
    `mamba_rngs` (default: `rngs`) the Mamba mixers, which get the official fresh init."""

    def __init__(self, cfg: LlamaConfig, hybrid: HybridConfig, *, rngs: nnx.Rngs | None = None,
                 mamba_rngs: nnx.Rngs | None = None):
        attn = set(hybrid.layers_for(cfg.num_layers))
        mrngs = rngs if mamba_rngs is None else mamba_rngs
        mixers = [Attention(cfg, rngs=rngs) if i in attn else make_mixer(cfg, hybrid.mamba, rngs=mrngs)
                  for i in range(cfg.num_layers)]
        super().__init__(cfg, mixers, rngs=rngs)
        self.hybrid = hybrid
        self.attn_layers = tuple(sorted(attn))
        self.mamba_layers = tuple(i for i in range(cfg.num_layers) if i not in attn)
