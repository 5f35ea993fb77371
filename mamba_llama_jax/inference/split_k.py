"""Where a decode step past the fused GEMVs' batches writes XLA's q·k·v GEMM as explicit split-K partials.

Why: at batch 64 XLA's autotuner splits each decode GEMM over K (64 rows give too few output tiles to fill the
SMs) and sums the partials in a launch of its own; before the q·k·v GEMM, RMSNorm is a launch of its own too
(benchmarks/results/generate_s17.md: ~10 launches a layer). Written as one batched dot over S slices of K with the
norm's weight applied to its input and its row scale left out (`mamba_llama_jax.ops.partials`), and the decode
attention kernel sums the partials and applies the norm's row scale in its prologue
(`pallas_kernels.decode_attention`, `rows=`): two launches a layer fewer (60 of 315 a step at batch 64), for a
prologue ~0.8 µs longer. Measured on an H100 in one process (benchmarks/results/decode_profile_s18_kq_loads.md):
4 partials, ms a step, 0.800 vs 0.850-0.857 at batch 16, 0.962 vs 1.013-1.017 at batch 64 (8 partials: 0.801 /
0.986); neutral at batch 256 (decode_profile_s18_b256.md), so batches past MAX_ROWS keep XLA's own GEMM and norm.
(The gate·up GEMM written the same way, its sum and SiLU·mul as elementwise ops, did not fuse into the down GEMM:
XLA kept the launch, benchmarks/results/decode_profile_s18_splitk.md.)

`SPLITS` is the default on GPUs up to MAX_ROWS rows past the fused GEMVs' batches (0 or 1: XLA's own GEMM and
norm); elsewhere nothing changes unless `MAMBA_LLAMA_DECODE_SPLIT_K` (a partial count, 0 for none) asks for it, at
any batch and on any backend, in place of the fused GEMVs' RMSNorm + q·k·v too (tests use it on the CPU; the
decode-step benchmark's `fd64+kq4` keeps it beside the fused kernels at 64 rows).
"""

from __future__ import annotations

import os

from mamba_llama_jax.errors import GenerationError
from pallas_kernels import dispatch

SPLIT_K_ENV = "MAMBA_LLAMA_DECODE_SPLIT_K"
SPLITS = 4
MAX_ROWS = 64


def _asked() -> int | None:
    """The partial count MAMBA_LLAMA_DECODE_SPLIT_K asks for (None: unset)."""
    v = os.environ.get(SPLIT_K_ENV, "").strip()
    if v and not v.isdigit():
        raise GenerationError(f"{SPLIT_K_ENV} must be a partial count (0 or 1 for none), got {v!r}")
    return max(1, int(v)) if v else None


def qkv_splits(rows: int, *, fused: bool = False) -> int:
    """Partials of the q·k·v GEMM for a decode step of `rows` rows traced now (1 = none): the environment's, else
    1 where the fused GEMVs take the rows (`fused`), else `SPLITS` on a GPU up to MAX_ROWS rows, else 1."""
    asked = _asked()
    if asked is not None:
        return asked
    return max(1, SPLITS) if dispatch._on_gpu() and rows <= MAX_ROWS and not fused else 1
