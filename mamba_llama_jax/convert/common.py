"""The one place where checkpoint tensors become model parameters.

Every converter (GGUF, HF safetensors, MambaInLlama) first yields tensors under HF Llama names in HF orientation
(Linear weights (out, in), Q/K rows in HF's rotate-half order); `llama_params` maps them onto the nnx state of
`LlamaLM` (kernels (in, out)), checking every shape, and `build_llama` fills a model with them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_llama_jax.config import LlamaConfig
from mamba_llama_jax.errors import ModelFormatError
from mamba_llama_jax.models.llama import LlamaLM

GetTensor = Callable[[str], np.ndarray]

LAYER_LINEARS = {
    # HF name under model.layers.{i}. -> (path in the nnx layer, (out, in) shape as a function of cfg)
    "self_attn.q_proj.weight": (("mixer", "q_proj"), lambda c: (c.num_heads * c.head_dim, c.hidden_size)),
    "self_attn.k_proj.weight": (("mixer", "k_proj"), lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size)),
    "self_attn.v_proj.weight": (("mixer", "v_proj"), lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size)),
    "self_attn.o_proj.weight": (("mixer", "o_proj"), lambda c: (c.hidden_size, c.num_heads * c.head_dim)),
    "mlp.gate_proj.weight": (("mlp", "gate_proj"), lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp.up_proj.weight": (("mlp", "up_proj"), lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp.down_proj.weight": (("mlp", "down_proj"), lambda c: (c.hidden_size, c.intermediate_size)),
}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def _fetch(get: GetTensor, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    try:
        t = get(name)
    except KeyError:
        raise ModelFormatError(f"{source}: tensor {name!r} is missing") from None
    if tuple(t.shape) != tuple(shape):
        raise ModelFormatError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not np.issubdtype(t.dtype, np.floating) and t.dtype != jnp.bfloat16:
        raise ModelFormatError(f"{source}: tensor {name!r} has non-float dtype {t.dtype}")
    # A NaN or inf weight poisons every forward pass silently; a corrupted file (a quantized block's scale, say)
    # is the usual cause, never a trained model.
    bad = int(np.size(t) - np.count_nonzero(np.isfinite(t)))
    if bad:
        raise ModelFormatError(f"{source}: tensor {name!r} has {bad} non-finite values (NaN or inf) of "
                               f"{np.size(t)}; the file is corrupt")
    return t


def llama_params(cfg: LlamaConfig, get: GetTensor, source: str) -> dict[str, Any]:
    """Nested pure dict (as `nnx.to_pure_dict(nnx.state(LlamaLM))`) from HF-named tensors, fp32 numpy."""
    d, v = cfg.hidden_size, cfg.vocab_size
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    layers: dict[int, Any] = {}
    for i in range(cfg.num_layers):
        layer: dict[str, Any] = {"mixer": {}, "mlp": {}}
        for hf, (path, shape) in LAYER_LINEARS.items():
            w = _fetch(get, f"model.layers.{i}.{hf}", shape(cfg), source)
            layer[path[0]][path[1]] = {"kernel": f32(w).T}
        for norm in LAYER_NORMS:
            layer[norm] = {"weight": f32(_fetch(get, f"model.layers.{i}.{norm}.weight", (d,), source))}
        layers[i] = layer
    params: dict[str, Any] = {
        "embed_tokens": {"embedding": f32(_fetch(get, "model.embed_tokens.weight", (v, d), source))},
        "layers": layers,
        "norm": {"weight": f32(_fetch(get, "model.norm.weight", (d,), source))},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": f32(_fetch(get, "lm_head.weight", (v, d), source)).T}
    return params


def build_llama(cfg: LlamaConfig, params: dict[str, Any]) -> LlamaLM:
    """A LlamaLM holding `params` (cast to cfg.param_dtype)."""
    model = LlamaLM(cfg, rngs=None)
    dt = jnp.dtype(cfg.param_dtype)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)

    def cast(path: tuple, ref: Any, new: Any) -> Any:
        return jnp.asarray(new, dtype=dt)

    import jax
    filled = jax.tree_util.tree_map_with_path(cast, pure, _align(pure, params))
    nnx.replace_by_pure_dict(state, filled)
    nnx.update(model, state)
    return model


def _align(ref: Any, new: Any) -> Any:
    """`new` re-keyed like `ref` (layer indices may come as ints or strings)."""
    if isinstance(ref, dict):
        if not isinstance(new, dict):
            raise ModelFormatError("parameter tree does not match the model")
        out = {}
        for k, v in ref.items():
            key = k if k in new else str(k)
            if key not in new:
                raise ModelFormatError(f"parameter {k!r} missing from the converted tree")
            out[k] = _align(v, new[key])
        return out
    return new
