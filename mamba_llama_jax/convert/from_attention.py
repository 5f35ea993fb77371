"""Attention → Mamba: build a hybrid student from a Llama teacher (DESIGN.md, "Attention → Mamba").

Embeddings, final norm, LM head, every layer's two norms and MLP, and the attention layers that stay are copied;
each replaced layer's Mamba mixer takes the attention weights it replaces — V → x, K → B, Q → C, O → out — and the
rest (z and dt projections, conv, dt_bias, A_log, D, norm) gets the official fresh init. Q and K are copied in
the teacher's (HF rotate-half) row order, unrotated, exactly as the official code does.

Progressive conversion: `build_hybrid(teacher, cfg, previous=hybrid)` starts from an earlier hybrid instead:
its Mamba layers are kept as trained, its attention layers that the new config turns into Mamba are converted
from the *previous* model's attention weights, and everything shared is copied from the previous model.

Quiet start (`build_hybrid(..., quiet=s)`, recipes: `quiet_start: s`; not in the method): each newly converted
Mamba2 mixer starts with an identity conv and its gated norm's weight times s, so that it begins close to "layer
removed". Measured on SmolLM2-135M (benchmarks/results/quality/notes.md): as the method prescribes, a converted
mixer does more harm at the start than removing the layer (50 % hybrid: held-out ppl 964,171; after 5.7 M tokens,
79x the teacher's); with s = 0.05: 166 at the start, 2.7x after the same training.

Shallow students (`HybridConfig.keep_layers`, e.g. a speculative-decoding draft) take only some teacher layers;
each kept layer is copied or converted exactly as above.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from mamba_llama_jax.config import HybridConfig
from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.models.hybrid import HybridLM
from mamba_llama_jax.models.llama import Attention, DecoderLM
from mamba_llama_jax.models.mamba import Mamba1, Mamba2

STAGES = {"layerwise": "mamba", "end_to_end": "all", "sft": "all", "dpo": "all"}


def attn_layers_for(num_layers: int, fraction: float) -> tuple[int, ...]:
    """Layers that keep attention at `fraction` (0 or 1/k): i keeps attention iff i % k == k - 1."""
    return HybridConfig(attn_fraction=fraction).layers_for(num_layers)


def _set(var: nnx.Variable, value: jax.Array) -> None:
    if tuple(var[...].shape) != tuple(value.shape):
        raise ConfigError(f"cannot copy a tensor of shape {tuple(value.shape)} into a parameter of shape "
                          f"{tuple(var[...].shape)}: teacher and hybrid configs disagree")
    var.set_value(value.astype(var[...].dtype))


def _copy(dst: nnx.Module, src: nnx.Module) -> None:
    """Copies every parameter of `src` into the identically structured `dst`."""
    s, d = nnx.state(src, nnx.Param), nnx.state(dst, nnx.Param)
    if jax.tree.structure(s) != jax.tree.structure(d):
        raise ConfigError(f"cannot copy {type(src).__name__} into {type(dst).__name__}: structures differ")
    nnx.update(dst, jax.tree.map(lambda a, b: a.astype(b.dtype), s, d))


def init_from_attention(mixer: nnx.Module, attn: Attention) -> None:
    """Overwrites the attention-derived weights of a fresh Mamba mixer: V → x, K → B, Q → C, O → out."""
    q, k, v, o = (attn.q_proj.kernel[...], attn.k_proj.kernel[...], attn.v_proj.kernel[...],
                  attn.o_proj.kernel[...])
    nq, nkv = q.shape[1], k.shape[1]
    if mixer.d_inner != nq or mixer.d_xb != nkv:
        raise ConfigError(
            f"Mamba d_inner/d_xb ({mixer.d_inner}/{mixer.d_xb}) must equal the attention layer's "
            f"num_heads·head_dim/num_kv_heads·head_dim ({nq}/{nkv}) to initialise from it; leave them at 0")
    if isinstance(mixer, Mamba2):
        if mixer.headdim != attn.head_dim:
            raise ConfigError(f"Mamba2 d_state ({mixer.d_state}) must equal head_dim ({attn.head_dim}) to "
                              "initialise from attention; leave it at 0")
        w = mixer.in_proj.kernel[...]
        di, dxb = mixer.d_inner, mixer.d_xb
        w = w.at[:, di:di + dxb].set(v.astype(w.dtype))                       # x
        w = w.at[:, di + dxb:di + 2 * dxb].set(k.astype(w.dtype))             # B
        w = w.at[:, di + 2 * dxb:2 * di + 2 * dxb].set(q.astype(w.dtype))     # C
        _set(mixer.in_proj.kernel, w)
    elif isinstance(mixer, Mamba1):
        _set(mixer.in_proj_x.kernel, v)
        _set(mixer.B_proj.kernel, k)
        _set(mixer.C_proj.kernel, q)
    else:
        raise TypeError(f"not a Mamba mixer: {type(mixer).__name__}")
    _set(mixer.out_proj.kernel, o)


def quiet_start(model: HybridLM, layers: Sequence[int], scale: float) -> None:
    """The Mamba2 mixers of `layers` start near "layer removed": identity conv (the current input passes, no
    bias) and the gated norm's weight times `scale`."""
    if not 0 < scale <= 1:
        raise ConfigError(f"quiet_start must be in (0, 1], got {scale}")
    for i in layers:
        mixer = model.layers[i].mixer
        if not isinstance(mixer, Mamba2):
            raise ConfigError(f"quiet_start is defined for Mamba2 mixers; layer {i} is {type(mixer).__name__}")
        w = mixer.conv1d.weight[...]
        mixer.conv1d.weight.set_value(w.at[...].set(0).at[:, -1].set(1))
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias.set_value(mixer.conv1d.bias[...] * 0)
        mixer.norm.weight.set_value(mixer.norm.weight[...] * scale)


def build_hybrid(teacher: DecoderLM, hybrid_cfg: HybridConfig, *, rngs: nnx.Rngs,
                 previous: HybridLM | None = None, quiet: float | None = None) -> HybridLM:
    """A HybridLM initialised from `teacher` (or, progressively, from `previous`). `rngs` feeds the fresh
    Mamba parameters only; everything else is copied. `quiet`: the quiet start's scale for the mixers this call
    converts (None: the method's initialisation).

    With `hybrid_cfg.keep_layers` the student is shallower: its layer j comes from teacher layer keep_layers[j],
    and its `hybrid` is `hybrid_cfg.student_layout(...)` (no keep_layers), so that it exports and re-imports as
    an ordinary hybrid of that depth. A `previous` model of that same depth (a later stage of a shallow recipe)
    maps layer to layer; one of the teacher's depth gives up its keep_layers, as the teacher would."""
    n = teacher.cfg.num_layers
    kept = hybrid_cfg.kept_layers(n)
    cfg, layout = teacher.cfg, hybrid_cfg
    if hybrid_cfg.keep_layers is not None:
        cfg, layout = dataclasses.replace(cfg, num_layers=len(kept)), hybrid_cfg.student_layout(n)
    src: DecoderLM = teacher if previous is None else previous
    depth = src.cfg.num_layers
    if depth == n:
        source = kept
    elif depth == len(kept):
        source = tuple(range(depth))
    else:
        shallow = (f" and this layout keeps {len(kept)} (keep_layers {list(kept)}); a stage after a shallow one "
                   "must repeat its keep_layers") if hybrid_cfg.keep_layers is not None else (
            "; a stage after a shallow one (keep_layers) must repeat its keep_layers")
        raise ConfigError(f"previous hybrid has {depth} layers, the teacher {n}{shallow}")
    model = HybridLM(cfg, layout, rngs=None, mamba_rngs=rngs)
    if previous is not None:
        was_mamba = set(previous.mamba_layers)
        lost = sorted(source[j] for j in model.attn_layers if source[j] in was_mamba)
        if lost:
            raise ConfigError(f"progressive conversion cannot turn Mamba layers {lost} back into attention: "
                              f"the new attn_layers must be a subset of the previous {list(previous.attn_layers)}")
    _copy(model.embed_tokens, src.embed_tokens)
    _copy(model.norm, src.norm)
    if model.lm_head is not None:
        _copy(model.lm_head, src.lm_head)
    converted = []
    for j, (layer, i) in enumerate(zip(model.layers, source)):
        s = src.layers[i]
        _copy(layer.input_layernorm, s.input_layernorm)
        _copy(layer.post_attention_layernorm, s.post_attention_layernorm)
        _copy(layer.mlp, s.mlp)
        if isinstance(layer.mixer, Attention) and not isinstance(s.mixer, Attention):
            raise ConfigError(f"layer {j} keeps attention, but its source (layer {i} of the "
                              f"{'previous stage' if previous is not None else 'teacher'}) is a Mamba layer: "
                              "attention can only be kept where the source has it")
        if isinstance(layer.mixer, Attention) or not isinstance(s.mixer, Attention):
            _copy(layer.mixer, s.mixer)  # kept attention, or an already trained Mamba layer
        else:
            init_from_attention(layer.mixer, s.mixer)
            converted.append(j)
    if quiet is not None:
        quiet_start(model, converted, quiet)
    return model


def _layer_of(path: tuple[Any, ...]) -> tuple[int | None, bool]:
    """(layer index, whether the parameter belongs to that layer's mixer) from a pytree key path."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    for j in range(len(keys) - 1):
        if keys[j] == "layers" and keys[j + 1].isdigit():
            return int(keys[j + 1]), j + 2 < len(keys) and keys[j + 2] == "mixer"
    return None, False


def trainable_mask(model: HybridLM, stage: str) -> Callable[[Any], Any]:
    """For optax.masked / multi_transform: a function from a parameter pytree (`nnx.state(model, nnx.Param)` or
    its pure dict) to a same-shaped tree of bools, True where the parameter trains in `stage`.

    layerwise: only the Mamba mixers train (attention, MLPs, norms, embeddings frozen, as the official code);
    end_to_end, sft, dpo: everything trains.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r}; expected one of {sorted(STAGES)}")
    mamba = set(model.mamba_layers)

    def mask(params: Any) -> Any:
        def leaf(path: tuple[Any, ...], _: Any) -> bool:
            if STAGES[stage] == "all":
                return True
            i, in_mixer = _layer_of(path)
            return in_mixer and i in mamba
        return jax.tree_util.tree_map_with_path(leaf, params)

    return mask
