"""Tokenizer + chat template, one interface for every source (GGUF metadata, HF directory).

Wraps a `transformers.PreTrainedTokenizerFast` (no torch needed): GGUF vocabularies are built as a `tokenizers`
object by `convert/gguf.py` and wrapped here, HF directories load through AutoTokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mamba_llama_jax.errors import TokenizerError

Message = dict[str, str]


class Tokenizer:
    """Text <-> ids, chat templating, and the special ids generation needs."""

    def __init__(self, hf: Any, eos_token_ids: Sequence[int] = ()):
        self.hf = hf
        ids = list(eos_token_ids)
        if hf.eos_token_id is not None and hf.eos_token_id not in ids:
            ids.append(int(hf.eos_token_id))
        self.eos_token_ids: tuple[int, ...] = tuple(ids)

    @classmethod
    def from_hf_dir(cls, path: str | Path, eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many types for unusable tokenizer files
            raise TokenizerError(f"cannot load a tokenizer from {path}: {e}") from e
        return cls(hf, eos_token_ids)

    @classmethod
    def from_tokenizers(cls, tok: Any, *, bos: str | None, eos: str | None, pad: str | None, unk: str | None,
                        chat_template: str | None, add_bos: bool, eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """Wraps a `tokenizers.Tokenizer` (built from GGUF metadata)."""
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                     unk_token=unk, chat_template=chat_template)
        hf.add_bos_token = add_bos
        return cls(hf, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int:
        if self.hf.pad_token_id is not None:
            return int(self.hf.pad_token_id)
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as text."""
        if not self.hf.chat_template:
            raise TokenizerError("this tokenizer has no chat template; pass plain text prompts instead")
        import jinja2

        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # the template's own error (bad syntax, or its raise_exception(...))
            raise TokenizerError(f"the tokenizer's chat template failed on these messages: {type(e).__name__}: "
                                 f"{e}") from e

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the templated chat (the template itself places any BOS)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)
