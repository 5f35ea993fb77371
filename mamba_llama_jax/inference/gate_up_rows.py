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
since session 21 (decode_profile_s21_gu_tiling.md: 4.8 / 4.3 µs a layer). It runs at 16, 32 and 64 rows wherever
`fused_decode.gate_up` picks its kernel (GPUs); elsewhere `gate_up` is its reference, exactly XLA's ops.
`MAMBA_LLAMA_DECODE_GATE_UP=kernel` asks for it, `=xla` keeps XLA's GEMM and fusion; unset: the `weighed` form below
(which also serves a speculative verify chunk's rows and the rows after a Mamba layer through this kernel).

`weighed` (MAMBA_LLAMA_DECODE_GATE_UP=weighed, session 27): the launch between the o-projection and gate·up goes too.
XLA's o-projection is a split-K GEMM whose sum, residual add and the MLP's RMSNorm are a launch of their own (~2 µs a
layer at 64 rows, `fusion_226` in benchmarks/results/decode_profile_s27_prefetch.md). Here the o-projection + residual
is one Pallas launch (`fused_decode.matmul_residual_weigh`) that also writes its rows times the norm's weight, and
gate·up (`fused_decode.gate_up_weighed`) takes those straight into its dots and applies the norm's row scale to the
products (the rows' sums of squares written by the o-projection as partials since session 28:
`fused_decode.SQUARES`) — RMSNorm folded across as `split_k` folds it for q·k·v. Measured on
the H100 at batch 64, one process (benchmarks/results/decode_profile_s27_weighed.md): the step 0.800 / 0.800 ms
against 0.812 / 0.809, 195 launches instead of 226 (the o-projection + residual 3.6 µs a layer against XLA's GEMM +
sum 5.3, gate·up with the rows' squares beside its dots 5.6 against 4.8); issue 3's table in one process
(generate_s27_weighed.md): 0.825 against 0.836. At 16 and 32 rows (session 34, decode_profile_s34_guw.md, twice each
in one process): 0.666 / 0.666 → 0.656 / 0.655 ms a step at 16, 0.757 / 0.761 → 0.734 / 0.731 at 32, 224 launches
instead of 255. So it is the default at every dot-path row count (`DEFAULT_FORM`). Its kernels passed their GPU
tests at 16, 32 and 64 rows (test-gpu-s27-weighed.xml).

A `fold` form (norm weights folded into W_qkv / W_gate·up, the step five launches a layer at these rows) measured
slower on the H100 and was removed: 1.122 against the default's 0.894 ms a step at batch 64
(benchmarks/results/decode_profile_s22_fold.md; the GPU compiler re-folded the weights every step).
"""

from __future__ import annotations

import os

from mamba_llama_jax.errors import GenerationError
from pallas_kernels.fused_decode import DOT_ROWS

GATE_UP_ENV = "MAMBA_LLAMA_DECODE_GATE_UP"
DEFAULT_FORM = "weighed"  # where the environment says nothing (measured: module docstring)


def gate_up_form(rows: int) -> str:
    """The MLP form of a decode step of `rows` rows traced now (module docstring): "kernel" (the one-launch
    gate·up + SiLU·mul on XLA's normalised rows), "weighed" (the o-projection writing weighed rows for gate·up,
    no norm launch) or "xla" (XLA's GEMM and fusion; always for rows other than 16, 32, 64). Unset: the measured
    DEFAULT_FORM."""
    v = os.environ.get(GATE_UP_ENV, "").strip().lower()
    if v not in ("", "xla", "kernel", "weighed"):
        raise GenerationError(f"{GATE_UP_ENV} must be 'kernel', 'weighed' or 'xla', got {v!r}")
    return (v or DEFAULT_FORM) if rows in DOT_ROWS else "xla"
