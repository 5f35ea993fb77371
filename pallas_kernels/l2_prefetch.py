"""Pulling arrays into L2 from inside this project's Triton kernels, for kernels that run after them.

Why: at batch 64 a decode step's GEMMs are latency-bound, not bandwidth-bound (~0.2-0.7 TB/s), and part of their
time is the DRAM latency of weights read cold: with every layer reading layer 0's weights (all in L2) the step
took 0.04-0.05 ms less on the H100 (benchmarks/results/decode_profile_s27_prefetch.md, the `hw` diagnostic). Session
27 had the attention kernel load one element of every sector of the next weights: the loads cost that kernel more
than the GEMMs gained. Two ways here, neither holding a register (`fused_decode.tiling(prefetch=..., prefetch_by=...)`
says which kernel prefetches which weights, and how):
- "bulk": Hopper's `cp.async.bulk.prefetch.L2.global [address], bytes`, a whole range a thread handed to the SM's
  copy engine. Measured in the H100's decode loop at batch 64 (benchmarks/results/decode_profile_s30_prefetch.md):
  the kernels after it gain what `hw` gains there, but a program does not exit before its ranges have arrived, so
  the issuing kernel pays about their transfer time (the o-projection +1.4-1.8 µs a layer for 5.3 MB) and the step
  is slower (0.822-0.866 ms against 0.786-0.793). Not used by default.
- "lines": one `prefetch.global.L2 [address]` a 128-byte line, which nothing waits for. Not yet measured on a GPU
  (its Triton module compiles for sm_90, checked with triton 3.6 off the device); the profile's `pfo+pfl` is the
  run that decides.

`prefetch` is one primitive with a side effect (so it is neither deleted nor moved), lowered to Triton's inline
assembly like `pallas_kernels.pdl`'s instructions; it needs Pallas's Triton lowering internals (`jax._src`), and
where they are missing (another jax) `available()` is False and the kernels leave it out. It has no meaning in
interpret mode: kernels call it only when compiled for a GPU.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import pow2_at_least
from pallas_kernels.pdl import triton_internals

ALIGN = 16  # the instruction's address and size granularity (bytes)
MIN_CHUNK = 256  # smallest range a thread is handed: a few DRAM bursts


def _build() -> Any:
    """The primitive (None where this jax's Pallas Triton lowering is not as expected)."""
    t = triton_internals()
    if t is None:
        return None
    ir, tt_dialect, effect = t.ir, t.tt_dialect, t.effect
    prim = t.core.Primitive("mamba_llama_prefetch_l2")
    prim.multiple_results = True

    @prim.def_effectful_abstract_eval
    def _abstract(ref: Any, starts: Any, *sizes: Any) -> Any:
        del ref, starts, sizes
        return [], {effect}

    @t.lowering.register_lowering(prim)
    def _lower(ctx: Any, ptr: Any, starts: Any, *sizes: Any) -> Any:
        del ctx
        shape = ir.RankedTensorType(starts.type).shape
        ptrs = tt_dialect.splat(ir.RankedTensorType.get(shape, ptr.type), ptr)
        ptrs = tt_dialect.addptr(ptrs.type, ptrs, starts)
        addrs = tt_dialect.ptr_to_int(ir.RankedTensorType.get(shape, ir.IntegerType.get_signless(64)), ptrs)
        i32 = ir.RankedTensorType.get(shape, ir.IntegerType.get_signless(32))
        if sizes:  # a range a thread: the copy engine's bulk prefetch
            asm, constraints = "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r"
        else:  # the line holding each address
            asm, constraints = "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l"
        tt_dialect.elementwise_inline_asm([i32], asm, constraints=constraints, pure=False, packed_element=1,
                                          args=[addrs, *sizes])
        return []

    return prim


_PRIM = _build()


def available() -> bool:
    """Whether this jax lets the kernels execute the instruction."""
    return _PRIM is not None


def chunking(nbytes: int, threads: int) -> tuple[int, int]:
    """(chunk, chunks): `nbytes` cut into `chunks` ranges of `chunk` bytes (the last one shorter where they do not
    divide), chunk a multiple of ALIGN and at least MIN_CHUNK, so that `threads` threads cover it in one pass."""
    if nbytes <= 0 or nbytes % ALIGN:
        raise ValueError(f"prefetch needs a positive size in multiples of {ALIGN} bytes, got {nbytes}")
    per = -(-nbytes // threads)
    chunk = max(MIN_CHUNK, -(-per // ALIGN) * ALIGN)
    return chunk, -(-nbytes // chunk)


def ranges(thread: Any, nbytes: int, threads: int, xp: Any = np) -> tuple[Any, Any]:
    """The (start, size) in bytes that the threads `thread` (a vector of indices < threads) prefetch of an array of
    `nbytes` (`chunking`): thread t takes chunk t mod chunks, so threads past the chunks repeat early ones (an L2
    hit: no DRAM traffic) rather than idle in a branch. `xp`: numpy (tests) or jax.numpy (`prefetch`, in a kernel)."""
    chunk, chunks = chunking(nbytes, threads)
    starts = (thread % chunks) * chunk
    return starts, xp.minimum(chunk, nbytes - starts)


LINE = 128  # bytes a `prefetch.global.L2` brings in


def line_chunking(nbytes: int, threads: int) -> tuple[int, int]:
    """(lines, chunks) for prefetching line by line: each thread takes `lines` lines (a power of two: one Triton
    tensor), `nbytes` cut into `chunks` <= threads ranges of that many lines."""
    if nbytes <= 0:
        raise ValueError(f"prefetch needs a positive size, got {nbytes}")
    lines = pow2_at_least(-(-nbytes // (LINE * threads)), 1)
    return lines, -(-nbytes // (lines * LINE))


def line_starts(thread: Any, nbytes: int, threads: int, xp: Any = np) -> Any:
    """(len(thread), lines): the byte each of the threads `thread`'s lines prefetches address, in an array of
    `nbytes` (`line_chunking`; lines past the end are the array's last byte again). `xp` as in `ranges`."""
    lines, chunks = line_chunking(nbytes, threads)
    start = (thread % chunks) * (lines * LINE)
    return xp.minimum(start[:, None] + xp.arange(lines, dtype=xp.int32)[None, :] * LINE, nbytes - 1)


KINDS = ("bulk", "lines")


def prefetch(refs: tuple[Any, ...], *, thread: jax.Array, threads: int, kind: str = "bulk") -> None:
    """Inside a Triton kernel: every ref's whole array into L2, shared over `threads` threads of the grid, of which
    this program holds `thread` (an int32 (T,) vector, T its warps × 32: one element a thread). `kind` "bulk": each
    thread hands one range a ref to the copy engine (`ranges`); "lines": each issues one `prefetch.global.L2` a
    128-byte line of its range (`line_starts`)."""
    if _PRIM is None:
        raise RuntimeError("this jax's Pallas Triton lowering has no room for the L2 prefetch")
    if kind not in KINDS:
        raise ValueError(f"prefetch kind must be one of {KINDS}, got {kind!r}")
    for ref in refs:
        item = jnp.dtype(ref.dtype).itemsize
        nbytes = int(np.prod(ref.shape)) * item
        if kind == "bulk":
            start, size = ranges(thread, nbytes, threads, jnp)
            _PRIM.bind(ref, start // item, size)
        else:
            _PRIM.bind(ref, line_starts(thread, nbytes, threads, jnp) // item)


def program_threads(num_warps: int, grid: tuple[int, ...]) -> tuple[jax.Array, int]:
    """(this program's threads as indices over the whole grid, an int32 (num_warps × 32,) vector; the grid's
    thread count) for a kernel launched over the static `grid` (row-major over its axes)."""
    t = num_warps * 32
    p = jnp.int32(0)
    for a, n in enumerate(grid):
        p = p * n + pl.program_id(a)
    return p * t + jax.lax.broadcasted_iota(jnp.int32, (t,), 0), int(np.prod(grid)) * t


def with_prefetch(kernel: Any, *, n_in: int, n_prefetch: int, at: str, grid: tuple[int, ...],
                  num_warps: int, kind: str = "bulk") -> Any:
    """`kernel(*inputs, *outputs)` taking `n_prefetch` more inputs after its `n_in` own, whose arrays its programs
    pull into L2 (`prefetch` of `kind`, shared over the whole `grid`) before their work (`at` "start") or after it
    ("end")."""
    if at not in ("start", "end"):
        raise ValueError(f"prefetch at must be 'start' or 'end', got {at!r}")

    def wrapped(*refs: Any) -> None:
        ins, ahead, outs = refs[:n_in], refs[n_in:n_in + n_prefetch], refs[n_in + n_prefetch:]

        def issue() -> None:
            thread, threads = program_threads(num_warps, grid)
            prefetch(ahead, thread=thread, threads=threads, kind=kind)

        if at == "start":
            issue()
        kernel(*ins, *outs)
        if at == "end":
            issue()

    return wrapped
