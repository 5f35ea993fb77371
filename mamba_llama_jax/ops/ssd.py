"""Mamba2 state-space model (SSD) reference ops, pure JAX: the ground truth for the Pallas kernels.

Shape legend: b batch, l length, h heads, p head size (x), g groups of B/C (g divides h; head `hh` reads group
`hh // (h // g)`), n state size, c chunks, t position inside a chunk, k decode steps.

Recurrence, per head (fp32 throughout, output cast back to x.dtype):
    dt' = softplus(dt + dt_bias) if dt_softplus else dt + dt_bias
    S_t = exp(dt'_t * A) * S_{t-1} + dt'_t * x_t ⊗ B_t            S: (p, n)
    y_t = S_t · C_t + D * x_t
with A <= 0 (A = -exp(A_log)) and dt' >= 0, so every exponent taken is non-positive.

Packed sequences: `segment_ids` (b, l); wherever the id changes from one position to the next a new document
starts and the state restarts from zero. `initial_state` belongs to the first document of each row only.

All four implementations share one signature (bar `ssd_multistep` and `ssd_verify`, which continue from a cached
state) and agree to fp32 round-off; `tests/ops/test_ssd.py` pins that, forward and gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


# ------------------------------------------------------------------------------------------------------ helpers


def discretize(dt: jax.Array, bias: jax.Array | None, softplus: bool, B: jax.Array, C: jax.Array,
               channels: int, what: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """fp32 step sizes (+ bias, softplus) and B, C expanded from their groups to `channels` (heads or inner
    channels) along axis 2; shared by the SSD and the selective-scan references."""
    g = B.shape[2]
    if channels % g or C.shape[2] != g:
        raise ValueError(f"B/C groups ({B.shape[2]}, {C.shape[2]}) must be equal and divide the {what} ({channels})")
    dtf = dt.astype(F32)
    if bias is not None:
        dtf = dtf + bias.astype(F32)
    if softplus:
        dtf = jax.nn.softplus(dtf)
    rep = channels // g
    return dtf, jnp.repeat(B.astype(F32), rep, axis=2), jnp.repeat(C.astype(F32), rep, axis=2)


def _prep(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array | None,
          dt_bias: jax.Array | None, dt_softplus: bool):
    """fp32 copies with dt discretised and B, C expanded from groups to heads: (b,l,h,n)."""
    dtf, Bh, Ch = discretize(dt, dt_bias, dt_softplus, B, C, x.shape[2], "heads")
    Df = None if D is None else D.astype(F32)
    return x.astype(F32), dtf, A.astype(F32), Bh, Ch, Df


def segment_starts(segment_ids: jax.Array | None, b: int, l: int) -> jax.Array:
    """(b, l) bool: True where a new document begins *after* position 0 (position 0 continues the initial state)."""
    if segment_ids is None:
        return jnp.zeros((b, l), bool)
    s = segment_ids
    return jnp.concatenate([jnp.zeros((b, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)


def _skip(y: jax.Array, x: jax.Array, D: jax.Array | None) -> jax.Array:
    return y if D is None else y + x * D[:, None]


# --------------------------------------------------------------------------------------------------- sequential


def ssd_sequential(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                   D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
                   initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                   chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """The recurrence one step at a time (`lax.scan` over l). `chunk_size` is accepted and ignored.

    Returns y (b,l,h,p) in x.dtype and the final state (b,h,p,n) fp32.
    """
    del chunk_size
    b, l, h, p = x.shape
    n = B.shape[-1]
    xf, dtf, Af, Bh, Ch, Df = _prep(x, dt, A, B, C, D, dt_bias, dt_softplus)
    keep = 1.0 - segment_starts(segment_ids, b, l).astype(F32)  # (b,l): 0 zeroes the carried state
    s0 = jnp.zeros((b, h, p, n), F32) if initial_state is None else initial_state.astype(F32)

    def step(s, inp):
        xt, dtt, bt, ct, kt = inp
        decay = jnp.exp(dtt * Af) * kt[:, None]  # (b,h)
        s = decay[:, :, None, None] * s + (dtt[:, :, None] * xt)[..., None] * bt[:, :, None, :]
        return s, jnp.einsum("bhpn,bhn->bhp", s, ct)

    tm = lambda a: jnp.moveaxis(a, 1, 0)
    s, ys = jax.lax.scan(step, s0, (tm(xf), tm(dtf), tm(Bh), tm(Ch), tm(keep)))
    y = _skip(jnp.moveaxis(ys, 0, 1), xf, Df)
    return y.astype(x.dtype), s


# -------------------------------------------------------------------------------------------------- associative


def ssd_associative(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                    D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
                    initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                    chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """The recurrence as a parallel prefix (`lax.associative_scan`) over (decay, input) pairs.

    Materialises every state (b,l,h,p,n): a reference for short sequences, not a production path.
    """
    del chunk_size
    b, l, h, p = x.shape
    xf, dtf, Af, Bh, Ch, Df = _prep(x, dt, A, B, C, D, dt_bias, dt_softplus)
    keep = 1.0 - segment_starts(segment_ids, b, l).astype(F32)
    decay = jnp.exp(dtf * Af[None, None]) * keep[:, :, None]  # (b,l,h)
    inp = (dtf[..., None] * xf)[..., None] * Bh[:, :, :, None, :]  # (b,l,h,p,n)
    if initial_state is not None:
        # Folding S_{-1} into the first input keeps the scan itself initial-state free.
        inp = inp.at[:, 0].add(decay[:, 0, :, None, None] * initial_state.astype(F32))
    states = linear_recurrence_associative(decay[..., None, None], inp)
    y = _skip(jnp.einsum("blhpn,blhn->blhp", states, Ch), xf, Df)
    return y.astype(x.dtype), states[:, -1]


def linear_recurrence_associative(a: jax.Array, b: jax.Array) -> jax.Array:
    """h_t = a_t * h_{t-1} + b_t along axis 1 from h_{-1} = 0 (a broadcasts against b)."""

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    return jax.lax.associative_scan(combine, (jnp.broadcast_to(a, b.shape), b), axis=1)[1]


# ------------------------------------------------------------------------------------------------------ chunked


def _segsum(a: jax.Array) -> jax.Array:
    """(..., t) -> (..., t, t): out[i, j] = sum_{j < k <= i} a_k for i >= j, -inf above the diagonal.

    Summing each window directly (a masked cumsum) rather than differencing one long cumsum avoids catastrophic
    cancellation, and since every a_k <= 0 every finite entry is <= 0: exp never overflows.
    """
    t = a.shape[-1]
    rep = jnp.broadcast_to(a[..., :, None], a.shape + (t,))  # rep[i, j] = a_i
    strict = jnp.tril(jnp.ones((t, t), bool), -1)
    out = jnp.cumsum(jnp.where(strict, rep, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), out, -jnp.inf)


def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
                initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """Mamba2's state-space duality, chunk by chunk.

    1. inside a chunk: y = (C Bᵀ ∘ L) (dt x), L the causal decay mask (zero across documents);
    2. each chunk's own contribution to the state at its end;
    3. a scan over chunks passes states on (a chunk holding a document start passes nothing through);
    4. the state entering a chunk, decayed to each position and read out by C, is added to y.
    Lengths that are not a multiple of `chunk_size` are padded with dt = 0 (decay 1, no input): the state is
    unchanged by padding, so the final state is exact.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    xf, dtf, Af, Bh, Ch, Df = _prep(x, dt, A, B, C, D, dt_bias, dt_softplus)
    T = max(1, min(chunk_size, l))
    pad = (-l) % T
    # Document index of each position (cumulative count of starts): two positions interact iff equal.
    doc = jnp.cumsum(segment_starts(segment_ids, b, l).astype(jnp.int32), axis=1)
    if pad:
        padw = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        xf, dtf, Bh, Ch = padw(xf), padw(dtf), padw(Bh), padw(Ch)
        doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
    nc = (l + pad) // T
    chunk = lambda a: a.reshape((b, nc, T) + a.shape[2:])
    xc, dtc, Bc, Cc, docc = chunk(xf), chunk(dtf), chunk(Bh), chunk(Ch), chunk(doc)

    a = jnp.moveaxis(dtc * Af, 2, 3)  # (b,c,h,t) log-decays, <= 0
    seg = _segsum(a)  # (b,c,h,t,t)
    same = docc[:, :, :, None] == docc[:, :, None, :]  # (b,c,t,t)
    L = jnp.exp(seg) * same[:, :, None].astype(F32)
    xdt = xc * dtc[..., None]  # (b,c,t,h,p)

    # 1. intra-chunk (the "attention-like" quadratic form)
    scores = jnp.einsum("bcihn,bcjhn->bchij", Cc, Bc) * L
    y = jnp.einsum("bchij,bcjhp->bcihp", scores, xdt)

    # 2. each chunk's own state at its end
    last_doc = docc[:, :, -1]  # (b,c)
    to_end = jnp.exp(seg[..., -1, :]) * (docc == last_doc[..., None])[:, :, None].astype(F32)  # (b,c,h,t)
    own = jnp.einsum("bchj,bcjhn,bcjhp->bchpn", to_end, Bc, xdt)

    # 3. pass states across chunks; a chunk lets the incoming state through only if no document starts in it
    prev_doc = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), last_doc[:, :-1]], axis=1)  # doc entering chunk
    through = jnp.exp(seg[..., -1, 0] + a[..., 0]) * (last_doc == prev_doc)[:, :, None].astype(F32)  # (b,c,h)
    s0 = jnp.zeros((b, h, p, n), F32) if initial_state is None else initial_state.astype(F32)

    def pass_on(s, inp):
        thr, own_c = inp
        return thr[:, :, None, None] * s + own_c, s

    final, entering = jax.lax.scan(pass_on, s0, (jnp.moveaxis(through, 1, 0), jnp.moveaxis(own, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # (b,c,h,p,n): state before each chunk

    # 4. the entering state read out at every position of the chunk
    from_start = jnp.exp(jnp.cumsum(a, axis=-1)) * (docc == prev_doc[..., None])[:, :, None].astype(F32)
    y = y + jnp.einsum("bcihn,bchpn,bchi->bcihp", Cc, entering, from_start)

    y = y.reshape(b, nc * T, h, p)[:, :l]
    y = _skip(y, xf[:, :l], Df)
    return y.astype(x.dtype), final


# ---------------------------------------------------------------------------------------------------- multistep


def ssd_multistep(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                  D: jax.Array | None = None, dt_bias: jax.Array | None = None,
                  dt_softplus: bool = True) -> tuple[jax.Array, jax.Array]:
    """k decode steps from a cached state, for speculative verification.

    state (b,h,p,n); x (b,k,h,p); dt (b,k,h); B, C (b,k,g,n). Returns y (b,k,h,p) in x.dtype and the state after
    each prefix, states (b,k,h,p,n) fp32 (`states[:, j]` is the state once tokens 0..j are consumed), so the
    caller can keep the state of whichever prefix is accepted.
    """
    b, k, h, p = x.shape
    xf, dtf, Af, Bh, Ch, Df = _prep(x, dt, A, B, C, D, dt_bias, dt_softplus)

    def step(s, inp):
        xt, dtt, bt, ct = inp
        s = jnp.exp(dtt * Af)[:, :, None, None] * s + (dtt[:, :, None] * xt)[..., None] * bt[:, :, None, :]
        return s, (jnp.einsum("bhpn,bhn->bhp", s, ct), s)

    tm = lambda a: jnp.moveaxis(a, 1, 0)
    _, (ys, states) = jax.lax.scan(step, state.astype(F32), (tm(xf), tm(dtf), tm(Bh), tm(Ch)))
    y = _skip(jnp.moveaxis(ys, 0, 1), xf, Df)
    return y.astype(x.dtype), jnp.moveaxis(states, 0, 1)


def ssd_verify(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
               D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
               accepted: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The reference of `pallas_kernels.multistep_verify` (same signature): k decode steps from a cached state.

    Returns y (b,k,h,p) in x.dtype and
    - `accepted` None: the state after every prefix (b,k,h,p,n) fp32, as `ssd_multistep`;
    - `accepted` (b,) int: only the state after accepted[r] steps of row r (b,h,p,n) fp32 (0: `state` itself,
      values outside [0, k] act as the nearest end), so speculative decoding can advance its one cached state by
      the accepted count without stacking a state per draft token.
    """
    if accepted is None:
        return ssd_multistep(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)
    k = x.shape[1]
    xf, dtf, Af, Bh, Ch, Df = _prep(x, dt, A, B, C, D, dt_bias, dt_softplus)
    acc = accepted.astype(jnp.int32)[:, None, None, None]
    s = kept = state.astype(F32)
    ys = []
    for j in range(k):  # k is a verify chunk (a few tokens): unrolled, so a 1-token call is one fused step
        s = (jnp.exp(dtf[:, j] * Af)[:, :, None, None] * s
             + (dtf[:, j, :, None] * xf[:, j])[..., None] * Bh[:, j, :, None, :])
        ys.append(jnp.einsum("bhpn,bhn->bhp", s, Ch[:, j]))
        kept = jnp.where(j < acc, s, kept)
    y = _skip(jnp.stack(ys, axis=1), xf, Df)
    return y.astype(x.dtype), kept


SSD_IMPLS = {"sequential": ssd_sequential, "associative": ssd_associative, "chunked": ssd_chunked}
