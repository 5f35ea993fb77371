"""Speculative decoding for Mamba/attention hybrids (Algorithm 2 of "The Mamba in the Llama").

A draft model (any `DecoderLM`: Llama, hybrid, pure Mamba) proposes k tokens one at a time; the target checks all
of them in a single forward pass (`verify`): attention layers write the chunk's K/V and attend to cache + chunk in
parallel, Mamba layers run `multistep` from their one cached state (one multistep-verify call: the Pallas kernel on
GPU) and hand back a `MambaChunk`: the state before the chunk and the chunk's inputs, not a state per token.
Acceptance keeps a prefix; `Pending.commit` then advances every cache by exactly that many tokens per row: attention
by masking slots, Mamba by one more multistep-verify call from the cached state with the accepted count (the state
after n steps is written, the k per-prefix states never are; one call for all of a model's Mamba2 layers,
`cache.advance_all`) and a slice of old conv window ++ chunk inputs.
No recurrent state per draft token exists at any point: a Mamba layer holds its cached state and, during a round,
the latest one. In inference copies (`generate.prepare_for_inference`) a verify chunk's b·(k+1) tokens go through
the plain decode step's fused kernels as rows where they fit them (`verify_residual` of `FusedAttention` /
`FusedMamba2`, `FusedMLP.norm_residual`; on GPUs once `generate.VERIFY_ROWS_GPU_VERIFIED`): a verify then costs
about what that many decode rows cost, and rounds as plain decoding does.

Round invariants (both kept per row):
- target: has consumed every committed token except the last, `x0`. It verifies [x0, d1..dk] (k+1 tokens), so
  logits j score d_{j+1} and logits k give the bonus token. With n accepted it keeps the prefix x0, d1..dn (n+1).
- draft: has consumed every committed token except the last two, `x_prev, x0`. It starts a round with a 2-token
  verify call on [x_prev, x0] (proposing d1), then k-1 single steps on d1..d_{k-1}; k+1 fed tokens, like the
  target. With n accepted it keeps x_prev, x0, d1..d_{n-1} (n+1). Lagging one token is what makes "all k accepted"
  cheap: d_k was never fed to the draft, and becomes next round's `x_prev` instead of costing an extra draft step.
  The first fed pair and (in a draft with Mamba layers) every single step run the verify path, so each Mamba
  layer's chunk grows by the step's inputs (a few hundred bytes per token), and commit rebuilds the kept state
  from the round's starting state.

Shared-slot KV layout with per-row acceptance (`models/cache.py`: one write index for the whole batch): a chunk of
k+1 tokens is written at slots [index, index+k+1) for every row; commit marks row r's slots past its kept count
invalid, advances the shared index by the *largest* kept count, and advances each row's own RoPE position by its
own count. Rows that kept fewer tokens thus leave invalid holes (masked out of attention, like left padding), and
RoPE stays exact because positions are per row, not per slot. Slots past the new index are overwritten next round.
With batch 1 there are never holes. With more rows, holes could outgrow the cache, so before a round that would not
fit, `compact` moves every row's valid slots to the front (a stable per-row gather: order, and so causality, is
kept). Finished rows (EOS or max_new_tokens) keep 0 tokens: their caches are frozen, so they use no more slots.

A reduced draft vocabulary (`draft_vocab`; FR-Spec, Zhao et al. 2025, does the same) lets the draft score only a
subset of ids: its LM head is then that many rows of its embedding / head matrix (gathered once), so a draft step
reads a fraction of the head it would otherwise read — with a large vocabulary the head is most of a small draft's
weights (Llama-3's 128 k ids at hidden 512: 131 MB in bf16 against ~29 MB for four Mamba2 layers with their MLPs).
Drafts then lie in the subset; the target still scores every id, so greedy output stays plain greedy decoding and
sampling stays exact (q is 0 outside the subset: the rule needs nothing more). What it costs is acceptance wherever
the target's token is outside the subset (`draft_vocabulary` says how the subset is picked and what it covers).

Sampling follows the standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): draft token
d ~ q is accepted with probability min(1, p(d)/q(d)); at the first rejection the correction is drawn from
norm(max(0, p - q)); if all k are accepted the bonus token is drawn from p. p and q are the *filtered*
distributions (temperature, top-k, top-p applied as `generate.sample_logits` applies them), so the output is
distributed exactly as the target's own sampling with the same options. Greedy keeps the longest prefix equal to
the target's argmax plus the target's argmax after it, so it reproduces plain greedy decoding token for token.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_llama_jax.errors import GenerationError
from mamba_llama_jax.inference.generate import (SamplingConfig, _round_up, _spec, _Spec, check_prompts, decode_jit,
                                                 greedy_ids, left_pad, prepare_for_inference)
from mamba_llama_jax.models.cache import DecodeState, KVCache, MambaChunk, advance_all
from mamba_llama_jax.models.llama import DecoderLM
from pallas_kernels.decode_attention import MAX_BLOCK
from pallas_kernels.lm_head_argmax import lm_head_argmax

# --------------------------------------------------------------------------------------------- pending state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pending:
    """A cache after a verify-style chunk, before acceptance.

    state: the cache with the whole chunk written (index, valid, positions advanced by the chunk); its Mamba
      layers are `MambaChunk`s (the cache before the chunk, the chunk's inputs, the cache after all of it).
    start: () the slot of the chunk's first token. start_positions: (b,) RoPE positions before the chunk.
    """

    state: DecodeState
    start: jax.Array
    start_positions: jax.Array

    def commit(self, keep: jax.Array) -> DecodeState:
        """The cache advanced by `keep` (b,) tokens of the chunk per row (0 <= keep <= chunk length)."""
        keep = keep.astype(jnp.int32)
        st = self.state
        rel = jnp.arange(st.slots, dtype=jnp.int32)[None, :] - self.start
        in_chunk = (rel >= 0) & (self.start + rel < st.index)
        valid = jnp.where(in_chunk, rel < keep[:, None], st.valid)
        layers = list(st.layers)
        mamba = [i for i, c in enumerate(layers) if isinstance(c, MambaChunk)]
        for i, c in zip(mamba, advance_all([layers[i] for i in mamba], keep)):
            layers[i] = c
        return DecodeState(tuple(layers), self.start + jnp.max(keep), valid, self.start_positions + keep)


def verify_hidden(model: DecoderLM, tokens: jax.Array, cache: DecodeState) -> tuple[jax.Array, Pending]:
    """One forward over t real tokens per row from `cache`: final-norm hidden states (b, t, D) and the pending
    state (a caller that needs logits at some positions only takes the LM head there)."""
    h, state = model.hidden(tokens, cache=cache, verify=True)
    return h, Pending(state, cache.index, cache.positions)


def verify(model: DecoderLM, tokens: jax.Array, cache: DecodeState) -> tuple[jax.Array, Pending]:
    """`verify_hidden` with fp32 logits (b, t, V) for every position."""
    h, pending = verify_hidden(model, tokens, cache)
    return model.logits(h), pending


def _latest(state: DecodeState) -> DecodeState:
    """A pending state as if the whole chunk were accepted: every Mamba layer's cache after the chunk."""
    layers = tuple(c.latest if isinstance(c, MambaChunk) else c for c in state.layers)
    return dataclasses.replace(state, layers=layers)


def compact(state: DecodeState) -> DecodeState:
    """Every row's valid KV slots moved to the front, in order; the shared index becomes the largest row count.

    Positions are untouched (RoPE was applied when K was written) and Mamba states do not live in slots.
    """
    order = jnp.argsort(~state.valid, axis=1, stable=True)  # valid slots first, each group in slot order
    count = jnp.sum(state.valid, axis=1, dtype=jnp.int32)
    take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    layers = tuple(KVCache(take(c.k), take(c.v)) if isinstance(c, KVCache) else c for c in state.layers)
    valid = jnp.arange(state.slots, dtype=jnp.int32)[None, :] < count[:, None]
    return DecodeState(layers, jnp.max(count), valid, state.positions)


# ---------------------------------------------------------------------------------------------- distributions


def filter_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, spec: _Spec) -> jax.Array:
    """Logits (..., V) of the distribution `generate.sample_logits` samples from: temperature applied, tokens
    outside top-k / top-p set to -inf (the same kept set, ties included, since the same top_k/sort picks it).
    Written so that `sample_logits` could become `categorical(filter_logits(...))`."""
    logits = logits.astype(jnp.float32) / temperature
    if spec.top_k == 0 and not spec.use_top_p:
        return logits
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    if spec.top_k:
        vals, idx = jax.lax.top_k(flat, spec.top_k)
    else:
        idx = jnp.argsort(-flat, axis=-1)
        vals = jnp.take_along_axis(flat, idx, axis=-1)
    if spec.use_top_p:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(before < top_p, vals, -jnp.inf)
    rows = jnp.arange(flat.shape[0])[:, None]
    return jnp.full_like(flat, -jnp.inf).at[rows, idx].set(vals).reshape(shape)


def _proposed(drafts: jax.Array, drafted: jax.Array | None) -> jax.Array:
    """(b, k) whether column j is one of the row's proposed drafts (j < drafted; all when drafted is None)."""
    if drafted is None:
        return jnp.ones(drafts.shape, bool)
    return jnp.arange(drafts.shape[1])[None, :] < drafted[:, None]


def accept_greedy(target_logits: jax.Array, drafts: jax.Array,
                  drafted: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """target_logits (b, k+1, V), drafts (b, k) of which each row proposed its first drafted[r] (None: all k) ->
    (accepted count n (b,), the target's token after them (b,))."""
    return accept_best(jnp.argmax(target_logits, axis=-1).astype(jnp.int32), drafts, drafted)


def accept_best(best: jax.Array, drafts: jax.Array, drafted: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`accept_greedy` from the target's greedy ids (b, k+1) instead of its logits."""
    ok = (drafts == best[:, :-1]) & _proposed(drafts, drafted)
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def accept_sampling(p: jax.Array, q: jax.Array, drafts: jax.Array, key: jax.Array,
                    drafted: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Speculative-sampling acceptance. p (b, k+1, V) target probabilities, q (b, k, V) the draft's (drafts were
    sampled from q; rows proposed their first drafted[r], None: all k, and q is 0 past them). Returns (accepted
    count n, the correction — or bonus when n = the proposed count — token)."""
    b, k = drafts.shape
    ku, kc = jax.random.split(key)
    pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(ku, (b, k), jnp.float32)
    ok = (u * qd < pd) & _proposed(drafts, drafted)  # u < p/q without dividing; qd > 0 for a token q sampled
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    # past the proposed drafts (n = their count) q is 0, so the residual is p itself: the bonus token
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    pick = lambda a: jnp.take_along_axis(a, n[:, None, None], axis=1)[:, 0]
    pn = pick(p)
    resid = jnp.maximum(pn - pick(q_pad), 0.0)
    # p == q to the last bit (the target drafting for itself) leaves no residual mass, but then a rejection
    # has probability 0 anyway; fall back to p so the draw is still well defined.
    resid = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, pn)
    c = jax.random.categorical(kc, jnp.log(resid), axis=-1).astype(jnp.int32)
    return n, c


# ------------------------------------------------------------------------------------------------ one round


def _pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
          spec: _Spec) -> tuple[jax.Array, jax.Array | None]:
    """(token, its filtered probabilities or None when greedy) from (b, V) logits."""
    if spec.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    f = filter_logits(logits, temperature, top_p, spec)
    return jax.random.categorical(key, f, axis=-1).astype(jnp.int32), jax.nn.softmax(f, axis=-1)


DraftHead = tuple[jax.Array, jax.Array]  # (ids (n,) int32, rows (n, D) of the head matrix): a reduced vocabulary


def draft_logits(model: DecoderLM, h: jax.Array, head: DraftHead | None) -> jax.Array:
    """fp32 logits of final-norm hidden states (..., D): over every id (..., V), or over `head`'s ids (..., n)."""
    if head is None:
        return model.logits(h)
    rows = head[1]
    return jnp.einsum("...d,nd->...n", h.astype(rows.dtype), rows, preferred_element_type=jnp.float32)


def head_spec(spec: _Spec, n_ids: int | None) -> _Spec:
    """The filter of a draft head over `n_ids` ids (None: the whole vocabulary): top-k cannot exceed the head."""
    if n_ids is None or spec.top_k <= n_ids:
        return spec
    return dataclasses.replace(spec, top_k=n_ids)


def on_vocab(q: jax.Array, ids: jax.Array, vocab_size: int) -> jax.Array:
    """Probabilities over a head's `ids` (..., n) as probabilities over the whole vocabulary (..., V), 0 elsewhere:
    the rejection rule compares them with the target's."""
    return jnp.zeros(q.shape[:-1] + (vocab_size,), q.dtype).at[..., ids].set(q)


def _draft_pick(model: DecoderLM, h: jax.Array, head: DraftHead | None, key: jax.Array, temperature: jax.Array,
                top_p: jax.Array, spec: _Spec,
                confidence: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The draft's token (b,), filtered probabilities over the whole vocabulary (b, V) (None when greedy) and, with
    `confidence`, its top probability (b,) (else None), from final-norm hidden states (b, D): over every id, or
    over `head`'s ids only."""
    if spec.greedy and not confidence:  # ids without logits, as plain greedy decoding takes them
        if head is None:
            return greedy_ids(model, h), None, None
        return head[0][lm_head_argmax(h.astype(head[1].dtype), head[1])], None, None
    logits = draft_logits(model, h, head)
    tok, q = _pick(logits, key, temperature, top_p, head_spec(spec, None if head is None else head[0].shape[0]))
    conf = None
    if confidence:  # greedy: the softmax's largest entry, 1 / sum(exp(l - max l)); sampling: the largest of q
        conf = (1.0 / jnp.sum(jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), axis=-1) if q is None
                else jnp.max(q, axis=-1))
    if head is None:
        return tok, q, conf
    ids = head[0]
    return ids[tok], None if q is None else on_vocab(q, ids, model.cfg.vocab_size), conf


def draft_round(model: DecoderLM, cache: DecodeState, x_prev: jax.Array, x0: jax.Array, key: jax.Array,
                temperature: jax.Array, top_p: jax.Array, *, k: int, spec: _Spec, head: DraftHead | None = None,
                stop: float = 0.0) -> tuple[jax.Array, jax.Array | None, Pending, jax.Array]:
    """Up to k draft tokens: (drafts (b, k), their filtered draft probabilities (b, k, V) (None when greedy; 0 past
    a row's count), the draft's pending state over the fed tokens [x_prev, x0, d1..] (see the module docstring),
    and how many of the k each row proposes (b,) (1..k)). `head`: a reduced draft vocabulary (`SpeculativeDecoder`'s
    `draft_vocab`), None for every id.

    `stop` (static; 0 = always k): a row stops proposing at the first token after d1 to which its draft gives a top
    probability below `stop`, and the draft steps stop when every row has stopped (the k-token verify is one call
    whatever the count, while each draft step is a launch-bound pass: at low acceptance most of k steps are
    wasted). Columns past a row's count hold filler tokens that acceptance never takes; the stopping rule depends
    on the draft alone, so greedy output and the sampling rule stay exact."""
    h, first = verify_hidden(model, jnp.stack([x_prev, x0], axis=1), cache)
    d1, q1, _ = _draft_pick(model, h[:, 1], head, jax.random.fold_in(key, 0), temperature, top_p, spec)
    b = x0.shape[0]
    if k == 1:
        return d1[:, None], None if q1 is None else q1[:, None], first, jnp.ones((b,), jnp.int32)

    # Mamba layers take the 1-token steps as verify chunks: they also return the step's inputs, all that commit
    # needs of it. A draft without Mamba layers keeps the plain decode step (and its fused kernels).
    mamba = any(isinstance(c, MambaChunk) for c in first.state.layers)
    early = stop > 0

    def step(tok: jax.Array, st: DecodeState, i: jax.Array) -> tuple[Any, ...]:
        """Feeds d_i, proposes d_{i+1}."""
        h, st = model.hidden(tok[:, None], cache=st, verify=mamba)
        nxt, q, conf = _draft_pick(model, h[:, 0], head, jax.random.fold_in(key, i), temperature, top_p, spec,
                                   confidence=early)
        inputs = tuple(c.inputs() if isinstance(c, MambaChunk) else None for c in st.layers)
        return nxt, q, conf, _latest(st), inputs

    # Step 1 outside the loop: its outputs give the buffers' shapes (steps 1..k-1 fill rows 0..k-2).
    d2, q2, conf, st1, in1 = step(d1, _latest(first.state), jnp.int32(1))
    alive = jnp.ones((b,), bool) if conf is None else conf >= stop
    buf = lambda a: None if a is None else jnp.zeros((k - 1,) + a.shape, a.dtype).at[0].set(a)
    carry = (jnp.int32(2), d2, st1, alive, 1 + alive.astype(jnp.int32), buf(d2), buf(q2),
             jax.tree.map(buf, in1, is_leaf=lambda a: a is None))

    def body(c: tuple[Any, ...]) -> tuple[Any, ...]:
        i, tok, st, alive, count, ds, qs, ins = c
        nxt, q, conf, st, inputs = step(tok, st, i)
        if conf is not None:
            alive = alive & (conf >= stop)
        put = lambda buf, a: None if a is None else jax.lax.dynamic_update_index_in_dim(buf, a, i - 1, 0)
        return (i + 1, nxt, st, alive, count + alive.astype(jnp.int32), put(ds, nxt),
                None if qs is None else put(qs, q),
                jax.tree.map(put, ins, inputs, is_leaf=lambda a: a is None))

    cond = (lambda c: (c[0] < k) & jnp.any(c[3])) if early else (lambda c: c[0] < k)
    _, _, last, _, count, ds, qs, inputs = jax.lax.while_loop(cond, body, carry)
    layers = []
    for i, c in enumerate(last.layers):
        pend = first.state.layers[i]
        if isinstance(pend, MambaChunk):  # [x_prev, x0] ++ [d1 .. d_{k-1}]: inputs (k-1, b, 1, ...) -> (b, k-1, ...)
            steps = tuple(jnp.moveaxis(a, 0, 1)[:, :, 0] for a in inputs[i])
            layers.append(pend.extend(steps, c))
        else:
            layers.append(c)
    pending = Pending(dataclasses.replace(last, layers=tuple(layers)), first.start, first.start_positions)
    drafts = jnp.concatenate([d1[:, None], jnp.moveaxis(ds, 0, 1)], axis=1)
    probs = None
    if q1 is not None:
        probs = jnp.concatenate([q1[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)
        probs = jnp.where(jnp.arange(k)[None, :, None] < count[:, None, None], probs, 0.0)
    return drafts, probs, pending, count


# ------------------------------------------------------------------------------------------ the jitted loop


@decode_jit(static_argnames=("target_def", "draft_def", "k", "spec", "n_new", "eos", "pad_id", "slots", "stop"))
def _speculate(target_def: nnx.GraphDef, target_state: nnx.State, draft_def: nnx.GraphDef, draft_state: nnx.State,
               draft_head: DraftHead | None, tokens: jax.Array, mask: jax.Array, key: jax.Array,
               temperature: jax.Array, top_p: jax.Array, *, k: int, spec: _Spec, n_new: int, eos: tuple[int, ...],
               pad_id: int, slots: int, stop: float = 0.0) -> dict[str, Any]:
    """Prefill both models, then draft-verify-accept rounds in one `while_loop` until every row is done."""
    target = nnx.merge(target_def, target_state)
    draft = nnx.merge(draft_def, draft_state)
    b, plen = tokens.shape
    eos_arr = jnp.asarray(eos, jnp.int32)

    def is_eos(t: jax.Array) -> jax.Array:
        return jnp.isin(t, eos_arr) if eos else jnp.zeros(t.shape, bool)

    tc = target.init_cache(b, slots)
    h, tc = target.hidden(tokens, token_mask=mask, cache=tc, prefill=True)
    if spec.greedy:  # the target's ids as plain greedy decoding takes them (`greedy_ids`)
        first = greedy_ids(target, h[:, -1])
    else:
        first, _ = _pick(target.logits(h[:, -1]), jax.random.fold_in(key, 0), temperature, top_p, spec)
    dc = draft.init_cache(b, slots)
    if plen > 1:  # the draft lags one token: it holds the prompt but its last token
        _, dc = draft.hidden(tokens[:, :-1], token_mask=mask[:, :-1], cache=dc, prefill=True)

    width = n_new + k + 1  # a row still running has < n_new tokens and gains at most k+1 in a round
    out = jnp.full((b, width), pad_id, jnp.int32).at[:, 0].set(first)
    ntok = jnp.ones((b,), jnp.int32)
    done = is_eos(first) | (n_new <= 1)
    hist = jnp.zeros((k + 1,), jnp.int32)
    carry = (jnp.int32(0), tokens[:, -1], first, tc, dc, out, ntok, done, hist, jnp.int32(0), jnp.int32(0))
    j = jnp.arange(k + 1, dtype=jnp.int32)[None, :]

    def fit(st: DecodeState) -> tuple[DecodeState, jax.Array]:
        if b == 1:  # one row never leaves holes: index == its own length
            return st, jnp.int32(0)
        full = st.index + (k + 1) > slots
        return jax.lax.cond(full, compact, lambda s: s, st), full.astype(jnp.int32)

    def body(c: Any) -> Any:
        r, x_prev, x0, tc, dc, out, ntok, done, hist, compactions, proposed = c
        (tc, ct), (dc, cd) = fit(tc), fit(dc)
        compactions = compactions + ct + cd
        rk = jax.random.fold_in(key, r + 1)
        kd, ka = jax.random.split(rk)
        drafts, q, dpend, drafted = draft_round(draft, dc, x_prev, x0, kd, temperature, top_p, k=k, spec=spec,
                                                head=draft_head, stop=stop)
        th, tpend = verify_hidden(target, jnp.concatenate([x0[:, None], drafts], axis=1), tc)
        if spec.greedy:
            best = greedy_ids(target, th.reshape(b * (k + 1), th.shape[-1])).reshape(b, k + 1)
            n, corr = accept_best(best, drafts, drafted)
        else:
            p = jax.nn.softmax(filter_logits(target.logits(th), temperature, top_p, spec), axis=-1)
            n, corr = accept_sampling(p, q, drafts, ka, drafted)
        active = ~done
        proposed = proposed + jnp.sum(jnp.where(active, drafted, 0))
        keep = jnp.where(active, n + 1, 0)
        tc, dc = tpend.commit(keep), dpend.commit(keep)

        # Emitted this round: d1..dn then the correction; cut after the first EOS.
        pad = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        emit = jnp.where(j < n[:, None], pad, corr[:, None])
        hit = is_eos(emit) & (j <= n[:, None])
        first_eos = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), k + 1)
        m = jnp.where(active, jnp.minimum(n + 1, first_eos + 1), 0)
        cols = jnp.where(j < m[:, None], ntok[:, None] + j, width)  # out of range: dropped
        out = out.at[jnp.arange(b)[:, None], cols].set(emit, mode="drop")
        ntok = ntok + m
        done = done | (first_eos <= k) | (ntok >= n_new)
        hist = hist + jnp.zeros_like(hist).at[n].add(active.astype(jnp.int32))
        x_prev = jnp.where(active, jnp.where(n > 0, jnp.take_along_axis(pad, jnp.maximum(n - 1, 0)[:, None],
                                                                        axis=1)[:, 0], x0), x_prev)
        x0 = jnp.where(active, corr, x0)
        return r + 1, x_prev, x0, tc, dc, out, ntok, done, hist, compactions, proposed

    r, *_, out, ntok, done, hist, compactions, proposed = jax.lax.while_loop(lambda c: ~jnp.all(c[7]), body, carry)
    return dict(tokens=out[:, :n_new], rounds=r, accepted_hist=hist, compactions=compactions, proposed=proposed)


# ------------------------------------------------------------------------------------------------- front end


@dataclasses.dataclass
class SpecStats:
    """acceptance_rate: accepted draft tokens / proposed draft tokens, over rows still running in each round.
    rounds: draft-verify rounds run (each is one target forward). accepted_hist[n]: (row, round) pairs in which
    exactly n drafts were accepted. tokens_per_round: mean tokens a running row gains per round.
    drafts_per_round: mean drafts a running row proposes per round (k unless `stop` ends drafting early).
    compactions: KV-cache compactions (target + draft) forced by per-row holes; always 0 at batch 1."""

    acceptance_rate: float
    rounds: int
    k: int
    accepted_hist: list[int]
    tokens_per_round: float
    compactions: int
    seconds: float
    drafts_per_round: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def draft_vocabulary(vocab_size: int, size: int, *, keep: Sequence[int] = ()) -> np.ndarray:
    """Sorted ids for a reduced draft vocabulary: the first `size` ids and every id in `keep` (end-of-turn ids:
    Llama 3 numbers its special tokens last).

    Why the first ids: byte-level BPE vocabularies number tokens in merge order and SentencePiece ones by score,
    both close to frequency order. Measured for SmolLM2-135M-Instruct (49,152 ids; its greedy answers to 32
    held-out prompts, 3,798 tokens, fp32 on the CPU): the first 4,096 / 8,192 / 16,384 / 32,768 ids hold 77.4 /
    87.2 / 93.4 / 98.4 % of them, the same sizes chosen by frequency in its answers to 64 training prompts 78.6 /
    88.0 / 93.9 / 98.5 % (`benchmarks/results/draft_vocab.md`). That share bounds the acceptance rate; a
    vocabulary ordered otherwise wants its own ids (`SpeculativeDecoder(draft_vocab=...)` takes any)."""
    if not isinstance(size, (int, np.integer)) or not 0 < size <= vocab_size:
        raise GenerationError(f"the draft vocabulary size must be in 1..{vocab_size}, got {size!r}")
    bad = [int(t) for t in keep if not 0 <= int(t) < vocab_size]
    if bad:
        raise GenerationError(f"ids to keep in the draft vocabulary must be in 0..{vocab_size - 1}, got {bad}")
    return np.union1d(np.arange(int(size)), np.asarray(list(keep), np.int64)).astype(np.int32)


def _draft_head(draft_def: nnx.GraphDef, draft_state: nnx.State, ids: Any, vocab_size: int) -> DraftHead:
    """(ids, their rows of the prepared draft's head matrix), gathered once."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise GenerationError(f"draft_vocab must be a non-empty 1-D sequence of token ids, got shape {arr.shape} "
                              f"of {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size or np.unique(arr).size != arr.size:
        raise GenerationError(f"draft_vocab must hold distinct ids in 0..{vocab_size - 1}")
    model = nnx.merge(draft_def, draft_state)
    ids_j = jnp.asarray(arr, jnp.int32)
    if model.lm_head is None:
        rows = model.embed_tokens.embedding[...][ids_j]
    else:
        rows = model.lm_head.kernel[...][:, ids_j].T
    return ids_j, rows.astype(jnp.dtype(model.cfg.dtype))


class SpeculativeDecoder:
    """A target and a draft prepared once (weights in the compute dtype, on device) for repeated calls.

    Weights are captured at construction, as in `generate.Generator`. `draft_vocab`: the ids the draft may propose
    (`draft_vocabulary` builds the usual choice), or None for all. `slot_multiple`: the KV caches' length is rounded
    up to a multiple of it (default the attention kernels' longest block, `decode_attention.MAX_BLOCK`: whole
    blocks, the shortest serial chain a program walks; a few hundred bytes a slot and layer more at most).
    """

    def __init__(self, target: DecoderLM, draft: DecoderLM, *, prompt_multiple: int = 16, pad_id: int = 0,
                 fuse: bool = True, draft_vocab: Sequence[int] | np.ndarray | None = None,
                 slot_multiple: int = MAX_BLOCK):
        if not isinstance(slot_multiple, int) or slot_multiple < 1:
            raise GenerationError(f"slot_multiple (the KV caches' length is rounded to it) must be an integer >= 1, "
                                  f"got {slot_multiple!r}")
        if draft.cfg.vocab_size != target.cfg.vocab_size:
            raise GenerationError(f"draft vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                                  f"({target.cfg.vocab_size}): the draft must share the target's tokenizer")
        self.cfg = target.cfg
        self.max_positions = min(target.cfg.max_position_embeddings, draft.cfg.max_position_embeddings)
        self.target_def, self.target_state, _ = prepare_for_inference(target, fuse=fuse)
        self.draft_def, self.draft_state, _ = prepare_for_inference(draft, fuse=fuse)
        self.draft_head = None if draft_vocab is None else _draft_head(self.draft_def, self.draft_state,
                                                                       draft_vocab, self.cfg.vocab_size)
        self.prompt_multiple = max(1, prompt_multiple)
        self.slot_multiple = slot_multiple
        self.pad_id = int(pad_id)

    def _batch(self, prompt_ids: Sequence[Sequence[int]], n_new: int) -> tuple[np.ndarray, np.ndarray]:
        rows = check_prompts(prompt_ids, vocab_size=self.cfg.vocab_size, context=self.max_positions,
                             max_new_tokens=n_new)
        return left_pad(rows, self.prompt_multiple, self.pad_id)

    def run(self, prompt_ids: Sequence[Sequence[int]], *, k: int = 4, sampling: SamplingConfig | None = None,
            max_new_tokens: int | None = None, eos_ids: Sequence[int] = (), slots: int | None = None,
            stop: float = 0.0) -> tuple[np.ndarray, list[int], SpecStats]:
        """(tokens (b, max_new_tokens) with `pad_id` after EOS, new tokens per row excluding EOS, stats).

        `stop` in [0, 1): a row proposes fewer than k drafts in a round once its draft's top probability for the
        next one falls below `stop` (`draft_round`; 0 = always k). `slots` overrides the KV-cache length (tests
        use it to force compaction); by default it fits every round.
        """
        if not isinstance(k, int) or k < 1:
            raise GenerationError(f"k (draft tokens per round) must be an integer >= 1, got {k!r}")
        if not isinstance(stop, (int, float)) or not 0.0 <= stop < 1.0:
            raise GenerationError(f"stop (the draft's confidence threshold) must be in [0, 1), got {stop!r}")
        sampling = sampling or SamplingConfig()
        n_new = sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(n_new, int) or n_new <= 0:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {n_new!r}")
        tokens, mask = self._batch(prompt_ids, n_new)
        # A running row holds < prompt + n_new + k tokens after compaction, and a round needs k+1 free slots.
        need = tokens.shape[1] + n_new + 2 * (k + 1)
        slots = _round_up(need, self.slot_multiple) if slots is None else int(slots)
        if slots < tokens.shape[1] + 2 * (k + 1):
            raise GenerationError(f"slots={slots} is too small for a {tokens.shape[1]}-token prompt and k={k}")
        spec = _spec(sampling, self.cfg.vocab_size)
        eos = tuple(sorted({int(e) for e in eos_ids}))
        t0 = time.perf_counter()
        res = _speculate(self.target_def, self.target_state, self.draft_def, self.draft_state, self.draft_head,
                         jnp.asarray(tokens),
                         jnp.asarray(mask), jax.random.key(sampling.seed),
                         jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p), k=k, spec=spec,
                         n_new=n_new, eos=eos, pad_id=self.pad_id, slots=slots, stop=float(stop))
        res = jax.device_get(res)
        seconds = time.perf_counter() - t0
        out = np.asarray(res["tokens"])
        lengths = []
        for r in range(out.shape[0]):
            hits = np.flatnonzero(np.isin(out[r], eos)) if eos else []
            lengths.append(int(hits[0]) if len(hits) else n_new)
        hist = [int(x) for x in res["accepted_hist"]]
        row_rounds = sum(hist)
        accepted = sum(n * c for n, c in enumerate(hist))
        proposed = int(res["proposed"])
        stats = SpecStats(acceptance_rate=accepted / max(1, proposed), rounds=int(res["rounds"]), k=k,
                          accepted_hist=hist, tokens_per_round=(accepted + row_rounds) / max(1, row_rounds),
                          compactions=int(res["compactions"]), seconds=seconds,
                          drafts_per_round=proposed / max(1, row_rounds))
        return out, lengths, stats


def speculative_generate(target: DecoderLM, draft: DecoderLM, prompt_ids: Sequence[Sequence[int]], *, k: int = 4,
                         sampling: SamplingConfig | None = None, max_new_tokens: int | None = None,
                         eos_ids: Sequence[int] = (), pad_id: int = 0,
                         draft_vocab: Sequence[int] | np.ndarray | None = None,
                         stop: float = 0.0) -> tuple[list[list[int]], SpecStats]:
    """New token ids per prompt (EOS excluded) from speculative decoding of `target` with `draft`, and stats.

    Same distribution as `generate.generate_ids(target, ...)` with the same sampling options (identical tokens
    when greedy). `max_new_tokens` defaults to `sampling.max_new_tokens`. Builds a `SpeculativeDecoder` each call;
    keep one for repeated use.
    """
    dec = SpeculativeDecoder(target, draft, pad_id=pad_id, draft_vocab=draft_vocab)
    out, lengths, stats = dec.run(prompt_ids, k=k, sampling=sampling, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                  stop=stop)
    return [out[r, :n].tolist() for r, n in enumerate(lengths)], stats
