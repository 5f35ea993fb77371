"""Multi-step verify / state update of Mamba2 (speculative decoding) as one Pallas kernel (Triton on GPU;
interpret mode on CPU).

Reference: `mamba_llama_jax.ops.ssd.ssd_verify` (same signature and maths; legend and recurrence in
`mamba_llama_jax/ops/ssd.py`). This file adds `interpret`, `block_p` and `num_warps` keywords only.

Given the cached state (b,h,p,n) fp32 and k new tokens, returns the k outputs y and either
- the state after every prefix (b,k,h,p,n) (`accepted` None), or
- the state after `accepted[r]` steps of each row r (b,h,p,n), without writing the k states to memory: the
  speculative decoder calls it twice per round, once with `accepted = k` (outputs to score the drafts, and the
  last state for a draft that keeps going), once with the accepted count (the only state it keeps): Algorithm 2
  of "The Mamba in the Llama" without a state per draft token.

Layout: grid (batch, heads, head-dim blocks). A program loads its (P, n) slice of the state once, walks the k
tokens with it on chip (k small: a verify chunk, unrolled up to 16 so every token's loads can be issued before
the dependent chain of updates), writes y per token and the state(s) asked for. Decode is latency-bound, so at
small batch the head dim is split into more, smaller blocks (`pick_block_p`) to spread the work over more SMs;
B and C (a few hundred bytes per token) are then re-read per block, which costs nothing next to the state.

Every exponent taken is dt'·A <= 0 (A <= 0, dt' >= 0), so nothing overflows; softplus is computed as
max(v, 0) + log1p(exp(-|v|)).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from pallas_kernels.dispatch import is_pow2
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32
PALLAS_TRITON = "pallas_triton"
REFERENCE = "reference_xla"

# True since tests/pallas/test_multistep_verify.py passed compiled on the H100 (20/20, including the Mamba2 layer
# test; benchmarks/results/test-gpu-kernels.xml): GPUs pick the kernel by default.
GPU_VERIFIED = True

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
SMS = 132  # H100 SXM streaming multiprocessors: the block heuristic aims for two programs per SM
UNROLL_MAX = 16  # longer chunks loop instead of unrolling (code size)


def check_verify_args(state: Any, x: Any, dt: Any, A: Any, B: Any, C: Any, *, D: Any = None,
                      dt_bias: Any = None, accepted: Any = None, block_p: int | None = None,
                      kernel: bool = True) -> None:
    """Raises KernelError naming the first bad argument; shapes and dtypes only, before anything is traced.
    `kernel=False` checks only what the reference needs too."""
    def bad(msg: str) -> KernelError:
        return KernelError(f"multistep_verify: {msg}")

    if getattr(x, "ndim", None) != 4:
        raise bad(f"x must be (batch, steps, heads, head_dim), got shape {getattr(x, 'shape', None)}")
    b, k, h, p = x.shape
    if k < 1:
        raise bad("x has no steps (axis 1 is empty)")
    if getattr(state, "ndim", None) != 4 or state.shape[:3] != (b, h, p):
        raise bad(f"state must be (batch, heads, head_dim, d_state) with the first three = {(b, h, p)}, got "
                  f"{getattr(state, 'shape', None)}")
    n = state.shape[3]
    if getattr(dt, "shape", None) != (b, k, h):
        raise bad(f"dt must be (batch, steps, heads) = {(b, k, h)}, got {getattr(dt, 'shape', None)}")
    if getattr(A, "shape", None) != (h,):
        raise bad(f"A must be (heads,) = ({h},), got {getattr(A, 'shape', None)}")
    if getattr(B, "ndim", None) != 4 or B.shape[:2] != (b, k) or B.shape[3] != n:
        raise bad(f"B must be (batch, steps, groups, d_state) with batch, steps = {(b, k)} and d_state = {n} "
                  f"(the state's), got {getattr(B, 'shape', None)}")
    if getattr(C, "shape", None) != B.shape:
        raise bad(f"C must have B's shape {B.shape}, got {getattr(C, 'shape', None)}")
    g = B.shape[2]
    if g < 1 or h % g:
        raise bad(f"the groups of B/C ({g}) must divide the heads ({h})")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None and getattr(v, "shape", None) != (h,):
            raise bad(f"{name} must be (heads,) = ({h},), got {getattr(v, 'shape', None)}")
    if accepted is not None:
        if getattr(accepted, "shape", None) != (b,):
            raise bad(f"accepted must be (batch,) = ({b},), one count per row, got {getattr(accepted, 'shape', None)}")
        if not jnp.issubdtype(accepted.dtype, jnp.integer):
            raise bad(f"accepted must be integers, got {accepted.dtype}")
    for name, v in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if v.dtype not in _FLOATS:
            raise bad(f"{name} must be float32, bfloat16 or float16, got {v.dtype}")
    if not kernel:
        return
    # Triton tiles are powers of two; 16 keeps every tile at least one warp-row wide.
    if not (is_pow2(p) and p >= 16) or not (is_pow2(n) and n >= 16):
        raise bad(f"head_dim ({p}) and d_state ({n}) must be powers of two >= 16 for the Pallas kernel; use "
                  "mamba_llama_jax.ops.ssd.ssd_verify (or pallas_kernels.dispatch.verify) for other sizes")
    if block_p is not None and not (is_pow2(block_p) and 16 <= block_p <= p):
        raise bad(f"block_p must be a power of two in [16, head_dim={p}], got {block_p}")


def pick_block_p(b: int, h: int, p: int, target: int = 2 * SMS) -> int:
    """Head-dim block: halve from p (down to 16) until b·h·(p/P) programs reach `target`."""
    P = p
    while P > 16 and b * h * (p // P) < target:
        P //= 2
    return P


def _softplus(v: jax.Array) -> jax.Array:
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _kernel(state_ref, x_ref, dt_ref, A_ref, bias_ref, D_ref, B_ref, C_ref, acc_ref,  # inputs
            y_ref, st_ref,  # outputs
            *, k: int, P: int, rep: int, softplus: bool, all_states: bool):
    bi = pl.program_id(0)
    hi = pl.program_id(1)
    p0 = pl.program_id(2) * P
    gi = hi // rep
    A = A_ref[hi]
    bias = bias_ref[hi]
    Dh = D_ref[hi]

    def step(j, S):
        dtv = dt_ref[bi, j, hi].astype(F32) + bias
        dtp = _softplus(dtv) if softplus else dtv
        x = x_ref[bi, j, hi, pl.ds(p0, P)].astype(F32)
        Bv = B_ref[bi, j, gi, :].astype(F32)
        Cv = C_ref[bi, j, gi, :].astype(F32)
        S = jnp.exp(dtp * A) * S + (dtp * x)[:, None] * Bv[None, :]
        y = jnp.sum(S * Cv[None, :], axis=1) + Dh * x
        y_ref[bi, j, hi, pl.ds(p0, P)] = y.astype(y_ref.dtype)
        return S

    S0 = state_ref[bi, hi, pl.ds(p0, P), :]
    if all_states:
        def body(j, S):
            S = step(j, S)
            st_ref[bi, j, hi, pl.ds(p0, P), :] = S
            return S

        _loop(k, body, S0)
    else:
        acc = acc_ref[bi]

        def body(j, carry):
            S, kept = carry
            S = step(j, S)
            # a select per step keeps the accepted state on chip: one store at the end instead of k
            return S, jnp.where(j < acc, S, kept)

        _, kept = _loop(k, body, (S0, S0))
        st_ref[bi, hi, pl.ds(p0, P), :] = kept


def _loop(k: int, body: Any, carry: Any) -> Any:
    """body(j, carry) for j < k. Unrolled for a verify-sized k: the tokens' loads do not depend on the state, so
    straight-line code lets them all be issued before the dependent chain of updates (decode is latency-bound)."""
    if k > UNROLL_MAX:
        return jax.lax.fori_loop(0, k, body, carry)
    for j in range(k):
        carry = body(j, carry)
    return carry


def multistep_verify(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                     D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
                     accepted: jax.Array | None = None, interpret: bool = False, block_p: int | None = None,
                     num_warps: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The kernel (see the module docstring): y (b,k,h,p) in x.dtype and the per-prefix states (b,k,h,p,n) or,
    given `accepted` (b,) int, the state after that many steps (b,h,p,n), fp32. Not differentiable (decode
    only). Call through `pallas_kernels.dispatch.verify` unless you want this kernel unconditionally."""
    check_verify_args(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, accepted=accepted, block_p=block_p)
    b, k, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    P = block_p or pick_block_p(b, h, p)
    # ~32 state elements per thread: enough threads to hide the loads, few enough that the tile stays in registers
    warps = num_warps or max(1, min(8, P * n // 1024))
    all_states = accepted is None
    acc = jnp.zeros((b,), jnp.int32) if all_states else accepted.astype(jnp.int32)
    st_shape = (b, k, h, p, n) if all_states else (b, h, p, n)
    kern = functools.partial(_kernel, k=k, P=P, rep=h // g, softplus=bool(dt_softplus), all_states=all_states)
    return triton_call(
        kern,
        grid=(b, h, p // P),
        out_shape=(jax.ShapeDtypeStruct((b, k, h, p), x.dtype), jax.ShapeDtypeStruct(st_shape, F32)),
        interpret=interpret, num_warps=warps, num_stages=1,
        name="multistep_verify",
    )(state.astype(F32), x, dt, A.astype(F32),
      jnp.zeros((h,), F32) if dt_bias is None else dt_bias.astype(F32),
      jnp.zeros((h,), F32) if D is None else D.astype(F32), B, C, acc)
