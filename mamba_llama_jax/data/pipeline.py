"""grain input pipelines: tokenise (chat template, assistant-only loss mask), pack to a fixed length with segment
ids (or pad), batch, and shard per host; the iterator's state is checkpointed with the model (orbax item `data`).

Batches are dicts of numpy arrays, per host:
- LM stages: tokens (B, L) int32, loss_mask (B, L) int32 (1 where the token is a training target),
  segment_ids (B, L) int32 (document id within the row, 0 = padding).
- DPO: chosen_tokens / chosen_loss_mask / chosen_segment_ids and the same for rejected, each (B, L), right-padded.
The order is a pure function of (shuffle_seed, shard_index, shard_count), so a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from mamba_llama_jax.config import DataConfig
from mamba_llama_jax.errors import DataError, TokenizerError

Message = dict[str, str]


def chat_tokens(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and a mask that is 1 on assistant turns only.

    Each assistant turn is the text the template adds between "prompt so far + generation prompt" and "prompt
    with this answer" (the answer and its end-of-turn marker); the pieces are tokenised separately, so the mask
    boundaries are exact. The template must render each conversation as a prefix of its continuation.
    """
    ids: list[int] = []
    mask: list[int] = []
    done = ""

    def add(text: str, m: int) -> None:
        toks = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids.extend(toks)
        mask.extend([m] * len(toks))

    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i == 0:
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        full = tokenizer.render_chat(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TokenizerError("the chat template does not render a conversation as a prefix of its continuation, "
                                 "so assistant-only loss masks cannot be cut from it")
        add(prompt[len(done):], 0)
        add(full[len(prompt):], 1)
        done = full
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    if full.startswith(done):
        add(full[len(done):], 0)
    return ids, mask


def _lm_example(ex: dict[str, Any], tokenizer: Any, seq_len: int) -> dict[str, np.ndarray]:
    if "tokens" in ex:
        toks, mask = ex["tokens"], ex["loss_mask"]
    else:
        toks, mask = chat_tokens(tokenizer, ex["messages"])
    return {"tokens": np.asarray(toks[:seq_len], np.int32), "loss_mask": np.asarray(mask[:seq_len], np.int32)}


def _pad_row(toks: Sequence[int], mask: Sequence[int], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = min(len(toks), seq_len)
    out = {"tokens": np.full(seq_len, pad_id, np.int32), "loss_mask": np.zeros(seq_len, np.int32),
           "segment_ids": np.zeros(seq_len, np.int32)}
    out["tokens"][:n] = toks[:n]
    out["loss_mask"][:n] = mask[:n]
    out["segment_ids"][:n] = 1
    return out


def _pair_example(ex: dict[str, Any], tokenizer: Any, seq_len: int, max_prompt: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """Chosen and rejected rows sharing one prompt, cut from the left to `max_prompt` tokens; responses cut to fit."""
    if "prompt_ids" in ex:
        prompt, rows = list(ex["prompt_ids"]), [list(ex["chosen_ids"]), list(ex["rejected_ids"])]
    else:
        prompt = tokenizer.encode_chat(ex["prompt"], add_generation_prompt=False)
        rows = []
        for resp in (ex["chosen"], ex["rejected"]):
            full, mask = chat_tokens(tokenizer, ex["prompt"] + resp)
            if full[:len(prompt)] != prompt:
                raise TokenizerError("chat template renders the prompt differently inside the conversation")
            rows.append(full[len(prompt):])
    prompt = prompt[-max_prompt:] if max_prompt else prompt
    out: dict[str, np.ndarray] = {}
    for name, resp in zip(("chosen", "rejected"), rows):
        padded = _pad_row(prompt + resp, [0] * len(prompt) + [1] * len(resp), seq_len, pad_id)
        for k, v in padded.items():
            out[f"{name}_{k}"] = v
    return out


def _packed(ds: grain.IterDataset, seq_len: int, bins: int) -> grain.IterDataset:
    lengths = {"tokens": seq_len, "loss_mask": seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=bins,
                                                        shuffle_bins=False)
    return packed.map(lambda b: {"tokens": b["tokens"], "loss_mask": b["loss_mask"],
                                 "segment_ids": b["tokens_segment_ids"].astype(np.int32)})


def build_dataset(examples: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataConfig, *, batch_size: int,
                  shard_index: int = 0, shard_count: int = 1, pad_id: int | None = None) -> grain.IterDataset:
    """The batched, per-host pipeline over normalised examples (see `data/sources.py`). `batch_size` is the
    global batch; this host gets batch_size / shard_count rows of it."""
    if batch_size % shard_count:
        raise DataError(f"global batch size {batch_size} is not divisible by the {shard_count} data-loading hosts")
    local = batch_size // shard_count
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    ds = grain.MapDataset.source(examples)
    if cfg.max_examples:
        ds = ds[:cfg.max_examples]
    ds = ds.shuffle(seed=cfg.shuffle_seed)
    ds = ds.repeat(cfg.num_epochs or None)
    ds = ds[shard_index::shard_count]
    if cfg.kind == "pairs":
        ds = ds.map(lambda ex: _pair_example(ex, tokenizer, cfg.seq_len, cfg.max_prompt_len, pad))
        it = ds.to_iter_dataset()
    else:
        ds = ds.map(lambda ex: _lm_example(ex, tokenizer, cfg.seq_len)).filter(lambda ex: len(ex["tokens"]) >= 2)
        it = ds.to_iter_dataset()
        if cfg.pack:
            it = _packed(it, cfg.seq_len, cfg.num_packing_bins)
        else:
            it = it.map(lambda ex: _pad_row(ex["tokens"], ex["loss_mask"], cfg.seq_len, pad))
    return it.batch(local, drop_remainder=True)


def make_iterator(ds: grain.IterDataset) -> grain.DatasetIterator:
    """A checkpointable iterator (`get_state`/`set_state`; saved through `grain.checkpoint.CheckpointSave`)."""
    return iter(ds)
