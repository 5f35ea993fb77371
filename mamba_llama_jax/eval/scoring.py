"""Teacher-forced scoring: log p(token | prefix) for every position of a batch of token rows, in one jitted call.

Every metric that reads likelihoods (perplexity, the lm-eval adapter, the chat comparison) goes through `Scorer`,
so they agree with each other and with training's `train.losses.token_logprobs`.

Why it looks like this:
- The model is prepared once like the `Generator` (fused projections, weights in the compute dtype) and split
  into (graphdef, state), so a jitted program is cached per (row count, padded length) and never retraced.
- Rows are right-padded to a multiple of `length_multiple` and the batch to a fixed `batch_size`: a handful of
  shapes, so a long evaluation compiles a handful of times. Right padding is safe because the model is causal.
- Only (b, t) arrays leave the device: the log-prob of each next token and whether it was the argmax, never the
  (b, t, V) logits (3 GB for SmolLM2 at b=16, t=1024).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.models.llama import DecoderLM


@dataclasses.dataclass
class RowScore:
    """For a row of n tokens: `logp[i]` = log p(tokens[i+1] | tokens[:i+1]), `greedy[i]` = whether tokens[i+1]
    was the argmax there; both of length n - 1."""

    logp: np.ndarray
    greedy: np.ndarray


@functools.partial(jax.jit, static_argnames=("graphdef", "use_segments"))
def _score(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array, segments: jax.Array,
           *, use_segments: bool) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens, token_mask=mask, segment_ids=segments if use_segments else None)
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return tok_logp, greedy


class Scorer:
    """Log-probabilities of token rows under `model` (a teacher or a hybrid: any `DecoderLM`).

    Weights are captured at construction (as in `Generator`): build a new Scorer after training further.
    """

    def __init__(self, model: DecoderLM, *, batch_size: int = 4, length_multiple: int = 64, fuse: bool = True):
        from mamba_llama_jax.inference.generate import prepare_for_inference

        if batch_size <= 0 or length_multiple <= 0:
            raise ConfigError(f"batch_size and length_multiple must be positive, got {batch_size}, {length_multiple}")
        self.cfg = model.cfg
        self.graphdef, self.state, _ = prepare_for_inference(model, fuse=fuse)
        self.batch_size = batch_size
        self.length_multiple = length_multiple

    @property
    def max_length(self) -> int:
        """The longest row the model takes: its trained context (`max_position_embeddings`)."""
        return int(self.cfg.max_position_embeddings)

    def check_length(self, n: int, what: str = "a row") -> None:
        if n > self.max_length:
            raise ConfigError(f"{what} has {n} tokens, more than the model's context of {self.max_length}: use a "
                              f"shorter context (--context {self.max_length} or less)")

    def score(self, rows: Sequence[Sequence[int]], segments: Sequence[Sequence[int]] | None = None
              ) -> list[RowScore]:
        """One `RowScore` per row. `segments` (same shapes, optional): document ids of packed rows, so that no
        token attends (or carries recurrent state) across a document boundary."""
        out: list[RowScore] = []
        rows = [list(map(int, r)) for r in rows]
        for r in rows:
            if len(r) < 2:
                raise ConfigError("a row to score needs at least 2 tokens (a prefix and a target)")
            self.check_length(len(r))
            bad = [t for t in r if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ConfigError(f"token id {bad[0]} is outside the model's vocabulary [0, {self.cfg.vocab_size})")
        # Sorting by length keeps rows of one batch alike, so less padding is scored for nothing.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        results: dict[int, RowScore] = {}
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            longest = max(len(rows[i]) for i in idx)
            t = min(-(-longest // self.length_multiple) * self.length_multiple, max(self.max_length, longest))
            toks = np.zeros((self.batch_size, t), np.int32)
            mask = np.zeros((self.batch_size, t), bool)
            seg = np.zeros((self.batch_size, t), np.int32)
            for j, i in enumerate(idx):
                n = len(rows[i])
                toks[j, :n] = rows[i]
                mask[j, :n] = True
                if segments is not None:
                    seg[j, :n] = segments[i]
                    seg[j, n:] = seg[j, n - 1] + 1  # padding is a document of its own
            logp, greedy = _score(self.graphdef, self.state, jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(seg),
                                  use_segments=segments is not None)
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for j, i in enumerate(idx):
                n = len(rows[i])
                results[i] = RowScore(logp[j, : n - 1].astype(np.float64), greedy[j, : n - 1])
        out = [results[i] for i in range(len(rows))]
        return out

    def continuation_logprob(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool, int]:
        """(sum of log p(continuation | context), whether every continuation token was the argmax, its length)."""
        return self.continuation_logprobs([(context, continuation)])[0]

    def continuation_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                              ) -> list[tuple[float, bool, int]]:
        """Batched `continuation_logprob`. Contexts are cut from the left when context + continuation exceeds
        the model's context (the lm-eval convention); an empty context is an error (give a BOS token)."""
        rows, spans = [], []
        for ctx, cont in pairs:
            ctx, cont = list(ctx), list(cont)
            if not ctx:
                raise ConfigError("an empty context cannot be scored: prefix it with a BOS/EOS token")
            if not cont:
                raise ConfigError("an empty continuation has no log-probability")
            if len(cont) >= self.max_length:
                raise ConfigError(f"a continuation of {len(cont)} tokens does not fit the model's context of "
                                  f"{self.max_length}")
            row = (ctx + cont)[-self.max_length:]
            rows.append(row)
            spans.append(len(cont))
        scores = self.score(rows)
        out = []
        for s, n in zip(scores, spans):
            lp, g = s.logp[-n:], s.greedy[-n:]
            out.append((float(lp.sum()), bool(g.all()), n))
        return out
