"""Whether a decode step past the fused GEMVs' batches runs its MLP's gate·up GEMM and SiLU·mul as one Pallas
launch (`pallas_kernels.fused_decode.gate_up`) instead of XLA's.

Why: at batch 64 the MLP's first half is XLA's gate·up GEMM (split over K in 2, 96 tiles of 64 × 64: 5.8 µs a
layer on an H100, the step's largest GEMM) and a launch of its own for the split-K sum + SiLU·mul (~2 µs)
(benchmarks/results/decode_profile_s17_fused64.md). RMSNorm stays with XLA (it fuses into the o-projection's
split-K reduction), so the kernel reads normalised rows and its K loop loads them straight into its dots; the
fused GEMVs' own `norm_gate_up` at 64 rows, which first passes over each row for its norm, took 10.6 µs a layer.
Not measured yet in the decode loop, so off by default: `MAMBA_LLAMA_DECODE_GATE_UP=kernel` turns it on for 16,
32 and 64 rows ("xla" or unset: off); on a GPU the kernel also needs MAMBA_LLAMA_UNVERIFIED_KERNELS=1 until its
GPU test has passed (`fused_decode.GATE_UP_GPU_VERIFIED`).
"""

from __future__ import annotations

import os

from mamba_llama_jax.errors import GenerationError
from pallas_kernels.fused_decode import DOT_ROWS

GATE_UP_ENV = "MAMBA_LLAMA_DECODE_GATE_UP"


def gate_up_rows(rows: int) -> bool:
    """Whether a decode step of `rows` rows traced now takes the one-launch gate·up + SiLU·mul (module docstring)."""
    v = os.environ.get(GATE_UP_ENV, "").strip().lower()
    if v not in ("", "xla", "kernel"):
        raise GenerationError(f"{GATE_UP_ENV} must be 'kernel' or 'xla', got {v!r}")
    return v == "kernel" and rows in DOT_ROWS
