"""Linear-recurrence scans and the Mamba1 selective scan, pure JAX: the ground truth for the Pallas kernels.

Shape legend: b batch, l length, d channels, n state size, g groups of B/C (g divides d; channel `c` reads group
`c // (d // g)`), k decode steps.

Selective scan (Mamba1), per channel, fp32 throughout, y cast back to u.dtype:
    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(delta'_t * A) ⊙ h_{t-1} + delta'_t * u_t * B_t            h: (n,), A: (n,) <= 0
    y_t = h_t · C_t + D * u_t ;  y_t *= silu(z_t) if z is given
`segment_ids` (b, l): the state restarts from zero where the id changes; `initial_state` feeds the first document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_llama_jax.ops.ssd import discretize, linear_recurrence_associative, segment_starts

F32 = jnp.float32


# ------------------------------------------------------------------------------------------ generic recurrences


def linear_scan_sequential(a: jax.Array, b: jax.Array,
                           initial: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """h_t = a_t * h_{t-1} + b_t along axis 1 with `lax.scan`; a broadcasts against b. Returns (all h, last h)."""
    a = jnp.broadcast_to(a, b.shape)
    h0 = jnp.zeros(b.shape[:1] + b.shape[2:], b.dtype) if initial is None else initial.astype(b.dtype)

    def step(h, inp):
        at, bt = inp
        h = at * h + bt
        return h, h

    last, hs = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), last


def linear_scan_associative(a: jax.Array, b: jax.Array,
                            initial: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The same recurrence as a parallel prefix (`lax.associative_scan`). Returns (all h, last h)."""
    a = jnp.broadcast_to(a, b.shape)
    if initial is not None:
        b = b.at[:, 0].add(a[:, 0] * initial.astype(b.dtype))
    hs = linear_recurrence_associative(a, b)
    return hs, hs[:, -1]


# ---------------------------------------------------------------------------------------------- selective scan


def _prep(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dl, Bd, Cd = discretize(delta, delta_bias, delta_softplus, B, C, u.shape[2], "channels")  # Bd: (b,l,d,n)
    return (u.astype(F32), dl, A.astype(F32), Bd, Cd, None if D is None else D.astype(F32),
            None if z is None else z.astype(F32))


def _finish(y: jax.Array, uf: jax.Array, Df: jax.Array | None, zf: jax.Array | None, dtype) -> jax.Array:
    if Df is not None:
        y = y + uf * Df
    if zf is not None:
        y = y * jax.nn.silu(zf)
    return y.astype(dtype)


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                   D: jax.Array | None = None, z: jax.Array | None = None, delta_bias: jax.Array | None = None,
                   delta_softplus: bool = True, initial_state: jax.Array | None = None,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mamba1 selective scan, one step at a time (`lax.scan`; the (b,l,d,n) tensors are never materialised).

    u, delta, z (b,l,d); A (d,n); B, C (b,l,g,n); D, delta_bias (d,); initial_state (b,d,n).
    Returns y (b,l,d) in u.dtype and the final state (b,d,n) fp32.
    """
    b, l, d = u.shape
    n = A.shape[-1]
    uf, dl, Af, Bd, Cd, Df, zf = _prep(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    keep = 1.0 - segment_starts(segment_ids, b, l).astype(F32)
    h0 = jnp.zeros((b, d, n), F32) if initial_state is None else initial_state.astype(F32)

    def step(h, inp):
        ut, dt, bt, ct, kt = inp
        h = jnp.exp(dt[..., None] * Af) * kt[:, None, None] * h + (dt * ut)[..., None] * bt
        return h, jnp.einsum("bdn,bdn->bd", h, ct)

    tm = lambda a: jnp.moveaxis(a, 1, 0)
    h, ys = jax.lax.scan(step, h0, (tm(uf), tm(dl), tm(Bd), tm(Cd), tm(keep)))
    return _finish(jnp.moveaxis(ys, 0, 1), uf, Df, zf, u.dtype), h


def selective_scan_associative(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                               D: jax.Array | None = None, z: jax.Array | None = None,
                               delta_bias: jax.Array | None = None, delta_softplus: bool = True,
                               initial_state: jax.Array | None = None,
                               segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`selective_scan` as a parallel prefix; materialises (b,l,d,n)."""
    b, l, d = u.shape
    uf, dl, Af, Bd, Cd, Df, zf = _prep(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    keep = 1.0 - segment_starts(segment_ids, b, l).astype(F32)
    decay = jnp.exp(dl[..., None] * Af) * keep[:, :, None, None]  # (b,l,d,n)
    inp = (dl * uf)[..., None] * Bd
    hs, last = linear_scan_associative(decay, inp, initial_state)
    y = jnp.einsum("bldn,bldn->bld", hs, Cd)
    return _finish(y, uf, Df, zf, u.dtype), last


def selective_scan_multistep(state: jax.Array, u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                             C: jax.Array, *, D: jax.Array | None = None, z: jax.Array | None = None,
                             delta_bias: jax.Array | None = None,
                             delta_softplus: bool = True) -> tuple[jax.Array, jax.Array]:
    """k decode steps from a cached state (b,d,n): y (b,k,d) and the state after each prefix (b,k,d,n) fp32."""
    uf, dl, Af, Bd, Cd, Df, zf = _prep(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    def step(h, inp):
        ut, dt, bt, ct = inp
        h = jnp.exp(dt[..., None] * Af) * h + (dt * ut)[..., None] * bt
        return h, (jnp.einsum("bdn,bdn->bd", h, ct), h)

    tm = lambda a: jnp.moveaxis(a, 1, 0)
    _, (ys, hs) = jax.lax.scan(step, state.astype(F32), (tm(uf), tm(dl), tm(Bd), tm(Cd)))
    return _finish(jnp.moveaxis(ys, 0, 1), uf, Df, zf, u.dtype), jnp.moveaxis(hs, 0, 1)


SELECTIVE_IMPLS = {"sequential": selective_scan, "associative": selective_scan_associative}
