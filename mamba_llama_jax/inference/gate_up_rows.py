"""Whether a decode step past the fused GEMVs' batches runs its MLP's gate·up GEMM and SiLU·mul as one Pallas
launch (`pallas_kernels.fused_decode.gate_up`) instead of XLA's.

Why: at batch 64 the MLP's first half is XLA's gate·up GEMM (split over K in 2, 96 tiles of 64 × 64: 5.9 µs a
layer on an H100, the step's largest GEMM) and a launch of its own for the split-K sum + SiLU·mul (~2 µs)
(benchmarks/results/decode_profile_s17_fused64.md). RMSNorm stays with XLA (it fuses into the o-projection's
split-K reduction), so the kernel reads normalised rows and its K loop loads them straight into its dots; the
fused GEMVs' own `norm_gate_up` at 64 rows, which first passes over each row for its norm, took 10.6 µs a layer.
Measured in the decode loop on the H100 (benchmarks/results/decode_profile_s20_vp_gu.md, one process): the step
0.957 → 0.929 ms at batch 64 and 0.788 → 0.753 at 16 (the kernel 6.2 / 4.6 µs a layer in `GATE_UP_TILING`), one
launch a layer fewer. So it is the default for 16, 32 and 64 rows wherever `fused_decode.gate_up` picks its kernel
(GPUs); elsewhere `gate_up` is its reference, exactly XLA's ops. `MAMBA_LLAMA_DECODE_GATE_UP=xla` keeps XLA's GEMM
and fusion ("kernel" or unset: the kernel).
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
    return v != "xla" and rows in DOT_ROWS
