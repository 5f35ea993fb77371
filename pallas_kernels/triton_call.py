"""The one way this project's Triton kernels are launched: `pallas_call` with the Triton compiler parameters on a
GPU; off it (tests) Pallas interpret mode, checking every access against the arrays' bounds.

Why the check: Pallas's plain interpret mode turns every ref access into a `dynamic_slice` / `dynamic_update_slice`,
which clamp an out-of-range start into range. A kernel that reads or writes past an array's end therefore passes
its CPU tests, and on a GPU reads garbage or dies with an illegal address or an "unspecified launch failure" that
takes the whole process down. So interpret mode runs Pallas's TPU interpreter instead (unless
`MAMBA_LLAMA_CHECK_BOUNDS=0`), which raises on any access outside an array and fills outputs with NaN before the
kernel runs, so an output element no program writes shows up too. Two things differ from how these kernels run
under Triton, and this file bridges them: a Triton kernel reads and writes the arrays themselves (an aliased
output *is* its input: the decode-attention kernels write the new K/V through the cache's input ref), while the
TPU interpreter gives the kernel copies of whole-array blocks that start uninitialised. So under the check an
aliased output starts as a copy of its input, and the kernel sees that output's ref in place of the input's.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax.numpy as jnp
from jax.experimental import pallas as pl

CHECK_BOUNDS_ENV = "MAMBA_LLAMA_CHECK_BOUNDS"


def check_bounds() -> bool:
    """Whether interpret-mode kernels run bounds-checked: yes unless `MAMBA_LLAMA_CHECK_BOUNDS=0` (read at trace
    time; the check costs the kernel tests ~7 %)."""
    return os.environ.get(CHECK_BOUNDS_ENV, "").strip().lower() not in ("0", "false", "no", "off")


def compiler_params(num_warps: int, num_stages: int) -> Any:
    """Triton's compile parameters for a GPU launch."""
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_call(kernel: Callable[..., None], *, grid: tuple[int, ...], out_shape: Any, interpret: bool,
                num_warps: int, num_stages: int, name: str,
                input_output_aliases: dict[int, int] | None = None) -> Callable[..., Any]:
    """`pl.pallas_call` of a Triton-style kernel (no block specs: every ref is a whole array, programs index it
    themselves). On a GPU (`interpret` False) it compiles with `num_warps` / `num_stages`; in interpret mode it
    runs on the CPU, bounds-checked unless `MAMBA_LLAMA_CHECK_BOUNDS=0` (module docstring)."""
    aliases = dict(input_output_aliases or {})
    common = dict(grid=grid, out_shape=out_shape, name=name, input_output_aliases=aliases)
    if not interpret:
        return pl.pallas_call(kernel, compiler_params=compiler_params(num_warps, num_stages),
                              interpret=False, **common)
    if not check_bounds():
        return pl.pallas_call(kernel, interpret=True, **common)
    from jax.experimental.pallas import tpu as pltpu
    params = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")

    def call(*args: Any) -> Any:
        n_in = len(args)

        def checked(*refs: Any) -> None:
            outs = refs[n_in:]
            if aliases:
                first = jnp.bool_(True)
                for axis in range(len(grid)):
                    first = first & (pl.program_id(axis) == 0)

                @pl.when(first)
                def _start_as_input() -> None:  # the output block persists over the grid: copy once
                    for i, o in aliases.items():
                        outs[o][...] = refs[i][...]
            ins = [outs[aliases[i]] if i in aliases else refs[i] for i in range(n_in)]
            kernel(*ins, *outs)

        return pl.pallas_call(checked, interpret=params, **common)(*args)

    return call


def reset_checked_interpreter() -> None:
    """Clears the TPU interpreter's state after a bounds-check error (it must be reset before its next use)."""
    from jax.experimental.pallas import tpu as pltpu
    pltpu.reset_tpu_interpret_mode_state()

