"""Import and export the MambaInLlama hub format (the official jxiw/MambaInLlama code and JunxiongWang/* models).

A model directory holds:
- `config.json`: the base Llama's HF config (read with `convert.hf.llama_config_from_hf`);
- `mamba_config.json`: d_model, ssm_cfg, rms_norm_eps, vocab_size, d_inner, d_xb, intermediate_size, hidden_act,
  n_layer, attn_layers — exactly the fields of the official `MambaConfig` dataclass, which the official loader
  builds with `MambaConfig(**json)`, so nothing else may be written there; `ssm_cfg` is passed as keyword
  arguments to the official mixer constructor, so only its parameter names may appear in it;
- weights: `model.safetensors` (or shards with `model.safetensors.index.json`), or torch's `pytorch_model.bin`
  (or shards with `pytorch_model.bin.index.json`), read without torch by `convert.torch_pickle`.

Tensor names are the HF Llama ones (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
`.mlp.*`, `.input_layernorm.weight`, `.post_attention_layernorm.weight`, `model.norm.weight`, `lm_head.weight`)
and, for layers not in `attn_layers`, `model.layers.{i}.mamba.*`:
- Mamba2: in_proj.weight [z|x|B|C|dt rows], conv1d.weight (c, 1, K), conv1d.bias, dt_bias, A_log, D, norm.weight,
  out_proj.weight;
- Mamba1: the training names in_proj_x, in_proj_z, B_proj, C_proj, dt_proj_down, dt_proj (weight + bias), conv1d,
  A_log (d_inner, d_state), D, out_proj — or, on import only, the fused inference `in_proj.weight` = rows
  [z (d_inner) | x (d_xb) | B (d_xb) | C (d_inner) | dt_down (dt_rank)] in place of the first five. Export writes
  the training names, because those are what the official `Mamba` module's `load_state_dict` accepts.

The variant is not recorded in mamba_config.json (the official code picks it by which package loads the file),
so import reads it from the tensor names (Mamba2 has `mamba.dt_bias`, Mamba1 `mamba.dt_proj.weight`) and checks
that `ssm_cfg` agrees. Official checkpoints store every tensor, A_log included, in bf16: any float dtype is
accepted and widened to fp32 exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig
from mamba_llama_jax.convert.common import _align, _fetch
from mamba_llama_jax.convert.hf import (SafetensorsDir, _eos_ids, _float, _read_json, _with_eos,
                                        llama_config_from_hf, llama_config_to_hf, shard_files)
from mamba_llama_jax.convert.torch_pickle import load_torch_state_dict
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import CheckpointError, ConfigError, ModelFormatError
from mamba_llama_jax.models.hybrid import HybridLM
from mamba_llama_jax.models.mamba import Mamba1, _dims

CONFIG_FILE = "config.json"
MAMBA_CONFIG_FILE = "mamba_config.json"
WEIGHTS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
VARIANTS = ("mamba1", "mamba2")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# Fields of the official MambaConfig dataclass; d_inner may be absent for Mamba1 (its older dataclass lacks it).
MAMBA_CONFIG_KEYS = ("d_model", "ssm_cfg", "rms_norm_eps", "vocab_size", "d_inner", "d_xb", "intermediate_size",
                     "hidden_act", "n_layer", "attn_layers")

# ssm_cfg keys of the official constructors. "map": becomes a MambaConfig field; "fixed": only the value this
# implementation computes with is accepted; "ignored": no effect on the weights or the forward pass here.
_INF = float("inf")
SSM_CFG = {
    "mamba2": {
        "map": {"d_state": 128, "d_conv": 4, "ngroups": 1, "chunk_size": 256, "conv_bias": True,
                "dt_min": 1e-3, "dt_max": 1e-1, "dt_init_floor": 1e-4, "A_init_range": (1.0, 16.0)},
        "fixed": {"repeat_kv_before_conv": False, "bias": False, "rmsnorm": True, "norm_before_gate": False,
                  "D_has_hdim": False, "dt_limit": (0.0, _INF)},
        "ignored": ("expand", "headdim", "d_ssm", "conv_init", "use_mem_eff_path", "sequence_parallel"),
    },
    "mamba1": {
        "map": {"d_state": 16, "d_conv": 4, "dt_rank": "auto", "conv_bias": True, "dt_min": 1e-3, "dt_max": 1e-1,
                "dt_init_floor": 1e-4},
        "fixed": {"repeat_kv_before_conv": True, "proj_x_bias": False, "proj_z_bias": False,
                  "out_proj_bias": False},
        "ignored": ("expand", "dt_init", "dt_scale", "use_fast_path"),
    },
}


# ------------------------------------------------------------------------------------------------ name mapping


def _key(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _official_name(path: tuple[str, ...], attn_layers: set[int]) -> tuple[str, str]:
    """(official tensor name, layout) for a parameter path of `nnx.to_pure_dict(HybridLM)`.

    layout: 'linear' (ours (in, out), theirs (out, in)), 'conv' (ours (c, K), theirs (c, 1, K)) or 'plain'.
    """
    leaf = path[-1]
    layout = "linear" if leaf == "kernel" else "plain"
    hf_path = path[:-1] + ("weight" if leaf in ("kernel", "embedding") else leaf,)
    if path[0] == "lm_head":
        return "lm_head.weight", layout
    if path[0] != "layers":
        return "model." + ".".join(hf_path), layout
    i, part = int(path[1]), path[2]
    rest = hf_path[3:]
    if part == "mixer":
        part = "self_attn" if i in attn_layers else "mamba"
        if part == "mamba" and path[3:] == ("conv1d", "weight"):
            layout = "conv"
    return f"model.layers.{i}.{part}" + "".join("." + r for r in rest), layout


def _to_official(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return a.T
    if layout == "conv":
        return a[:, None, :]
    return a


def _from_official(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return a.T
    if layout == "conv":
        return a[:, 0, :]
    return a


def _official_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear":
        return shape[::-1]
    if layout == "conv":
        return (shape[0], 1, shape[1])
    return shape


# ------------------------------------------------------------------------------------------------------- export


def export_mambainllama(model: HybridLM, out_dir: str | Path, *, dtype: str = "float32",
                        tokenizer: Tokenizer | None = None, overwrite: bool = False) -> Path:
    """Writes `model` as a MambaInLlama directory: config.json, mamba_config.json, model.safetensors (+ tokenizer).

    Atomic: everything is written to a temporary directory beside `out_dir` and renamed into place, so a failure
    leaves neither a partial directory nor a damaged earlier export. An existing non-empty `out_dir` is replaced
    only with `overwrite=True`. Returns the output path.
    """
    from safetensors.numpy import save_file

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"export target {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise CheckpointError(f"export target {out} is not empty; pass overwrite=True to replace it")
    cfg = model.cfg
    tensors = _export_tensors(model, EXPORT_DTYPES[dtype])
    hf_config = llama_config_to_hf(cfg, torch_dtype=dtype)
    mamba_config = mamba_config_dict(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_json(tmp / CONFIG_FILE, hf_config)
        _write_json(tmp / MAMBA_CONFIG_FILE, mamba_config)
        # transformers refuses safetensors without format metadata
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.hf.save_pretrained(str(tmp))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def mamba_config_dict(model: HybridLM) -> dict[str, Any]:
    """The official mamba_config.json contents for `model` (only the official dataclass's fields)."""
    cfg, mcfg = model.cfg, model.hybrid.mamba
    d_inner, d_xb, d_state = _dims(cfg, mcfg)
    common = {"d_state": d_state, "d_conv": mcfg.d_conv, "expand": 1, "conv_bias": mcfg.conv_bias,
              "dt_min": mcfg.dt_min, "dt_max": mcfg.dt_max, "dt_init_floor": mcfg.dt_init_floor}
    if mcfg.variant == "mamba2":
        ssm_cfg = {**common, "ngroups": d_inner // d_state, "chunk_size": mcfg.chunk_size,
                   "A_init_range": list(mcfg.A_init_range), "repeat_kv_before_conv": False}
    else:
        ssm_cfg = {**common, "dt_rank": mcfg.dt_rank or math.ceil(cfg.hidden_size / 16),
                   "repeat_kv_before_conv": True}
    return {
        "d_model": cfg.hidden_size,
        "ssm_cfg": ssm_cfg,
        "rms_norm_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size,
        "d_inner": d_inner,
        "d_xb": d_xb,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "n_layer": cfg.num_layers,
        "attn_layers": list(model.attn_layers),
    }


def _export_tensors(model: HybridLM, np_dtype: Any) -> dict[str, np.ndarray]:
    attn = set(model.attn_layers)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        name, layout = _official_name(tuple(_key(k) for k in path), attn)
        # via fp32 so bf16 rounding happens once, in ml_dtypes (round-to-nearest-even, as torch's .to(bf16))
        a = np.asarray(jax.device_get(leaf), dtype=np.float32)
        out[name] = np.ascontiguousarray(_to_official(a, layout).astype(np_dtype))
    return out


def _write_json(p: Path, data: Any) -> None:
    p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Renames the finished `tmp` to `out`, moving an existing `out` aside first and back if the rename fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- import


def import_mambainllama(path: str | Path, *, variant: str | None = None, dtype: str = "bfloat16",
                        param_dtype: str = "float32",
                        ) -> tuple[LlamaConfig, HybridConfig, HybridLM, Tokenizer | None]:
    """Reads a MambaInLlama directory into (LlamaConfig, HybridConfig, HybridLM, Tokenizer or None).

    `variant` ('mamba1' | 'mamba2') overrides the detection from tensor names; `dtype`/`param_dtype` are the
    runtime dtypes of the returned model (parameters are exact fp32 widenings of the stored tensors).
    """
    d = Path(path)
    if not d.is_dir():
        raise ModelFormatError(f"MambaInLlama model directory not found: {d}")
    if variant is not None and variant not in VARIANTS:
        raise ConfigError(f"unknown Mamba variant {variant!r}: expected one of {list(VARIANTS)}")
    raw = _read_json(d / CONFIG_FILE, what="Llama config")
    cfg = llama_config_from_hf(raw, source=str(d / CONFIG_FILE))
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
    gen = d / "generation_config.json"
    if gen.is_file():
        gen_raw = _read_json(gen, what="generation config")
        if isinstance(gen_raw, dict):
            cfg = _with_eos(cfg, _eos_ids(gen_raw.get("eos_token_id"), str(gen)))
    mraw = _read_json(d / MAMBA_CONFIG_FILE, what="mamba config")
    attn_layers = _check_mamba_config(mraw, cfg, str(d / MAMBA_CONFIG_FILE))
    with _open_weights(d) as (get, names):
        v = variant or _detect_variant(names, cfg.num_layers, attn_layers, mraw["ssm_cfg"], str(d))
        hybrid = HybridConfig(attn_layers=attn_layers,
                              mamba=_mamba_config(mraw, v, cfg, str(d / MAMBA_CONFIG_FILE)))
        try:
            _check_fits_weights(cfg, hybrid, _weights_nbytes(d, get, names), str(d))
            model = HybridLM(cfg, hybrid, rngs=None)
        except ConfigError as e:
            raise ModelFormatError(f"{d / MAMBA_CONFIG_FILE}: {e}") from None
        _fill(model, get, names, str(d))
    tok = None
    if any((d / f).is_file() for f in TOKENIZER_FILES):
        tok = Tokenizer.from_hf_dir(d, eos_token_ids=cfg.eos_token_ids)
    return cfg, hybrid, model, tok


def _weights_nbytes(d: Path, get: Callable[[str], np.ndarray], names: set[str]) -> int:
    """Bytes of weights the directory holds: the safetensors files' sizes, or the loaded torch tensors'."""
    files = list(d.glob("*.safetensors"))
    if files:
        return sum(f.stat().st_size for f in files)
    return sum(int(get(n).nbytes) for n in names)


def _check_fits_weights(cfg: LlamaConfig, hybrid: HybridConfig, nbytes: int, source: str) -> None:
    """The configs describe the model's shapes, and the model is allocated (zeros) before its tensors are read:
    a corrupt size in them (d_conv: 2^40) must fail here, against the weights actually present, not in malloc."""
    try:
        abstract = nnx.eval_shape(lambda: HybridLM(cfg, hybrid, rngs=None))
    except (TypeError, ValueError, OverflowError) as e:  # a size past int64 cannot even be a shape
        raise ModelFormatError(f"{source}: config.json and {MAMBA_CONFIG_FILE} give impossible shapes: {e}") from e
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    if 2 * n > nbytes:  # 2 bytes: the narrowest float accepted (bf16/fp16)
        raise ModelFormatError(f"{source}: config.json and {MAMBA_CONFIG_FILE} describe a model of {n:,} parameters, "
                               f"but the weight files hold only {nbytes:,} bytes; the configs do not match the "
                               "weights (or the download is incomplete)")


def _check_mamba_config(raw: Any, cfg: LlamaConfig, source: str) -> tuple[int, ...]:
    """Validates mamba_config.json against the Llama config; returns attn_layers."""
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(MAMBA_CONFIG_KEYS))
    if unknown:
        raise ModelFormatError(f"{source}: unknown field(s) {unknown}; the format has {list(MAMBA_CONFIG_KEYS)}")
    missing = [k for k in MAMBA_CONFIG_KEYS if k not in raw and k != "d_inner"]
    if missing:
        raise ModelFormatError(f"{source}: required field(s) {missing} missing")

    def need_int(key: str, want: int, what: str) -> None:
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelFormatError(f"{source}: field {key!r} must be an integer, got {v!r}")
        if v != want:
            raise ModelFormatError(f"{source}: field {key!r} is {v}, but config.json gives {what} = {want}")

    need_int("d_model", cfg.hidden_size, "hidden_size")
    need_int("vocab_size", cfg.vocab_size, "vocab_size")
    need_int("intermediate_size", cfg.intermediate_size, "intermediate_size")
    need_int("n_layer", cfg.num_layers, "num_hidden_layers")
    # The replaced attention layer's V/K fill x/B and Q/O fill C/out, so the widths must be the attention's.
    need_int("d_xb", cfg.num_kv_heads * cfg.head_dim, "num_key_value_heads·head_dim")
    if raw.get("d_inner") is not None:
        need_int("d_inner", cfg.num_heads * cfg.head_dim, "num_attention_heads·head_dim")
    if raw["hidden_act"] != "silu":
        raise ModelFormatError(f"{source}: field 'hidden_act' is {raw['hidden_act']!r}; only 'silu' is supported")
    eps = raw["rms_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or (isinstance(eps, int) and abs(eps) > 2 ** 1023):
        raise ModelFormatError(f"{source}: field 'rms_norm_eps' must be a number, got {str(eps)[:60]}")
    if not math.isclose(float(eps), cfg.rms_norm_eps, rel_tol=1e-6):
        # One eps serves every layer here; the official code uses this one for Mamba layers only.
        raise ModelFormatError(f"{source}: field 'rms_norm_eps' is {eps}, but config.json has rms_norm_eps = "
                               f"{cfg.rms_norm_eps}; both kinds of layer must use the same eps")
    if not isinstance(raw["ssm_cfg"], dict):
        raise ModelFormatError(f"{source}: field 'ssm_cfg' must be an object, got {raw['ssm_cfg']!r}")
    layers = raw["attn_layers"]
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ModelFormatError(f"{source}: field 'attn_layers' must be a list of layer indices, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ModelFormatError(f"{source}: field 'attn_layers' has {bad} out of range for n_layer = "
                               f"{cfg.num_layers} (valid: 0..{cfg.num_layers - 1})")
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise ModelFormatError(f"{source}: field 'attn_layers' lists layer(s) {dup} more than once")
    return tuple(sorted(layers))


def _mamba_config(raw: dict[str, Any], variant: str, cfg: LlamaConfig, source: str) -> MambaConfig:
    """MambaConfig from ssm_cfg: official defaults for absent keys, unsupported values refused by name."""
    spec = SSM_CFG[variant]
    ssm = raw["ssm_cfg"]
    known = set(spec["map"]) | set(spec["fixed"]) | set(spec["ignored"])
    unknown = sorted(set(ssm) - known)
    if unknown:
        raise ModelFormatError(f"{source}: ssm_cfg has key(s) {unknown} that the {variant} mixer does not take; "
                               f"known keys: {sorted(known)}")
    for key, want in spec["fixed"].items():
        if key in ssm and not _same(ssm[key], want):
            raise ModelFormatError(f"{source}: ssm_cfg.{key} = {ssm[key]!r} is not supported (the {variant} "
                                   f"layout here needs {want!r})")
    if variant == "mamba2" and ssm.get("d_ssm") is not None and ssm["d_ssm"] != raw.get("d_inner"):
        raise ModelFormatError(f"{source}: ssm_cfg.d_ssm = {ssm['d_ssm']!r} must equal d_inner (no gated-MLP part)")
    v = {k: ssm.get(k, default) for k, default in spec["map"].items()}
    for k in ("d_state", "d_conv") + (("ngroups", "chunk_size") if variant == "mamba2" else ()):
        if isinstance(v[k], bool) or not isinstance(v[k], int) or v[k] <= 0:
            raise ModelFormatError(f"{source}: ssm_cfg.{k} must be a positive integer, got {v[k]!r}")
    d_inner = raw.get("d_inner") or cfg.num_heads * cfg.head_dim
    extra: dict[str, Any] = {}
    if variant == "mamba2":
        if v["ngroups"] * v["d_state"] != d_inner:
            raise ModelFormatError(
                f"{source}: ssm_cfg.ngroups ({v['ngroups']}) × ssm_cfg.d_state ({v['d_state']}) must equal d_inner "
                f"({d_inner}): one group per head, head size = d_state")
        extra = dict(chunk_size=v["chunk_size"], A_init_range=_floats(v["A_init_range"], "A_init_range", source))
    else:
        r = v["dt_rank"]
        if r == "auto":
            r = math.ceil(cfg.hidden_size / 16)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ModelFormatError(f"{source}: ssm_cfg.dt_rank must be 'auto' or a positive integer, got {r!r}")
        extra = dict(dt_rank=r)
    if not isinstance(v["conv_bias"], bool):
        raise ModelFormatError(f"{source}: ssm_cfg.conv_bias must be true/false, got {v['conv_bias']!r}")
    try:
        return MambaConfig(variant=variant, d_state=v["d_state"], d_conv=v["d_conv"], d_inner=d_inner,
                           d_xb=raw["d_xb"], conv_bias=v["conv_bias"],
                           dt_min=_float(v["dt_min"], "ssm_cfg.dt_min", source),
                           dt_max=_float(v["dt_max"], "ssm_cfg.dt_max", source),
                           dt_init_floor=_float(v["dt_init_floor"], "ssm_cfg.dt_init_floor", source), **extra)
    except ConfigError as e:
        raise ModelFormatError(f"{source}: {e}") from None


def _same(value: Any, want: Any) -> bool:
    if isinstance(want, tuple):
        return isinstance(value, (list, tuple)) and len(value) == len(want) and all(
            _same(a, b) for a, b in zip(value, want))
    if isinstance(want, bool) or want is None:
        return value is want
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == float(want)


def _floats(v: Any, key: str, source: str) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)):
        raise ModelFormatError(f"{source}: ssm_cfg.{key} must be a list of numbers, got {v!r}")
    return tuple(_float(x, f"ssm_cfg.{key}", source) for x in v)


def _detect_variant(names: set[str], num_layers: int, attn_layers: tuple[int, ...], ssm_cfg: dict[str, Any],
                    source: str) -> str:
    mamba = [i for i in range(num_layers) if i not in attn_layers]
    for i in attn_layers:
        p = f"model.layers.{i}."
        if p + "self_attn.q_proj.weight" not in names and any(n.startswith(p + "mamba.") for n in names):
            raise ModelFormatError(f"{source}: layer {i} is in attn_layers, but it holds Mamba tensors "
                                   f"({p}mamba.*) and no attention; check attn_layers in {MAMBA_CONFIG_FILE}")
    found = set()
    for i in mamba:
        p = f"model.layers.{i}.mamba."
        if p + "dt_bias" in names:
            found.add("mamba2")
        elif p + "dt_proj.weight" in names:
            found.add("mamba1")
        else:
            have = sorted(n for n in names if n.startswith(f"model.layers.{i}."))[:6]
            raise ModelFormatError(
                f"{source}: layer {i} is not in attn_layers, but its tensors match neither the Mamba2 layout "
                f"({p}dt_bias, ...) nor the Mamba1 layout ({p}dt_proj.weight, ...); unknown variant. Its tensors "
                f"include {have}; check attn_layers in {MAMBA_CONFIG_FILE}")
    if len(found) > 1:
        raise ModelFormatError(f"{source}: Mamba layers mix the Mamba1 and Mamba2 layouts; one variant per model")
    if not found:
        # An all-attention model: the variant is irrelevant to the weights; ssm_cfg decides, Mamba2 by default.
        return "mamba1" if "dt_rank" in ssm_cfg else "mamba2"
    variant = found.pop()
    other = "mamba1" if variant == "mamba2" else "mamba2"
    foreign = sorted(set(ssm_cfg) - set(SSM_CFG[variant]["map"]) - set(SSM_CFG[variant]["fixed"])
                     - set(SSM_CFG[variant]["ignored"]))
    if foreign and set(foreign) <= set(SSM_CFG[other]["map"]) | set(SSM_CFG[other]["fixed"]):
        raise ModelFormatError(f"{source}: the tensors are {variant}, but ssm_cfg has {other}-only key(s) "
                               f"{foreign}; unknown variant")
    return variant


class _open_weights:
    """Context manager yielding (get(name) -> np.ndarray, set of names) over the directory's weights."""

    def __init__(self, d: Path):
        self.d = d
        self._st: SafetensorsDir | None = None

    def __enter__(self) -> tuple[Callable[[str], np.ndarray], set[str]]:
        d = self.d
        if (d / "model.safetensors.index.json").is_file() or list(d.glob("*.safetensors")):
            self._st = SafetensorsDir(d).__enter__()
            return self._st.get, set(self._st.keys())
        state = _read_torch(d)
        return state.__getitem__, set(state)

    def __exit__(self, *exc: Any) -> None:
        if self._st is not None:
            self._st.__exit__(*exc)


def _read_torch(d: Path) -> dict[str, np.ndarray]:
    index = d / TORCH_INDEX_FILE
    if index.is_file():
        files = shard_files(index, "pytorch_model.bin index")
        state: dict[str, np.ndarray] = {}
        for f in files:
            state.update(load_torch_state_dict(f))
        return state
    if (d / TORCH_FILE).is_file():
        return load_torch_state_dict(d / TORCH_FILE)
    raise ModelFormatError(f"no weights in {d}: expected {WEIGHTS_FILE}, model.safetensors.index.json, "
                           f"{TORCH_FILE} or {TORCH_INDEX_FILE}")


def _fill(model: HybridLM, get: Callable[[str], np.ndarray], names: set[str], source: str) -> None:
    """Loads every parameter of `model` from official tensors (shape-checked); refuses leftover tensors."""
    attn = set(model.attn_layers)
    used: set[str] = set()
    fused = _fused_mamba1(model, get, names, source, used)

    def load(path: Any, ref: jax.Array) -> jax.Array:
        keys = tuple(_key(k) for k in path)
        name, layout = _official_name(keys, attn)
        want = _official_shape(tuple(ref.shape), layout)
        if name in fused:
            t = fused[name]
        else:
            t = _fetch(get, name, want, source)
            used.add(name)
        return jnp.asarray(_from_official(np.asarray(t, dtype=np.float32), layout), dtype=ref.dtype)

    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    filled = jax.tree_util.tree_map_with_path(load, pure)
    nnx.replace_by_pure_dict(state, _align(pure, filled))
    nnx.update(model, state)

    ignorable = {"lm_head.weight"} if model.cfg.tie_word_embeddings else set()
    left = sorted(n for n in names - used - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if left:
        raise ModelFormatError(
            f"{source}: {len(left)} tensor(s) not used by the model described by config.json and "
            f"{MAMBA_CONFIG_FILE}, e.g. {left[:6]}; check attn_layers and the Mamba variant")


def _fused_mamba1(model: HybridLM, get: Callable[[str], np.ndarray], names: set[str], source: str,
                  used: set[str]) -> dict[str, np.ndarray]:
    """Mamba1 layers stored with the fused inference `in_proj` = [z | x | B | C | dt_down] rows, split into the
    training names; {} for layers that use the training names."""
    out: dict[str, np.ndarray] = {}
    for i in model.mamba_layers:
        mixer = model.layers[i].mixer
        p = f"model.layers.{i}.mamba."
        if not isinstance(mixer, Mamba1) or p + "in_proj.weight" not in names:
            continue
        parts = (("in_proj_z", mixer.d_inner), ("in_proj_x", mixer.d_xb), ("B_proj", mixer.d_xb),
                 ("C_proj", mixer.d_inner), ("dt_proj_down", mixer.dt_rank))
        rows = sum(n for _, n in parts)
        w = _fetch(get, p + "in_proj.weight", (rows, model.cfg.hidden_size), source)
        used.add(p + "in_proj.weight")
        start = 0
        for name, n in parts:
            if p + name + ".weight" in names:
                raise ModelFormatError(f"{source}: layer {i} has both the fused {p}in_proj.weight and "
                                       f"{p}{name}.weight; keep one layout")
            out[p + name + ".weight"] = w[start:start + n]
            start += n
    return out


def fused_mamba1_in_proj(tensors: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """Rewrites one Mamba1 layer of an official-named tensor dict from the training names to the fused inference
    `in_proj` (rows [z | x | B | C | dt_down]); for making inference-format files and testing their import."""
    p = f"model.layers.{layer}.mamba."
    parts = ("in_proj_z", "in_proj_x", "B_proj", "C_proj", "dt_proj_down")
    out = {k: v for k, v in tensors.items() if not any(k == p + n + ".weight" for n in parts)}
    out[p + "in_proj.weight"] = np.concatenate([tensors[p + n + ".weight"] for n in parts], axis=0)
    return out


__all__ = ["export_mambainllama", "import_mambainllama", "mamba_config_dict", "fused_mamba1_in_proj"]
