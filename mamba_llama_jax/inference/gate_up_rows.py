"""Whether a decode step past the fused GEMVs' batches runs its MLP's gate·up GEMM and SiLU·mul as one Pallas
launch (`pallas_kernels.fused_decode.gate_up`) instead of XLA's.

Why: at batch 64 the MLP's first half is XLA's gate·up GEMM (split over K in 2, 96 tiles of 64 × 64: 5.9 µs a
layer on an H100, the step's largest GEMM) and a launch of its own for the split-K sum + SiLU·mul (~2 µs)
(benchmarks/results/decode_profile_s17_fused64.md). RMSNorm stays with XLA (it fuses into the o-projection's
split-K reduction), so the kernel reads normalised rows and its K loop loads them straight into its dots; the
fused GEMVs' own `norm_gate_up` at 64 rows took 10.6 µs a layer passing over each row for its norm first, and
still 10.0 with the norm taken in its K loop (benchmarks/results/decode_profile_s21_gu_tiling.md, `fd64+kq4+g64+ds8`:
elementwise work between the rows' loads and the dots). Measured in the decode loop on the H100, one process: the
step 0.957 → 0.929 ms at batch 64 and 0.788 → 0.753 at 16, one launch a layer fewer (decode_profile_s20_vp_gu.md:
the kernel 6.2 / 4.6 µs a layer in session 20's tiling); 0.921 → 0.880 and 0.750 → 0.743 in `GATE_UP_TILING`
since session 21 (decode_profile_s21_gu_tiling.md: 4.8 / 4.3 µs a layer). So it is the default for 16, 32 and 64
rows wherever `fused_decode.gate_up` picks its kernel (GPUs); elsewhere `gate_up` is its reference, exactly XLA's
ops. `MAMBA_LLAMA_DECODE_GATE_UP=xla` keeps XLA's GEMM and fusion ("kernel" or unset: the kernel).

`MAMBA_LLAMA_DECODE_GATE_UP=fold` (opt-in, measured slower) takes the whole step at these rows as five launches
a layer: XLA's q·k·v split-K partials of the raw rows against W_qkv with the input norm's weight folded in
(`ops.partials.fold`: no weighting pass over the rows), the attention kernel (which applies the norm's row scale),
o + residual and down + residual as `fused_decode.matmul_residual` kernels, and RMSNorm·gate·up + SiLU·mul with the
post-attention norm's weight folded in (`fused_decode.folded_gate_up`: its K loop feeds the rows straight into the
dots). Why it was built: the default leaves two XLA fusions a layer (split-K sums, residual adds, RMSNorm: 72
launches, 0.13 ms a step at batch 64) and, at 64 rows, the o / down kernels alone run near XLA's GEMMs. Measured
on the H100 (benchmarks/results/decode_profile_s22_fold.md, one process): 1.122 against the default's 0.894 ms a
step at batch 64, 0.940 against 0.773 at 16 (bench_generate, generate_s22_fold.md: 1.147 against 0.925 at 64).
Why it loses: the GPU compiler does not hoist the folded weights out of the decode loop, as the CPU's does (tested
in tests/inference/test_generate.py): one fusion a step rewrites them (`loop_convert_fusion`, 0.12 ms a step), the
fusion count stays 72 (225 launches a step, as the default), and `folded_gate_up` takes 7.2 µs a layer against
gate_up's 4.8. Folding once outside the loop would remove the 0.12 ms, which by the same profile still leaves the
form ~0.1 ms a step slower (the o / down kernels and `folded_gate_up` cost more than the GEMMs and fusions they
replace), so it stays an opt-in for experiments.
"""

from __future__ import annotations

import os

from mamba_llama_jax.errors import GenerationError
from pallas_kernels.fused_decode import DOT_ROWS

GATE_UP_ENV = "MAMBA_LLAMA_DECODE_GATE_UP"


def gate_up_form(rows: int) -> str:
    """The MLP form of a decode step of `rows` rows traced now (module docstring): "kernel" (the one-launch
    gate·up + SiLU·mul on XLA's normalised rows), "fold" (the step's five-launch form) or "xla" (XLA's GEMM and
    fusion; always for rows other than 16, 32, 64)."""
    v = os.environ.get(GATE_UP_ENV, "").strip().lower()
    if v not in ("", "xla", "kernel", "fold"):
        raise GenerationError(f"{GATE_UP_ENV} must be 'kernel', 'xla' or 'fold', got {v!r}")
    return (v or "kernel") if rows in DOT_ROWS else "xla"
