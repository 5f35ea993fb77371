"""Hopper's programmatic dependent launch (PDL) instructions and the global timer, inside this project's Triton
kernels: what benchmarks/probe_pdl.py measures XLA's launches of Pallas kernels with.

What PDL is: on compute capability >= 9.0 a kernel launched with PDL may be put on the SMs before the kernel it
depends on has finished, and waits (`griddepcontrol.wait`) before it reads that kernel's results; it is let on the
SMs once every program of the kernel before has exited or executed `griddepcontrol.launch_dependents`. XLA launches
its own kernels this way on Hopper (`xla_gpu_enable_pdl`, on by default; off cost the decode step 7-8 %,
benchmarks/results/generate_s18_flags.md). For Pallas kernels the probe found no early start on the H100
(benchmarks/results/probe_pdl_s29.md): a Pallas kernel entered 448 ns after the one before it ended whether or not
that one triggered its dependents first, so XLA either launches Pallas kernels without PDL or waits at their entry.
Session 29 also had every Pallas kernel execute `launch_dependents` then `wait` first: no faster at batch 64 and
0.041 ms a step slower at batch 1 (0.515 vs 0.474 ms, generate_s29_lm_pdl.md), so that was removed.

`launch_dependents`, `wait` and `globaltimer_lo` (the GPU's global nanosecond clock, low 32 bits) are one primitive of
this file with a side effect, lowered to Triton's inline assembly with `pure=False` as Triton's own
`gdc_launch_dependents` is (Pallas's inline-assembly primitive is pure: an op whose result is unused is deleted,
and it may be moved). That needs Pallas's Triton lowering internals (`jax._src`); where they are missing (another
jax) `available()` is False.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def triton_internals() -> Any:
    """What a side-effecting inline-assembly primitive of the project's Triton kernels is built from, as a namespace
    (core, ir, tt_dialect, lowering, effect), or None where this jax's Pallas Triton lowering is not as expected."""
    import types
    try:
        from jax._src import core as jax_core
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering
        from jax._src.pallas.triton import primitives as tt_prims
    except ImportError:
        return None
    effect = getattr(tt_prims, "barrier_effect", None)
    if effect is None:
        return None
    return types.SimpleNamespace(core=jax_core, ir=ir, tt_dialect=tt_dialect, lowering=lowering, effect=effect)


def _build() -> Any:
    """The side-effecting inline-asm primitive (None where this jax's Pallas Triton lowering is not as expected)."""
    t = triton_internals()
    if t is None:
        return None
    ir, tt_dialect, effect = t.ir, t.tt_dialect, t.effect
    prim = t.core.Primitive("mamba_llama_inline_asm_i32")

    @prim.def_effectful_abstract_eval
    def _abstract(*, asm: str) -> Any:
        del asm
        return t.core.ShapedArray((), jnp.int32), {effect}

    @t.lowering.register_lowering(prim)
    def _lower(ctx: Any, *, asm: str) -> Any:
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        # one result type: the builder returns the op's one value
        return tt_dialect.elementwise_inline_asm([i32], asm, constraints="=r", pure=False, packed_element=1, args=[])

    return prim


_PRIM = _build()


def available() -> bool:
    """Whether this jax lets the kernels execute the instructions here."""
    return _PRIM is not None


def _asm_i32(asm: str) -> jax.Array:
    if _PRIM is None:
        raise RuntimeError("this jax's Pallas Triton lowering has no room for the PDL instructions")
    return _PRIM.bind(asm=asm)


def launch_dependents() -> None:
    """`griddepcontrol.launch_dependents` (inside a Triton kernel on compute capability >= 9.0)."""
    _asm_i32("griddepcontrol.launch_dependents; mov.u32 $0, 0;")


def wait() -> None:
    """`griddepcontrol.wait`: returns once the kernels this one depends on have completed, writes visible."""
    _asm_i32("griddepcontrol.wait; mov.u32 $0, 0;")


def globaltimer_lo() -> jax.Array:
    """The global nanosecond timer's low 32 bits, an int32 scalar (wraps every ~4.3 s: take differences mod 2³²)."""
    return _asm_i32("mov.u32 $0, %globaltimer_lo;")
