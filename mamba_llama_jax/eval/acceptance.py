"""Greedy speculative acceptance predicted from two ordinary forward passes, without running the speculative loop.

In greedy speculative decoding (`inference/speculative.py`) a round starts after the target's own greedy tokens:
every kept token equals plain greedy decoding's. The round's first draft d1 is the draft's argmax after that
prefix; d_{j+1} is its argmax after the prefix and d1..dj, and it is only ever accepted if d1..dj were, i.e. if they
equal the target's next greedy tokens. So whether draft j of a round is accepted depends only on whether the draft,
fed the target's greedy text, predicts its next token there: `agree[t] = argmax draft(prompt + y[:t]) == y[t]`
along the target's greedy continuation y. One plain greedy run of the target and one teacher-forced forward of the
draft over prompt + y give every `agree[t]`; replaying the rounds on it (`predict_greedy`) gives the accepted count
of every round, hence the acceptance rate, tokens per round and round count, for every k at once. They equal the
speculative decoder's own statistics exactly when both passes round as the loop does (fp32; tested); in bf16 the
loop's verify and the plain step may round a near-tie differently, so it is then an estimate.

Why: acceptance is what decides whether a draft pays (`benchmarks/bench_speculative.py`: a round costs about the
same whatever it accepts), and measuring it by running the loop costs a compile and a round per ~1.5 tokens per
k. This costs two forwards and no compile of the loop, so a draft can be scored while it trains or against many
prompts. Not covered: adaptive k (`stop`: how many drafts a round proposes after a rejection depends on drafts fed
the draft's own wrong tokens).

Sampling (`sampling_overlap`, `sampling_alpha`, `iid_prediction`) is an estimate, not a replay: speculative sampling
accepts a draft x ~ q with probability min(1, p(x)/q(x)), i.e. with probability beta = sum_x min(p(x), q(x)) at a
prefix (Leviathan et al. 2023). One sampled run of the target (whose text has the distribution speculative sampling
outputs) and one teacher-forced forward of each model give beta at every position; its mean alpha, taken as the same
for every draft of a round (the i.i.d. model: in fact a round's later drafts sit after accepted draft tokens, whose
distribution is min(p, q) / beta rather than p), gives acceptance sum_{j<=k} alpha^j / k and
(1 - alpha^(k+1))/(1 - alpha) tokens per round. A draft equal to the target gives alpha = 1 exactly. How far off
that is past k = 1, measured on the tests' tiny models (a random Mamba draft and a noisy copy of a 50 % hybrid, 3
prompts x 24 tokens, 4 seeds; estimate / the loop's acceptance): at temperature 0.1, k = 2 0.31 / 0.38 and 0.71 /
0.75, k = 3 0.23 / 0.29 and 0.64 / 0.68; at 0.5 within 0.02 except the random draft at k = 3 (0.77 / 0.84). Low:
acceptances come in runs (easy stretches), which the i.i.d. model ignores, so read it as a floor at low temperature.
At k = 1: 0.43 / 0.45 and 0.79 / 0.84 (T = 0.1), within 0.01 at 0.5. The tests pin the random draft: within 0.06 at
k = 1 (T = 0.1) and at k = 2 and 4 (T = 0.5), and low at k = 4 (T = 0.1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_llama_jax.errors import GenerationError
from mamba_llama_jax.inference.generate import Generator, SamplingConfig, _spec, _Spec, check_prompts
from mamba_llama_jax.inference.speculative import filter_logits, head_spec, on_vocab
from mamba_llama_jax.models.llama import DecoderLM


@dataclasses.dataclass
class AcceptancePrediction:
    """What `SpeculativeDecoder.run` would report for greedy decoding with this k (`SpecStats`'s fields of the same
    names), plus `agreement`: the share of the target's greedy tokens (after each row's first) that the draft
    predicts when fed the target's text — the per-token acceptance probability the i.i.d. model assumes (for
    sampling, `iid_prediction`: that probability, alpha, itself)."""

    k: int
    acceptance_rate: float
    tokens_per_round: float
    rounds: int
    accepted_hist: list[int]
    agreement: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _argmax_at(draft: DecoderLM, tokens: np.ndarray, mask: np.ndarray, pos: np.ndarray,
               ids: np.ndarray | None) -> np.ndarray:
    """The draft's argmax (over `ids` if given) after each of the positions pos (b, m), one forward of tokens."""
    graphdef, state = nnx.split(draft)
    sub = None if ids is None else jnp.asarray(ids, jnp.int32)
    return np.asarray(_argmax_fn(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(pos), sub))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _argmax_fn(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array, pos: jax.Array,
               sub: jax.Array | None) -> jax.Array:
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden(tokens, token_mask=mask)
    h = jnp.take_along_axis(h, pos[..., None], axis=1)  # only the scored positions reach the head
    logits = model.logits(h)
    if sub is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sub[jnp.argmax(logits[..., sub], axis=-1)]


def greedy_agreement(target: DecoderLM, draft: DecoderLM, prompt_ids: Sequence[Sequence[int]], n_tokens: int, *,
                     draft_vocab: Sequence[int] | np.ndarray | None = None,
                     pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(y, agree), both (b, n_tokens): the target's plain greedy continuation of each prompt (EOS not treated
    specially), and agree[r, t] = whether the draft's argmax after prompt + y[r, :t] is y[r, t] (over `draft_vocab`
    if given, as `SpeculativeDecoder(draft_vocab=)` restricts it). agree[:, 0] is the draft's guess of the
    target's first token, which speculative decoding never asks for."""
    rows = _checked_rows(target, draft, prompt_ids, n_tokens)
    y = Generator(target, pad_id=pad_id).run(rows, SamplingConfig(max_new_tokens=n_tokens)).tokens
    tokens, mask, pos = _teacher_forced(rows, y, pad_id)
    ids = None if draft_vocab is None else np.asarray(draft_vocab, np.int32)
    guess = _argmax_at(draft, tokens, mask, pos, ids)
    return np.asarray(y, np.int32), guess == y


def _checked_rows(target: DecoderLM, draft: DecoderLM, prompt_ids: Sequence[Sequence[int]],
                  n_tokens: int) -> list[list[int]]:
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise GenerationError(f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                              f"({target.cfg.vocab_size}): they must share a tokenizer")
    return check_prompts(prompt_ids, vocab_size=draft.cfg.vocab_size, context=draft.cfg.max_position_embeddings,
                         max_new_tokens=n_tokens)


def _teacher_forced(rows: list[list[int]], y: np.ndarray,
                    pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mask, pos) of prompt + y per row, right-padded (causal: padding after a position does not change
    it); pos[r, t] is the position whose output predicts y[r, t]."""
    n_tokens = y.shape[1]
    lens = np.asarray([len(r) for r in rows])
    width = int(lens.max()) + n_tokens
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for r, p in enumerate(rows):
        seq = list(p) + [int(t) for t in y[r]]
        tokens[r, :len(seq)], mask[r, :len(seq)] = seq, True
    return tokens, mask, lens[:, None] - 1 + np.arange(n_tokens)[None, :]


@functools.partial(jax.jit, static_argnames=("tdef", "ddef", "spec"))
def _overlap_fn(tdef: nnx.GraphDef, tstate: nnx.State, ddef: nnx.GraphDef, dstate: nnx.State, tokens: jax.Array,
                mask: jax.Array, pos: jax.Array, sub: jax.Array | None, temperature: jax.Array, top_p: jax.Array,
                spec: _Spec) -> jax.Array:
    def filtered(model: DecoderLM, ids: jax.Array | None) -> jax.Array:
        h, _ = model.hidden(tokens, token_mask=mask)
        logits = model.logits(jnp.take_along_axis(h, pos[..., None], axis=1))
        if ids is None:
            return jax.nn.softmax(filter_logits(logits, temperature, top_p, spec), axis=-1)
        q = jax.nn.softmax(filter_logits(logits[..., ids], temperature, top_p, head_spec(spec, ids.shape[0])),
                           axis=-1)
        return on_vocab(q, ids, logits.shape[-1])

    p = filtered(nnx.merge(tdef, tstate), None)
    q = filtered(nnx.merge(ddef, dstate), sub)
    return jnp.sum(jnp.minimum(p, q), axis=-1)


def sampling_overlap(target: DecoderLM, draft: DecoderLM, prompt_ids: Sequence[Sequence[int]], n_tokens: int,
                     sampling: SamplingConfig, *, draft_vocab: Sequence[int] | np.ndarray | None = None,
                     pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(y, beta), both (b, n_tokens): the target's sampled continuation of each prompt (`sampling`, with its seed;
    EOS not treated specially) and beta[r, t] = sum_x min(p(x), q(x)) of the target's and the draft's distributions
    after prompt + y[r, :t], as the speculative loop filters them (temperature, top-k, top-p; the draft over
    `draft_vocab` if given): the probability that speculative sampling accepts a draft token there."""
    if sampling.temperature <= 0:
        raise GenerationError("sampling_overlap needs a temperature > 0; greedy acceptance is `greedy_agreement`")
    run = dataclasses.replace(sampling, max_new_tokens=n_tokens)  # SamplingConfig validates n_tokens
    rows = _checked_rows(target, draft, prompt_ids, n_tokens)
    y = np.asarray(Generator(target, pad_id=pad_id).run(rows, run).tokens, np.int32)
    tokens, mask, pos = _teacher_forced(rows, y, pad_id)
    tdef, tstate = nnx.split(target)
    ddef, dstate = nnx.split(draft)
    sub = None if draft_vocab is None else jnp.asarray(np.asarray(draft_vocab, np.int32))
    beta = _overlap_fn(tdef, tstate, ddef, dstate, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(pos), sub,
                       jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
                       _spec(sampling, target.cfg.vocab_size))
    return y, np.asarray(beta, np.float64)


def iid_prediction(k: int, alpha: float) -> AcceptancePrediction:
    """The i.i.d. model's statistics for per-draft acceptance probability `alpha` (module docstring): expectations,
    so no histogram and no round count (0)."""
    if not isinstance(k, int) or k < 1 or not 0.0 <= alpha <= 1.0:
        raise GenerationError(f"k must be an integer >= 1 and alpha in [0, 1], got {k!r} and {alpha!r}")
    accepted = sum(alpha ** j for j in range(1, k + 1))  # expected accepted drafts per round
    return AcceptancePrediction(k=k, acceptance_rate=accepted / k, tokens_per_round=1.0 + accepted, rounds=0,
                                accepted_hist=[], agreement=alpha)


def scored_mean(y: np.ndarray, values: np.ndarray, *, max_new_tokens: int,
                eos_ids: Sequence[int] = ()) -> tuple[float, int]:
    """(mean, count) of values[r, t] over the positions a speculative run scores: t = 1 .. max_new_tokens - 1 (the
    first token comes from prefill), up to and including each row's first EOS."""
    eos = set(int(e) for e in eos_ids)
    total, count = 0.0, 0
    for r in range(y.shape[0]):
        hits = [t for t in range(max_new_tokens) if int(y[r, t]) in eos]
        end = hits[0] + 1 if hits else max_new_tokens
        total += float(np.sum(values[r, 1:end]))
        count += max(0, end - 1)
    return (total / count if count else 0.0), count


def sampling_alpha(target: DecoderLM, draft: DecoderLM, prompt_ids: Sequence[Sequence[int]], *,
                   max_new_tokens: int, sampling: SamplingConfig, eos_ids: Sequence[int] = (),
                   draft_vocab: Sequence[int] | np.ndarray | None = None, pad_id: int = 0) -> tuple[float, int]:
    """(alpha, positions): speculative sampling's mean per-draft acceptance probability over these prompts'
    scored positions (`sampling_overlap`, `scored_mean`), for `iid_prediction`; batches pool by weighting each
    alpha with its positions."""
    y, beta = sampling_overlap(target, draft, prompt_ids, max_new_tokens, sampling, draft_vocab=draft_vocab,
                               pad_id=pad_id)
    alpha, n = scored_mean(y, beta, max_new_tokens=max_new_tokens, eos_ids=eos_ids)
    return min(1.0, alpha), n

def predict_greedy(y: np.ndarray, agree: np.ndarray, *, k: int, max_new_tokens: int,
                   eos_ids: Sequence[int] = ()) -> AcceptancePrediction:
    """Replays greedy speculative decoding's rounds (`speculative._speculate`) on `greedy_agreement`'s output:
    a row starts with the target's first token; each round accepts the drafts while they agree (at most k), emits
    those and the target's next token, and the row ends at EOS or max_new_tokens. Needs y / agree of at least
    max_new_tokens + k tokens (a last round may accept drafts past the end)."""
    if not isinstance(k, int) or k < 1:
        raise GenerationError(f"k must be an integer >= 1, got {k!r}")
    y, agree = np.asarray(y), np.asarray(agree, bool)
    if y.shape != agree.shape or y.ndim != 2 or y.shape[1] < max_new_tokens + k:
        raise GenerationError(f"y and agree must both be (rows, >= max_new_tokens + k = {max_new_tokens + k}), "
                              f"got {y.shape} and {agree.shape}")
    eos = set(int(e) for e in eos_ids)
    hist = [0] * (k + 1)
    rounds = 0
    for r in range(y.shape[0]):
        ntok, row_rounds = 1, 0
        done = int(y[r, 0]) in eos or max_new_tokens <= 1
        while not done:
            n = 0
            while n < k and agree[r, ntok + n]:
                n += 1
            hist[n] += 1
            row_rounds += 1
            emitted = [int(t) for t in y[r, ntok:ntok + n + 1]]
            ntok += n + 1
            done = any(t in eos for t in emitted) or ntok >= max_new_tokens
        rounds = max(rounds, row_rounds)
    scored = agree[:, 1:max_new_tokens]
    return _from_hist(k, hist, rounds, float(scored.mean()) if scored.size else 0.0)


def _from_hist(k: int, hist: list[int], rounds: int, agreement: float) -> AcceptancePrediction:
    """The statistics `SpeculativeDecoder.run` derives from its accepted-count histogram (row-rounds per count)."""
    row_rounds = sum(hist)
    accepted = sum(n * c for n, c in enumerate(hist))
    return AcceptancePrediction(k=k, acceptance_rate=accepted / max(1, k * row_rounds),
                                tokens_per_round=(accepted + row_rounds) / max(1, row_rounds), rounds=rounds,
                                accepted_hist=list(hist), agreement=agreement)


def pool(parts: Sequence[AcceptancePrediction], rows: Sequence[int]) -> AcceptancePrediction:
    """Predictions for batches of prompts (same k; `rows` prompts each) as one: counts add up, rounds is the
    longest batch's, agreement the mean over all rows (each scores as many tokens)."""
    if not parts or len(parts) != len(rows) or len({p.k for p in parts}) != 1:
        raise GenerationError("pool: give one prediction per batch, all for the same k")
    k = parts[0].k
    hist = [sum(p.accepted_hist[n] for p in parts) for n in range(k + 1)]
    agreement = sum(p.agreement * r for p, r in zip(parts, rows)) / max(1, sum(rows))
    return _from_hist(k, hist, max(p.rounds for p in parts), agreement)


def predict_acceptance(target: DecoderLM, draft: DecoderLM, prompt_ids: Sequence[Sequence[int]], *,
                       ks: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
                       draft_vocab: Sequence[int] | np.ndarray | None = None,
                       pad_id: int = 0) -> list[AcceptancePrediction]:
    """Greedy speculative decoding's statistics for each k in `ks`, from one `greedy_agreement` (module
    docstring)."""
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise GenerationError(f"ks must be integers >= 1, got {ks}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    y, agree = greedy_agreement(target, draft, prompt_ids, max_new_tokens + max(ks), draft_vocab=draft_vocab,
                                pad_id=pad_id)
    return [predict_greedy(y, agree, k=k, max_new_tokens=max_new_tokens, eos_ids=eos_ids) for k in ks]
