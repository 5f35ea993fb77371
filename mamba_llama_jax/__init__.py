"""mamba_llama_jax: distil Llama-family transformers into Mamba-attention hybrids, in JAX/Flax."""

__version__ = "0.1.0"
