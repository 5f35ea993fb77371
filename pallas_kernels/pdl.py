"""Hopper's programmatic dependent launch (PDL) from inside this project's Triton kernels.

What it is: on compute capability >= 9.0 a kernel launched with PDL may be put on the SMs before the kernel it
depends on has finished, and waits (`griddepcontrol.wait`) before it reads that kernel's results. It is let on the
SMs once every program of the kernel before it has either exited or executed `griddepcontrol.launch_dependents`.
XLA launches its own kernels and Triton calls this way on Hopper (`xla_gpu_enable_pdl`, on by default; turning it
off cost the decode step 7-8 %, benchmarks/results/generate_s18_flags.md), but none of this project's Pallas
kernels executes `launch_dependents`, so the kernel after each of them reaches the SMs only once all of its
programs have exited. `triggered` makes a kernel execute it as its first instruction (`trigger_enabled`): the
next kernel's programs are then resident and waiting when this one ends. Correctness does not depend on where the
trigger sits, provided the kernel launched early waits (`griddepcontrol.wait` returns only when the kernels it
depends on have completed and their writes are visible): `triggered` kernels wait right after their trigger.

`globaltimer_lo` reads the GPU's global nanosecond clock (low 32 bits) and `wait` is `griddepcontrol.wait`; the
PDL probe (benchmarks/probe_pdl.py) uses both to see when a kernel starts against when the one before it ends.

How: Pallas's own inline-assembly primitive is pure (an op whose result is unused is deleted, and it may be moved),
so the instructions here are one primitive of this file with a side effect, lowered to Triton's inline assembly
with `pure=False`, as Triton's `gdc_launch_dependents` is. That needs Pallas's Triton lowering internals
(`jax._src`); where they are missing (another jax) `available()` is False and nothing is triggered.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

TRIGGER_ENV = "MAMBA_LLAMA_PDL_TRIGGER"
# Off until measured in the decode loop on an H100 / H200 (benchmarks/bench_decode_profile.py variant `pdl`).
TRIGGER_DEFAULT = False


def _build() -> Any:
    """The side-effecting inline-asm primitive (None where this jax's Pallas Triton lowering is not as expected)."""
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
    prim = jax_core.Primitive("mamba_llama_inline_asm_i32")

    @prim.def_effectful_abstract_eval
    def _abstract(*, asm: str) -> Any:
        del asm
        return jax_core.ShapedArray((), jnp.int32), {effect}

    @lowering.register_lowering(prim)
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


def _pdl_device() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    cc = str(getattr(dev, "compute_capability", ""))
    return dev.platform == "gpu" and cc[:1].isdigit() and int(cc.split(".")[0]) >= 9


def trigger_enabled() -> bool:
    """Whether Triton kernels launched on this machine trigger their dependents first (read at trace time):
    `MAMBA_LLAMA_PDL_TRIGGER` (1 / 0) if set, else TRIGGER_DEFAULT; never off a GPU of compute capability >= 9.0
    or where `available()` is False."""
    if not available() or not _pdl_device():
        return False
    env = os.environ.get(TRIGGER_ENV, "").strip().lower()
    if env:
        return env in ("1", "true", "yes", "on")
    return TRIGGER_DEFAULT


def triggered(kernel: Callable[..., None]) -> Callable[..., None]:
    """`kernel` executing `launch_dependents` before anything else, then `wait`: a kernel launched early reads
    nothing before the kernels it depends on are done, whether or not XLA put a wait at its entry (a second wait
    returns at once; where the kernel was not launched with PDL it returns at once too)."""

    def body(*refs: Any) -> None:
        launch_dependents()
        wait()
        kernel(*refs)

    return body
