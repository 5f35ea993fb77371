"""HF Llama checkpoint directory -> (LlamaConfig, params, Tokenizer).

A directory as `save_pretrained` / the Hub leaves it: config.json, tokenizer files, and the weights as one
`model.safetensors` or several shards listed by `model.safetensors.index.json`. Tensors are read one at a time
(memory-mapped by safetensors), so peak host memory is about one fp32 copy of the parameters, not two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mamba_llama_jax.config import LlamaConfig, RopeScaling
from mamba_llama_jax.convert.common import llama_params
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import ConfigError, ModelFormatError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_ROPE_TYPES = ("llama3", "linear")


def read_hf_dir(path: str | Path) -> tuple[LlamaConfig, dict[str, Any], Tokenizer]:
    """Reads a local HF Llama directory: config, fp32 numpy params (as `convert.common.llama_params`), tokenizer."""
    d = Path(path)
    if not d.is_dir():
        raise ModelFormatError(f"HF model directory not found: {d}")
    raw = _read_json(d / CONFIG_FILE, what="model config")
    cfg = llama_config_from_hf(raw, source=str(d / CONFIG_FILE))
    gen = d / "generation_config.json"
    if gen.is_file():
        # Instruct checkpoints often list their end-of-turn ids only here (Llama 3: <|eot_id|>).
        gen_raw = _read_json(gen, what="generation config")
        if not isinstance(gen_raw, dict):
            raise ModelFormatError(f"{gen}: expected a JSON object, got {type(gen_raw).__name__}")
        extra = _eos_ids(gen_raw.get("eos_token_id"), str(gen))
        cfg = _with_eos(cfg, extra)
    with SafetensorsDir(d) as weights:
        params = llama_params(cfg, weights.get, source=str(d))
    tok = Tokenizer.from_hf_dir(d, eos_token_ids=cfg.eos_token_ids)
    return cfg, params, tok


def llama_config_from_hf(raw: dict[str, Any], source: str = CONFIG_FILE) -> LlamaConfig:
    """LlamaConfig from a parsed HF config.json (Llama 2 / 3 / 3.1 / 3.2; transformers 4 or 5 layout)."""
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type != "llama":
        raise ModelFormatError(
            f"{source}: model_type is {model_type!r}, but only Llama-architecture checkpoints "
            "(model_type 'llama') can be converted"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ModelFormatError(f"{source}: {flag}=true is not supported (the Llama model here has no biases)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelFormatError(f"{source}: hidden_act {act!r} is not supported (Llama uses 'silu')")

    def req(key: str) -> Any:
        if key not in raw:
            raise ModelFormatError(f"{source}: required key {key!r} is missing")
        return raw[key]

    heads = req("num_attention_heads")
    # transformers 5 moves rope_theta and the scaling into `rope_parameters`; 4.x keeps them top level.
    rope_params = raw.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise ModelFormatError(f"{source}: rope_parameters must be an object, got {rope_params!r}")
    theta = rope_params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling_raw = raw.get("rope_scaling") or (rope_params if rope_params else None)
    try:
        scaling = _rope_scaling(scaling_raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    fields = dict(
        vocab_size=_int(req("vocab_size"), "vocab_size", source),
        hidden_size=_int(req("hidden_size"), "hidden_size", source),
        intermediate_size=_int(req("intermediate_size"), "intermediate_size", source),
        num_layers=_int(req("num_hidden_layers"), "num_hidden_layers", source),
        num_heads=_int(heads, "num_attention_heads", source),
        # Llama 2 7B/13B configs predate GQA and omit it: one KV head per query head.
        num_kv_heads=_int(raw.get("num_key_value_heads") or heads, "num_key_value_heads", source),
        head_dim=_int(raw.get("head_dim") or 0, "head_dim", source, minimum=0),
        rms_norm_eps=_float(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
        rope_theta=_float(theta, "rope_theta", source),
        rope_scaling=scaling,
        max_position_embeddings=_int(raw.get("max_position_embeddings", 2048), "max_position_embeddings", source),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
        eos_token_ids=_eos_ids(raw.get("eos_token_id"), source),
    )
    try:
        return LlamaConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def llama_config_to_hf(cfg: LlamaConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
    """The inverse of `llama_config_from_hf`: an HF (transformers 4.x layout) Llama config.json as a dict.

    `llama_config_from_hf(llama_config_to_hf(c))` equals `c` up to the runtime-only `dtype`/`param_dtype`.
    """
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
    }
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = ({"rope_type": "linear", "factor": s.factor} if s.rope_type == "linear" else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings})
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        # transformers writes a single id as a plain int; Llama 3 instruct configs list several.
        out["eos_token_id"] = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)
    return out


def _rope_scaling(raw: Any) -> RopeScaling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {raw!r}")
    # Older configs spell it `type` (Llama 2 linear scaling); transformers >= 4.45 writes `rope_type`.
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind == "default":
        return None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unknown rope scaling type {kind!r}: supported are {list(SUPPORTED_ROPE_TYPES)} "
            "(or none for plain RoPE theta)"
        )
    if isinstance(raw.get("factor"), bool) or not isinstance(raw.get("factor"), (int, float)):
        raise ConfigError(f"rope scaling {kind!r} needs a numeric 'factor', got {raw.get('factor')!r}")
    try:
        if kind == "linear":
            return RopeScaling(rope_type="linear", factor=float(raw["factor"]))
        defaults = RopeScaling()
        return RopeScaling(
            rope_type="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", defaults.low_freq_factor)),
            high_freq_factor=float(raw.get("high_freq_factor", defaults.high_freq_factor)),
            original_max_position_embeddings=int(
                raw.get("original_max_position_embeddings", defaults.original_max_position_embeddings)),
        )
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"rope scaling {kind!r} has an invalid value: {e}") from None


def _int(v: Any, key: str, source: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ModelFormatError(f"{source}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _float(v: Any, key: str, source: str) -> float:
    # float() of an integer beyond ~1.8e308 raises OverflowError; NaN/inf would poison every forward pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) \
            or not (abs(v) < 2 ** 1023 if isinstance(v, int) else math.isfinite(v)):
        raise ModelFormatError(f"{source}: {key} must be a finite number, got {str(v)[:60]}")
    return float(v)


def _eos_ids(v: Any, source: str) -> tuple[int, ...]:
    if v is None:
        return ()
    items = v if isinstance(v, list) else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ModelFormatError(f"{source}: eos_token_id must be an integer or a list of integers, got {v!r}")
    return tuple(items)


def _with_eos(cfg: LlamaConfig, extra: tuple[int, ...]) -> LlamaConfig:
    merged = cfg.eos_token_ids + tuple(i for i in extra if i not in cfg.eos_token_ids)
    return dataclasses.replace(cfg, eos_token_ids=merged)


def _read_json(p: Path, *, what: str) -> Any:
    if not p.is_file():
        raise ModelFormatError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON/UTF-8, an int of > 4300 digits
        raise ModelFormatError(f"cannot parse {what} {p}: {str(e)[:300]}") from e


# ------------------------------------------------------------------------------------------------------- tensors


class SafetensorsDir:
    """Lazy name -> numpy tensor lookup over one or many safetensors files of a directory (a context manager)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = _weight_files(self.path)
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> "SafetensorsDir":
        from safetensors import safe_open

        try:
            for f in self.files:
                try:
                    h = self._stack.enter_context(safe_open(str(f), framework="numpy"))
                except Exception as e:  # safetensors raises its own error type for a corrupt header
                    raise ModelFormatError(f"cannot read safetensors file {f}: {e}") from e
                self._handles[f] = h
                for k in h.keys():
                    self._where.setdefault(k, f)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def keys(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` (KeyError if absent); bf16 comes back as ml_dtypes.bfloat16."""
        f = self._where[name]
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors' own error type is not importable by a stable path
            # safetensors builds without ml_dtypes cannot hand numpy a bf16 array: read the bytes ourselves.
            try:
                return _read_raw(f, name)
            except ModelFormatError:
                raise
            except Exception:  # noqa: BLE001
                raise ModelFormatError(f"{f}: cannot read tensor {name!r}: {e}") from e


_RAW_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def _read_raw(f: Path, name: str) -> np.ndarray:
    """One tensor read straight from the file's bytes. Every size in the header is checked against the file's
    length before anything is read, so a corrupt header cannot make it allocate more than the file holds."""
    import ml_dtypes

    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8:
            raise ModelFormatError(f"{f}: safetensors header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ModelFormatError(f"{f}: safetensors header is not valid JSON: {e}") from None
        info = header.get(name) if isinstance(header, dict) else None
        if info is None:
            raise ModelFormatError(f"{f}: no tensor {name!r} in the safetensors header")
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"{f}: tensor {name!r} has a malformed header entry {str(info)[:200]}") from e
        ok_ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
        if not ok_ints or not 0 <= start <= end <= size - 8 - n or any(d < 0 for d in shape):
            raise ModelFormatError(f"{f}: tensor {name!r} has data offsets {info['data_offsets']} or shape {shape} "
                                   f"outside the file ({size - 8 - n} data bytes)")
        dt = ml_dtypes.bfloat16 if dtype == "BF16" else _RAW_DTYPES.get(dtype)
        if dt is None:
            raise ModelFormatError(f"{f}: tensor {name!r} has unsupported dtype {dtype!r}")
        if end - start != np.dtype(dt).itemsize * math.prod(shape):
            raise ModelFormatError(f"{f}: tensor {name!r} is truncated or its header is inconsistent")
        fh.seek(8 + n + start)
        buf = fh.read(end - start)
    if len(buf) != end - start:
        raise ModelFormatError(f"{f}: tensor {name!r} is truncated")
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def shard_files(index: Path, what: str) -> list[Path]:
    """The shard files an HF `*.index.json` names, checked to be plain names of files present beside it."""
    d = index.parent
    data = _read_json(index, what=what)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ModelFormatError(f"{index}: no 'weight_map' object mapping tensor names to shard files")
    files = sorted(set(map(str, wmap.values())))
    for name in files:
        if Path(name).name != name:
            raise ModelFormatError(f"{index}: shard entry {name!r} is not a file name in the directory")
    try:
        missing = [n for n in files if not (d / n).is_file()]
    except OSError as e:  # e.g. a name longer than the filesystem allows
        raise ModelFormatError(f"{index}: unusable shard file name: {e}") from None
    if missing:
        raise ModelFormatError(
            f"{index} lists shard file(s) {missing} that are not in {d}; download the complete checkpoint"
        )
    return [d / n for n in files]


def _weight_files(d: Path) -> list[Path]:
    index = d / INDEX_FILE
    if index.is_file():
        return shard_files(index, "safetensors index")
    single = d / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(d.glob("*.safetensors"))
    if found:
        return found
    others = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pth"))
    hint = f" (found {others}; re-save the model with safe_serialization=True)" if others else ""
    raise ModelFormatError(f"no safetensors weights in {d}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")
