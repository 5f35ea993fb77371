"""Greedy decoding's LM head and argmax in one Pallas launch: the token ids without the logits in memory.

Why: a greedy decode step needs only each row's best id, but XLA computes the (b, V) fp32 logits, writes them and
reads them back for the argmax. At SmolLM2's shape (V = 49,152, K = 576) and batch 64 the weights are 57 MB and
the logits 12.6 MB each way, so the head took 0.046-0.047 ms of a ~0.8 ms step on the H100 / H200
(benchmarks/results/generate_s18_flags.md, generate_s28_squares.md) against ~0.022 ms to read its weights. Here
every program streams one block of `bn` vocabulary rows of the output-major weight (V, K) — a tied model's
embedding table as it is — takes its rows' dot products with the hidden rows in fp32, and writes, per row, the
block's best logit and the first id that reaches it; a small XLA epilogue picks each row's best block. Ties go to
the lowest id, as `jnp.argmax` does, so the ids equal the reference's wherever the logits agree; the logits
themselves differ from XLA's GEMM only by summation order (a near-tie within that rounding may pick another id).

Shapes: h (b, K) final-norm hidden rows in the compute dtype, wt (V, K) in the same dtype; b is padded to 16, 32
or 64 rows (a tensor-core dot's smallest M is 16) and above 64 must be a multiple of 64 (row groups of 64, grid
axis 1); V and K must be tiled by powers of two (`plan`). The reference (`lm_head_argmax_reference`) is what the
decode step computes without it: argmax over `h @ wt.T` in fp32. Opt-in (MAMBA_LLAMA_LM_HEAD_KERNEL=1): faster
alone, not in the decode step (GPU_VERIFIED below).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from pallas_kernels import dispatch
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32
PALLAS_TRITON = dispatch.PALLAS_TRITON
REFERENCE = "reference_xla"
OP = "lm_head_argmax"
KERNEL_ENV = "MAMBA_LLAMA_LM_HEAD_KERNEL"
# Compiled and compared with the reference on an H100 (benchmarks/results/test-gpu-s29.xml, batch 1, 16 and 64).
GPU_VERIFIED = True
# ... but opt-in (MAMBA_LLAMA_LM_HEAD_KERNEL=1): alone it beat XLA's GEMM + argmax (39.4 vs 48.3 µs at batch 64, 42.1
# vs 42.2 at 1; benchmarks/results/lm_head_s29.md), yet the decode step on the H100 did not move (0.817 vs 0.817 ms
# at 64, 0.475 vs 0.474 at 1, generate_s29_lm_pdl.md).
# Vocabulary rows a program (at most; the largest power of two tiling V), K per step of its loop, pipeline stages,
# warps. 49,152 / 128 = 384 programs at SmolLM2's vocabulary.
TILING = {"block_v": 128, "block_k": 64, "stages": 4, "warps": 4}
MAX_GROUP = 64  # hidden rows a program at most (its (rows, bn) fp32 accumulator lives in registers)


def lm_head_argmax_reference(h: jax.Array, wt: jax.Array) -> jax.Array:
    """(b,) int32: argmax over the fp32 logits h @ wt.T, what the greedy decode step takes."""
    logits = jax.lax.dot_general(h, wt.astype(h.dtype), (((1,), (1,)), ((), ())), preferred_element_type=F32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def padded_rows(b: int) -> int:
    """Rows the kernel runs for b hidden rows: 16, 32 or 64, or b itself above 64 (then a multiple of 64)."""
    return dispatch.pow2_at_least(b, 16) if b <= MAX_GROUP else b


def plan(b: int, vocab: int, k: int, block_v: int = 0) -> tuple[int, int, int] | None:
    """(rows, block_v, block_k) for b rows of width k over `vocab` ids (blocks of at most `block_v` ids, 0:
    TILING's), or None where the kernel does not tile."""
    rows = padded_rows(b)
    bn = dispatch.pow2_dividing(vocab, block_v or TILING["block_v"])
    bk = dispatch.pow2_dividing(k, TILING["block_k"])
    if b < 1 or rows % MAX_GROUP and rows > MAX_GROUP or bn < 16 or bk < 16:
        return None
    return rows, bn, bk


def _kernel(h_ref: Any, w_ref: Any, max_ref: Any, idx_ref: Any, *, k: int, bk: int, bn: int, group: int,
            vocab: int) -> None:
    j = pl.program_id(0)
    rs = pl.ds(pl.program_id(1) * group, group)
    cols = pl.ds(j * bn, bn)
    prec = jax.lax.Precision.HIGHEST if h_ref.dtype == F32 else None  # fp32 at full precision, not TF32

    def body(i: Any, acc: jax.Array) -> jax.Array:
        hb = h_ref[rs, pl.ds(i * bk, bk)]
        wb = w_ref[cols, pl.ds(i * bk, bk)]
        return acc + jax.lax.dot_general(hb, wb, (((1,), (1,)), ((), ())), precision=prec,
                                         preferred_element_type=F32)

    acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((group, bn), F32))
    best = jnp.max(acc, axis=1)
    ids = j * bn + jax.lax.broadcasted_iota(jnp.int32, (group, bn), 1)
    max_ref[j, rs] = best
    idx_ref[j, rs] = jnp.min(jnp.where(acc == best[:, None], ids, vocab), axis=1)


def _bad(msg: str) -> KernelError:
    return KernelError(f"lm_head_argmax: {msg}")


def _check(h: Any, wt: Any) -> tuple[int, int, int]:
    if getattr(h, "ndim", None) != 2 or getattr(wt, "ndim", None) != 2:
        raise _bad(f"h must be (b, K) and wt (V, K), got shapes {getattr(h, 'shape', h)} and "
                   f"{getattr(wt, 'shape', wt)}")
    (b, k), (vocab, kw) = h.shape, wt.shape
    if k != kw:
        raise _bad(f"h has width {k} but wt rows have {kw}")
    return b, vocab, k


@functools.partial(jax.jit, static_argnames=("interpret", "block_v", "stages", "warps"))
def lm_head_argmax_pallas(h: jax.Array, wt: jax.Array, *, interpret: bool = False, block_v: int = 0,
                          stages: int = 0, warps: int = 0) -> jax.Array:
    """The kernel: same ids as `lm_head_argmax_reference` up to summation-order near-ties (module docstring).
    `block_v` / `stages` / `warps` (0: TILING's) are for the benchmark's sweep."""
    b, vocab, k = _check(h, wt)
    tiles = plan(b, vocab, k, block_v)
    if tiles is None:
        raise _bad(f"no tiling for {b} rows, vocabulary {vocab} and width {k} (rows above {MAX_GROUP} must be a "
                   "multiple of it; V and K need a power-of-two divisor of at least 16); use the reference")
    rows, bn, bk = tiles
    group = min(rows, MAX_GROUP)
    hp = jnp.pad(h, ((0, rows - b), (0, 0))) if rows != b else h
    parts = vocab // bn
    out = (jax.ShapeDtypeStruct((parts, rows), F32), jax.ShapeDtypeStruct((parts, rows), jnp.int32))
    kern = functools.partial(_kernel, k=k, bk=bk, bn=bn, group=group, vocab=vocab)
    pmax, pidx = triton_call(kern, grid=(parts, rows // group), out_shape=out, interpret=interpret,
                             num_warps=warps or TILING["warps"], num_stages=stages or TILING["stages"],
                             name="lm_head_argmax")(hp, wt.astype(h.dtype))
    best = jnp.argmax(pmax[:, :b], axis=0)  # the first block holding the row's best logit: the lowest id
    return jnp.take_along_axis(pidx[:, :b], best[None, :], axis=0)[0]


def choice(b: int, vocab: int, k: int) -> str:
    """Which implementation `lm_head_argmax` uses for these shapes: the kernel where asked for
    (MAMBA_LLAMA_LM_HEAD_KERNEL=1, read at trace time), allowed (GPU_VERIFIED; interpret mode off a GPU with
    MAMBA_LLAMA_INTERPRET_KERNELS=1) and tiled; else XLA's GEMM and argmax."""
    on = os.environ.get(KERNEL_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    ok = on and dispatch.kernel_allowed(GPU_VERIFIED) and plan(b, vocab, k) is not None
    return PALLAS_TRITON if ok else REFERENCE


def lm_head_argmax(h: jax.Array, wt: jax.Array) -> jax.Array:
    """(b,) int32 greedy ids for hidden rows h (b, K) and output-major head weights wt (V, K); records its choice
    under "lm_head_argmax"."""
    b, vocab, k = _check(h, wt)
    picked = choice(b, vocab, k)
    dispatch.record_choice(OP, picked)
    if picked == PALLAS_TRITON:
        return lm_head_argmax_pallas(h, wt, interpret=not dispatch._on_gpu())
    return lm_head_argmax_reference(h, wt)
