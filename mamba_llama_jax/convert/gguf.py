"""GGUF (llama.cpp) -> `(LlamaConfig, params, Tokenizer)`.

Tensors are read with the `gguf` package's `GGUFReader` and dequantized with `gguf.quants` (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q4_K, Q6_K); Q and K rows are un-permuted from llama.cpp's interleaved RoPE layout back to HF's
rotate-half order, then everything goes through `convert.common.llama_params` under HF names. The tokenizer is
rebuilt from the metadata with the `tokenizers` library (no torch, no transformers GGUF loader).

A GGUF file is untrusted input: before `GGUFReader` sees it, `_check_layout` walks the header with bounds checks,
because the reader trusts counts it reads (a corrupt array length makes it loop for 2^64 iterations) and slices
tensor data without checking the file is long enough. Every failure becomes a `ModelFormatError` or
`TokenizerError` saying which file and what is wrong.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mamba_llama_jax.config import LlamaConfig, RopeScaling
from mamba_llama_jax.convert.common import llama_params
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import ConfigError, MambaLlamaError, ModelFormatError, TokenizerError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 40  # no real tensor comes near; guards the arithmetic below against absurd dims

# GGUF metadata value types -> (struct code, size); 8 = string, 9 = array.
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_STRING, _ARRAY = 8, 9

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Llama 3's pre-tokenizer split (tiktoken cl100k-style), as llama.cpp's `llama-bpe` applies it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> pre-tokenizer kind. Each name here is one llama.cpp writes for a regex we reproduce.
BPE_PRE_TOKENIZERS = {"default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "smollm": "smollm", "llama-bpe": "llama3",
                      "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3"}

# HF Llama name suffix (under model.layers.{i}.) -> GGUF name suffix (under blk.{i}.)
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def supported_tensor_types() -> dict[int, str]:
    """GGML type id -> name for the tensor types this converter dequantizes."""
    from gguf import GGMLQuantizationType as Q

    return {int(t): t.name for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)}


# ------------------------------------------------------------------------------------------------- entry point


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, Any], Tokenizer]:
    """Config, fp32 numpy params (the nested dict `build_llama` takes) and tokenizer of a Llama GGUF file."""
    reader = open_gguf(path)
    source = str(path)
    meta = Metadata(reader, source)
    arch = meta.get_str("general.architecture")
    if arch != "llama":
        raise ModelFormatError(
            f"{source}: GGUF architecture {arch!r} is not supported; only 'llama' (Llama 2/3, SmolLM2, Mistral "
            "without sliding window, ...) can be converted"
        )
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_metadata(meta, tensors)
    tok = tokenizer_from_metadata(meta)
    if tok.vocab_size < cfg.vocab_size:
        # Added tokens only ever map onto existing ids, so a smaller vocabulary means a broken token list.
        raise TokenizerError(f"{source}: tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    params = llama_params(cfg, _tensor_getter(tensors, cfg, source), source)
    return cfg, params, tok


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` over a file whose layout has been checked; project errors for anything unreadable."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"GGUF file not found: {p}")
    if not p.is_file():
        raise ModelFormatError(f"{p} is not a file (expected a .gguf model file)")
    _check_layout(p)
    try:
        return GGUFReader(p)
    except MambaLlamaError:
        raise
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/...; all mean a corrupt file
        raise ModelFormatError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------- layout validation


class _Cursor:
    """Bounds-checked little/big-endian reads from the file's bytes."""

    def __init__(self, buf: Any, size: int, source: str):
        self.buf, self.size, self.source, self.pos, self.order = buf, size, source, 0, "<"

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.source}: corrupt or truncated GGUF file: {what} (at byte {self.pos} of "
                                f"{self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but the file ends first")

    def scalar(self, code: str, size: int, what: str) -> Any:
        self.need(size, what)
        (v,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALARS:
            self.need(_SCALARS[vtype][1], what)
            self.pos += _SCALARS[vtype][1]
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            itype = self.u32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            if depth > 2:
                raise self.fail(f"{what}: arrays nested deeper than 3 levels")
            if itype in _SCALARS:
                self.need(count * _SCALARS[itype][1], f"{count} elements of {what}")
                self.pos += count * _SCALARS[itype][1]
            elif itype in (_STRING, _ARRAY):
                # each element takes at least 8 bytes (a length), so a count beyond that is a corrupt length
                self.need(count * 8, f"{count} elements of {what}")
                for _ in range(count):
                    self.skip_value(itype, what, depth + 1)
            else:
                raise self.fail(f"{what}: unknown array element type {itype}")
        else:
            raise self.fail(f"{what}: unknown value type {vtype}")


def _check_layout(p: Path) -> None:
    """Walks header, metadata and tensor table with bounds checks; checks every tensor's data is in the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    source = str(p)
    size = p.stat().st_size
    if size < 24:
        raise ModelFormatError(f"{source}: {size} bytes is too short for a GGUF file (truncated or not GGUF)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise ModelFormatError(
                f"{source}: not a GGUF file (magic bytes {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r}); pass a "
                ".gguf file or an HF model directory"
            )
        c = _Cursor(buf, size, source)
        c.pos = 4
        version = c.u32("version")
        if version & 0xFFFF == 0:  # written big-endian: llama.cpp allows it, the reader handles it
            c.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in SUPPORTED_VERSIONS:
            raise ModelFormatError(f"{source}: GGUF version {version} is not supported (supported: "
                                   f"{SUPPORTED_VERSIONS}); re-convert the model with a recent llama.cpp")
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # smallest possible entries: a key of 0 bytes + type + 1-byte value; a tensor record of 24 bytes
        if n_kv * 13 > size or n_tensors * 24 > size:
            raise c.fail(f"absurd counts ({n_tensors} tensors, {n_kv} metadata entries) for a {size}-byte file")
        alignment = 32
        seen: set[bytes] = set()
        for _ in range(n_kv):
            key = c.string("metadata key")
            if key in seen:
                raise c.fail(f"duplicate metadata key {key!r}")
            seen.add(key)
            vtype = c.u32(f"type of {key!r}")
            if key == b"general.alignment":
                if vtype != 4:
                    raise c.fail("general.alignment must be a uint32")
                alignment = c.u32("general.alignment")
                if alignment == 0 or alignment & (alignment - 1):
                    raise c.fail(f"general.alignment {alignment} is not a power of two")
            else:
                c.skip_value(vtype, f"metadata {key!r}")
        infos = []
        names: set[bytes] = set()
        for _ in range(n_tensors):
            name = c.string("tensor name")
            if name in names:
                raise c.fail(f"duplicate tensor {name!r}")
            names.add(name)
            n_dims = c.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            dims = [c.u64(f"shape of tensor {name!r}") for _ in range(n_dims)]
            ttype = c.u32(f"type of tensor {name!r}")
            offset = c.u64(f"data offset of tensor {name!r}")
            infos.append((name, dims, ttype, offset))
        start = c.pos + (-c.pos) % alignment
    for name, dims, ttype, offset in infos:
        label = name.decode("utf-8", "replace")
        if any(d == 0 for d in dims) or math.prod(dims) > MAX_ELEMENTS:
            raise ModelFormatError(f"{source}: tensor {label!r} has an absurd shape {dims}")
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFormatError(f"{source}: tensor {label!r} has unknown GGML type {ttype}") from None
        if dims[0] % block:
            raise ModelFormatError(f"{source}: tensor {label!r}: row length {dims[0]} is not a multiple of the "
                                   f"{qtype.name} block size {block}")
        nbytes = math.prod(dims) // block * type_size
        if offset % alignment:
            raise ModelFormatError(f"{source}: tensor {label!r} data offset {offset} is not {alignment}-aligned")
        if start + offset + nbytes > size:
            raise ModelFormatError(
                f"{source}: tensor {label!r} data [{start + offset}, {start + offset + nbytes}) lies beyond the "
                f"end of the file ({size} bytes): the file is truncated or corrupt (re-download it)"
            )


# ---------------------------------------------------------------------------------------------------- metadata


class Metadata:
    """Typed access to GGUF key/values; a wrong type or a missing required key is a ModelFormatError."""

    def __init__(self, reader: Any, source: str):
        self.fields = reader.fields
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def raw(self, key: str) -> Any:
        from gguf import GGUFValueType

        field = self.fields[key]
        try:
            if field.types and field.types[0] == GGUFValueType.ARRAY:
                # contents() decodes strings with utf-8; tokens are allowed to hold bytes that are not
                # valid utf-8 (never in practice), so decode leniently here.
                if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING:
                    return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
                if len(field.types) > 1 and field.types[1] == GGUFValueType.ARRAY:
                    raise ModelFormatError(f"{self.source}: metadata {key!r} is a nested array")
                return [v for i in field.data for v in field.parts[i].tolist()]
            if field.types and field.types[0] == GGUFValueType.STRING:
                return bytes(field.parts[-1]).decode("utf-8", "replace")
            return field.parts[-1].tolist()[0]
        except MambaLlamaError:
            raise
        except Exception as e:
            raise ModelFormatError(f"{self.source}: cannot read metadata {key!r}: {e}") from e

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw(key) if key in self.fields else default

    def _typed(self, key: str, ok: Any, kind: str, default: Any, required: bool) -> Any:
        if key not in self.fields:
            if required:
                raise ModelFormatError(f"{self.source}: GGUF metadata {key!r} is missing")
            return default
        v = self.raw(key)
        if not ok(v):
            raise ModelFormatError(f"{self.source}: GGUF metadata {key!r} must be {kind}, got {_short(v)}")
        return v

    def get_str(self, key: str, default: str | None = None, required: bool = True) -> Any:
        return self._typed(key, lambda v: isinstance(v, str), "a string", default, required and default is None)

    def get_int(self, key: str, default: int | None = None, *, required: bool = False, minimum: int = 0) -> Any:
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum
        return self._typed(key, ok, f"an integer >= {minimum}", default, required)

    def get_float(self, key: str, default: float | None = None, *, positive: bool = True) -> Any:
        ok = lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and (v > 0 or not positive))
        v = self._typed(key, ok, "a finite positive number" if positive else "a finite number", default, False)
        return None if v is None else float(v)

    def get_bool(self, key: str, default: bool) -> bool:
        v = self._typed(key, lambda v: isinstance(v, (bool, int)), "a boolean", default, False)
        return bool(v)

    def get_list(self, key: str, item: type, *, required: bool = False) -> list[Any] | None:
        ok = lambda v: isinstance(v, list) and all(isinstance(x, item) and not isinstance(x, bool) for x in v)
        return self._typed(key, ok, f"a list of {item.__name__}", None, required)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# ------------------------------------------------------------------------------------------------------ config


def config_from_metadata(meta: Metadata, tensors: dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from `llama.*` metadata; the vocabulary size is the token list's length."""
    a = "llama."
    n_heads = meta.get_int(a + "attention.head_count", required=True, minimum=1)
    hidden = meta.get_int(a + "embedding_length", required=True, minimum=1)
    n_kv = meta.get_int(a + "attention.head_count_kv", n_heads, minimum=1)
    head_dim = meta.get_int(a + "attention.key_length", hidden // n_heads, minimum=0)
    if head_dim < 2 or head_dim % 2:
        raise ModelFormatError(f"{meta.source}: head size {head_dim} (embedding_length {hidden} / head_count "
                               f"{n_heads}) must be an even number >= 2 for RoPE")
    v_dim = meta.get_int(a + "attention.value_length", head_dim, minimum=1)
    rot = meta.get_int(a + "rope.dimension_count", head_dim, minimum=1)
    if v_dim != head_dim or rot != head_dim:
        raise ModelFormatError(
            f"{meta.source}: key/value/rotary sizes differ ({head_dim}/{v_dim}/{rot}); only full-head RoPE with "
            "equal key and value sizes (standard Llama) is supported"
        )
    tokens = meta.get_list("tokenizer.ggml.tokens", str)
    if tokens is None:
        raise ModelFormatError(f"{meta.source}: GGUF metadata 'tokenizer.ggml.tokens' is missing (no vocabulary)")
    vocab = len(tokens)
    declared = meta.get_int(a + "vocab_size", vocab)
    if declared != vocab:
        raise ModelFormatError(f"{meta.source}: llama.vocab_size is {declared} but the token list has {vocab}")
    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        t = meta.get_int(f"tokenizer.ggml.{key}")
        if t is not None and t < vocab and t not in eos_ids:
            eos_ids.append(t)
    bos = meta.get_int("tokenizer.ggml.bos_token_id")
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=meta.get_int(a + "feed_forward_length", required=True, minimum=1),
            num_layers=meta.get_int(a + "block_count", required=True, minimum=1),
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=meta.get_float(a + "attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=meta.get_float(a + "rope.freq_base", 10000.0),
            rope_scaling=_rope_scaling(meta, tensors, head_dim),
            max_position_embeddings=meta.get_int(a + "context_length", 2048, minimum=1),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=bos if bos is not None and bos < vocab else None,
            eos_token_ids=tuple(eos_ids),
        )
    except ConfigError as e:
        raise ModelFormatError(f"{meta.source}: metadata gives an invalid config: {e}") from e


def _rope_scaling(meta: Metadata, tensors: dict[str, Any], head_dim: int) -> RopeScaling | None:
    """RoPE scaling from `llama.rope.scaling.*`, or Llama 3.1's band-wise factors stored as `rope_freqs.weight`."""
    kind = meta.get_str("llama.rope.scaling.type", "none", required=False)
    if "rope_freqs.weight" in tensors:
        if kind not in ("none", "llama3"):
            raise ModelFormatError(f"{meta.source}: both rope_freqs and rope scaling {kind!r} are set")
        return _llama3_from_factors(_dequantize(tensors["rope_freqs.weight"], meta.source).reshape(-1),
                                    meta, head_dim)
    if kind == "none":
        return None
    if kind == "linear":
        factor = meta.get_float("llama.rope.scaling.factor", None)
        if factor is None:
            raise ModelFormatError(f"{meta.source}: linear rope scaling without llama.rope.scaling.factor")
        return RopeScaling(rope_type="linear", factor=factor)
    raise ModelFormatError(
        f"{meta.source}: rope scaling type {kind!r} is not supported (supported: none, linear, llama3)"
    )


def _llama3_from_factors(factors: np.ndarray, meta: Metadata, head_dim: int) -> RopeScaling | None:
    """Recovers Llama 3.1's rope_scaling parameters from llama.cpp's per-frequency divisors.

    llama.cpp stores 1/scale for each frequency rather than the four parameters. The divisors are 1 for short
    wavelengths, `factor` for long ones and 1 / ((1 - s)/factor + s) between, with s linear in 1/wavelength;
    the parameters are determined only up to a common scale of (low, high, original_max), so low_freq_factor
    is fixed at 1 and the rest solved for. The result is checked by recomputing the divisors.
    """
    from mamba_llama_jax.models.llama import rope_inv_freq

    theta = meta.get_float("llama.rope.freq_base", 10000.0)
    if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ModelFormatError(f"{meta.source}: rope_freqs.weight must hold {head_dim // 2} positive factors")
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None  # all ones: no scaling
    inv = rope_inv_freq(head_dim, theta, None).astype(np.float64)
    inv_wavelen = inv / (2 * math.pi)
    f = factors.astype(np.float64)
    mid = (f > 1 + 1e-4) & (f < factor - 1e-4 * factor)
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, icpt = np.polyfit(inv_wavelen[mid], s, 1)
        high = 1 - 1 / icpt if icpt < 0 else 4.0
        old = slope * (high - 1)
        cand = RopeScaling("llama3", factor, 1.0, float(high), max(int(round(old)), 1))
    elif mid.sum() == 1:
        # One frequency in the band (small head_dim): assume Meta's low/high (1, 4) and solve for original_max.
        s = (1 / f[mid][0] - 1 / factor) / (1 - 1 / factor)
        cand = RopeScaling("llama3", factor, 1.0, 4.0, max(int(round((3 * s + 1) / inv_wavelen[mid][0])), 1))
    else:
        cand = RopeScaling("llama3", factor, 1.0, 4.0, meta.get_int("llama.context_length", 8192) or 8192)
    got = inv / rope_inv_freq(head_dim, theta, cand).astype(np.float64)
    if not np.allclose(got, f, rtol=1e-3):
        raise ModelFormatError(f"{meta.source}: rope_freqs.weight does not follow Llama 3 rope scaling")
    return cand


# ----------------------------------------------------------------------------------------------------- tensors


def _dequantize(t: Any, source: str) -> np.ndarray:
    """fp32 numpy array in numpy (row-major) order: GGUF shape [ne0, ne1] becomes (ne1, ne0), i.e. HF (out, in)."""
    from gguf.quants import dequantize

    kinds = supported_tensor_types()
    if int(t.tensor_type) not in kinds:
        raise ModelFormatError(
            f"{source}: tensor {t.name!r} has type {t.tensor_type.name}, which is not supported (supported: "
            f"{', '.join(kinds.values())}); re-quantize the model to one of them with llama.cpp"
        )
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    out = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
    if t.tensor_type.name == "F32":
        out = out.copy()  # F32 comes back as a view of the memory-mapped file; don't keep the file mapped
    return out.reshape(shape)


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs) to HF's rotate-half order.

    llama.cpp's converter maps, per head, row (half i, index j) to (index j, half i); reading the rows as
    (heads, head_dim/2, 2) and swapping the last two axes restores (heads, 2, head_dim/2).
    """
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tensor_getter(tensors: dict[str, Any], cfg: LlamaConfig, source: str) -> Any:
    def gguf_name(hf: str) -> str:
        if hf in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[hf]
        if hf.startswith("model.layers."):
            i, rest = hf[len("model.layers."):].split(".", 1)
            if rest in _LAYER_NAMES:
                return f"blk.{i}.{_LAYER_NAMES[rest]}"
        raise KeyError(hf)

    def get(hf: str) -> np.ndarray:
        name = gguf_name(hf)
        if name not in tensors:
            raise ModelFormatError(f"{source}: tensor {name!r} (HF {hf!r}) is missing; the file is incomplete "
                                   "or not a Llama model")
        w = _dequantize(tensors[name], source)
        if hf.endswith("q_proj.weight") or hf.endswith("k_proj.weight"):
            heads = cfg.num_heads if "q_proj" in hf else cfg.num_kv_heads
            if w.ndim != 2 or w.shape[0] != heads * cfg.head_dim:
                raise ModelFormatError(f"{source}: tensor {name!r} has shape {w.shape}, expected "
                                       f"({heads * cfg.head_dim}, {cfg.hidden_size})")
            w = unpermute_rope(w, heads)
        return w

    return get


# --------------------------------------------------------------------------------------------------- tokenizer


def tokenizer_from_metadata(meta: Metadata) -> Tokenizer:
    """The file's tokenizer, rebuilt with `tokenizers` and wrapped with its chat template and special tokens."""
    model = meta.get("tokenizer.ggml.model")
    if isinstance(model, list):
        model = repr(model)
    if model is None:
        raise TokenizerError(f"{meta.source}: the GGUF metadata has no tokenizer (tokenizer.ggml.model missing)")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(
            f"{meta.source}: tokenizer model {model!r} is not supported; supported are 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece-style BPE)"
        )
    try:
        tokens = meta.get_list("tokenizer.ggml.tokens", str, required=True)
        types = meta.get_list("tokenizer.ggml.token_type", int) or [TOKEN_NORMAL] * len(tokens)
    except ModelFormatError as e:
        raise TokenizerError(str(e)) from e
    if len(types) != len(tokens):
        raise TokenizerError(f"{meta.source}: {len(types)} token types for {len(tokens)} tokens")
    if not tokens:
        raise TokenizerError(f"{meta.source}: the token list is empty")

    def special(key: str) -> str | None:
        try:
            i = meta.get_int(f"tokenizer.ggml.{key}")
        except ModelFormatError as e:
            raise TokenizerError(str(e)) from e
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    pad, unk = special("padding_token_id"), special("unknown_token_id")
    try:
        if model == "gpt2":
            tok = _byte_level_bpe(meta, tokens, types)
            add_bos = meta.get_bool("tokenizer.ggml.add_bos_token", False)
        else:
            tok = _sentencepiece_bpe(meta, tokens, types, unk)
            add_bos = meta.get_bool("tokenizer.ggml.add_bos_token", True)
        _add_special_tokens(tok, tokens, types)
        if add_bos and bos is not None:
            from tokenizers import processors

            bos_id = tokens.index(bos)
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{meta.source}: tokenizer.chat_template must be a string")
        eos_ids = [i for key in ("eos_token_id", "eot_token_id", "eom_token_id")
                   if (i := meta.get("tokenizer.ggml." + key)) is not None and isinstance(i, int)
                   and 0 <= i < len(tokens)]
        return Tokenizer.from_tokenizers(tok, bos=bos, eos=eos, pad=pad, unk=unk, chat_template=template,
                                         add_bos=add_bos, eos_token_ids=eos_ids)
    except MambaLlamaError as e:
        if isinstance(e, TokenizerError):
            raise
        raise TokenizerError(str(e)) from e
    except Exception as e:  # `tokenizers` raises plain Exception for a malformed vocabulary or merges
        raise TokenizerError(f"{meta.source}: cannot build the {model!r} tokenizer from the metadata: {e}") from e


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """token -> id; a duplicated token string keeps its first id, as llama.cpp's lookup does."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _byte_level_bpe(meta: Metadata, tokens: list[str], types: list[int]) -> Any:
    """GPT-2-style byte-level BPE (tokenizer.ggml.model == 'gpt2') with the pre-tokenizer the file names."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in BPE_PRE_TOKENIZERS:
        raise TokenizerError(
            f"{meta.source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported are "
            f"{sorted(BPE_PRE_TOKENIZERS)}"
        )
    try:
        merges_raw = meta.get_list("tokenizer.ggml.merges", str, required=True)
    except ModelFormatError as e:
        raise TokenizerError(f"{e} (a byte-level BPE vocabulary needs its merges)") from e
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{meta.source}: malformed merge {m!r} (expected two tokens separated by a space)")
        merges.append((parts[0], parts[1]))
    kind = BPE_PRE_TOKENIZERS[pre]
    # Llama 3 takes a whole pre-token that is itself in the vocabulary without merging (llama.cpp does the same).
    tok = HFTokenizer(models.BPE(vocab=_first_ids(tokens), merges=merges, ignore_merges=kind == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "llama3")
    if kind == "smollm":
        # SmolLM2's tokenizer.json isolates every digit before the GPT-2 regex; its merges never join digits.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif kind == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: Metadata, tokens: list[str], types: list[int], unk: str | None) -> Any:
    """SentencePiece-style BPE (tokenizer.ggml.model == 'llama': Llama 2, Mistral, Zephyr).

    The file stores pieces with scores, not merges. SentencePiece merges the adjacent pair whose result has the
    highest score, so merges are every split of a normal piece into two pieces, ranked by the merged piece's
    score (ties: lower ids first). Unknown bytes fall back to the <0xNN> tokens; spaces are written as U+2581.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    try:
        scores = meta.get_list("tokenizer.ggml.scores", float)
    except ModelFormatError:
        scores = None
    if scores is None:
        scores = [-float(i) for i in range(len(tokens))]  # no scores: SentencePiece lists pieces best-first
    if len(scores) != len(tokens):
        raise TokenizerError(f"{meta.source}: {len(scores)} scores for {len(tokens)} tokens")
    vocab = _first_ids(tokens)
    normal = {t for t, ty in zip(tokens, types) if ty == TOKEN_NORMAL}  # SentencePiece merges only into these
    ranked = []
    for piece, i in vocab.items():
        if piece not in normal or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], vocab[a], vocab[b], a, b))
    ranked.sort()
    merges = [(a, b) for _, _, _, a, b in ranked]
    has_bytes = any(ty == TOKEN_BYTE for ty in types)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                 byte_fallback=has_bytes))
    space_prefix = meta.get_bool("tokenizer.ggml.add_space_prefix", True)
    # llama.cpp prefixes a space to every run of text (the start and after each special token), which is what
    # a Prepend normalizer does: added tokens are split off before normalization.
    norms = [normalizers.Prepend("\u2581")] if space_prefix else []
    tok.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", "\u2581")])
    decs = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        decs.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decs)
    return tok


def _add_special_tokens(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, so each is
    matched whole in text (e.g. "<|im_start|>" encodes as one id) instead of being split by the BPE."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty == TOKEN_CONTROL and t]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
            if ty == TOKEN_USER_DEFINED and t]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
