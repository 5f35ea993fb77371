"""Chooses the Pallas kernel or the pure-JAX reference for each op, by backend, shape and dtype.

`MAMBA_LLAMA_FORCE_REFERENCE=1` forces the reference everywhere (read at call time, so a test or a notebook can
flip it). `last_choice("ssd")` says which implementation the latest trace picked, and `ssd_choice(...)` says which
one a call would pick, without running it. On a GPU `ssd` takes the Triton kernel, on Hopper (compute capability
9.x) the Mosaic GPU forward (`pallas_kernels/ssd_chunk_scan_mgpu.py`) wherever that kernel's limits allow.
`verify` / `verify_choice` do the same for the Mamba2 multistep verify (`pallas_kernels/multistep_verify.py`),
opt-in on GPUs until its compiled test has passed there.
`selective_scan` / `selective_scan_choice`: the Mamba1 scan (`pallas_kernels/selective_scan.py`), likewise opt-in.

Under a sharded jit with a context mesh (the trainer's step sets one) the kernels run per batch shard through
`batch_sharded`; the references are left to GSPMD, which partitions them itself.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.train.mesh import batch_split_axes

FORCE_REFERENCE_ENV = "MAMBA_LLAMA_FORCE_REFERENCE"
PALLAS_TRITON = "pallas_triton"
PALLAS_MOSAIC_TPU = "pallas_mosaic_tpu"  # pallas_kernels.ssd_chunk_scan_tpu: opt-in until run on a TPU
PALLAS_MOSAIC_GPU = "pallas_mosaic_gpu"  # pallas_kernels.ssd_chunk_scan_mgpu: the forward on Hopper GPUs
REFERENCE = "reference_chunked"

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
_last: dict[str, str] = {}


UNVERIFIED_ENV = "MAMBA_LLAMA_UNVERIFIED_KERNELS"


def unverified_allowed() -> bool:
    """Whether kernels not yet proven equal to their reference when compiled on a GPU may be chosen (benchmarks
    and the device test run set it; users get the reference until `make test-gpu` has passed for the kernel)."""
    return os.environ.get(UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


INTERPRET_ENV = "MAMBA_LLAMA_INTERPRET_KERNELS"


def interpret_kernels() -> bool:
    """Whether kernels that support it run in Pallas interpret mode off-GPU (tests: the whole decode path wired
    through the kernels on a CPU; slow, tiny shapes only). Read at trace time."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def force_reference() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def kernel_allowed(gpu_verified: bool) -> bool:
    """Whether a Pallas kernel may be chosen at all (its shapes aside): never with MAMBA_LLAMA_FORCE_REFERENCE=1;
    on a GPU once its compiled test has passed (`gpu_verified`, its file's GPU_VERIFIED) or with
    MAMBA_LLAMA_UNVERIFIED_KERNELS=1; off a GPU in interpret mode with MAMBA_LLAMA_INTERPRET_KERNELS=1 (tests)."""
    if force_reference():
        return False
    if _on_gpu():
        return gpu_verified or unverified_allowed()
    return interpret_kernels()


def last_choice(op: str = "ssd") -> str | None:
    """The implementation the most recent trace of `op` used (`pallas_triton`, for "ssd" also `pallas_mosaic_gpu`
    or `pallas_mosaic_tpu`, or the op's reference name)."""
    return _last.get(op)


def last_choices(*ops: str) -> dict[str, str | None]:
    """`last_choice` of each op, None for an op not traced yet: what a benchmark records beside its figures."""
    return {op: _last.get(op) for op in ops}


def forget_choices(*ops: str) -> None:
    """Forgets what `ops` chose (their `last_choices` become None), so that a run reports only its own traces and
    not those of code that ran before it in the process (e.g. other tests)."""
    for op in ops:
        _last.pop(op, None)


def record_choice(op: str, choice: str) -> None:
    """Lets sibling kernels (e.g. `pallas_kernels.decode_attention`) report their pick through `last_choice`."""
    _last[op] = choice


def is_pow2(v: int) -> bool:
    """Whether v is a positive power of two (Triton block sizes must be)."""
    return v > 0 and v & (v - 1) == 0


def pow2_at_least(v: int, least: int) -> int:
    """The smallest power of two >= v and >= `least` (a power of two): a Triton tile that holds v rows."""
    p = least
    while p < v:
        p *= 2
    return p


def pow2_dividing(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n: a block that tiles n exactly (Triton blocks are powers of two)."""
    blk = 1
    while blk * 2 <= cap and n % (blk * 2) == 0:
        blk *= 2
    return blk


def pow2_at_most(v: int) -> int:
    """The largest power of two <= v (v >= 1): a split count or block that a power-of-two tiling needs."""
    p = 1
    while p * 2 <= v:
        p *= 2
    return p


def check_ssd_args(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                   D: jax.Array | None = None, dt_bias: jax.Array | None = None,
                   initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                   chunk_size: int = 256, block_p: int | None = None, kernel: bool = True) -> None:
    """Raises KernelError naming the first bad argument; runs on shapes only, before anything is traced.
    `kernel=False` checks only what the reference needs too."""
    def bad(msg: str) -> KernelError:
        return KernelError(f"ssd: {msg}")

    if getattr(x, "ndim", None) != 4:
        raise bad(f"x must be (batch, length, heads, head_dim), got shape {getattr(x, 'shape', None)}")
    b, l, h, p = x.shape
    if l < 1:
        raise bad("x has an empty sequence axis")
    if dt.shape != (b, l, h):
        raise bad(f"dt must be (batch, length, heads) = {(b, l, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise bad(f"A must be (heads,) = ({h},), got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, l):
        raise bad(f"B must be (batch, length, groups, state) with batch, length = {(b, l)}, got {B.shape}")
    if C.shape != B.shape:
        raise bad(f"C must have B's shape {B.shape}, got {C.shape}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g:
        raise bad(f"the groups of B/C ({g}) must divide the heads ({h})")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None and v.shape != (h,):
            raise bad(f"{name} must be (heads,) = ({h},), got {v.shape}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise bad(f"initial_state must be (batch, heads, head_dim, state) = {(b, h, p, n)}, "
                  f"got {initial_state.shape}")
    if segment_ids is not None:
        if segment_ids.shape != (b, l):
            raise bad(f"segment_ids must be (batch, length) = {(b, l)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise bad(f"segment_ids must be integers, got {segment_ids.dtype}")
    for name, v in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if v.dtype not in _FLOATS:
            raise bad(f"{name} must be float32, bfloat16 or float16, got {v.dtype}")
    if not kernel:
        if chunk_size < 1:
            raise bad(f"chunk_size must be positive, got {chunk_size}")
        return
    if not (is_pow2(chunk_size) and 16 <= chunk_size <= 256):
        raise bad(f"chunk_size must be a power of two in [16, 256], got {chunk_size}")
    # Triton tiles are powers of two and the tensor-core products want >= 16 along every dimension.
    if not (is_pow2(p) and p >= 16) or not (is_pow2(n) and n >= 16):
        raise bad(f"head_dim ({p}) and state size ({n}) must be powers of two >= 16 for the Pallas kernel; "
                  "use mamba_llama_jax.ops.ssd.ssd_chunked (or pallas_kernels.dispatch.ssd) for other sizes")
    if block_p is not None and not (is_pow2(block_p) and 16 <= block_p <= p and p % block_p == 0):
        raise bad(f"block_p must be a power of two >= 16 dividing head_dim ({p}), got {block_p}")


def ssd_kernel_operands(x: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array | None,
                        dt_bias: jax.Array | None, initial_state: jax.Array | None) -> tuple[jax.Array, ...]:
    """(B, C, A, D, dt_bias, initial_state) as the chunked-SSD kernels (Triton and TPU) read them: B and C in x's
    dtype (the matrix products take one operand dtype; the Mamba layer produces x, B and C together), the rest
    fp32 with zeros for what is absent. Arguments already checked by `check_ssd_args`."""
    b, _, h, p = x.shape
    n = B.shape[3]
    if B.dtype != x.dtype or C.dtype != x.dtype:
        B, C = B.astype(x.dtype), C.astype(x.dtype)
    f32 = jnp.float32
    return (B, C, A.astype(f32), jnp.zeros((h,), f32) if D is None else D.astype(f32),
            jnp.zeros((h,), f32) if dt_bias is None else dt_bias.astype(f32),
            jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32))


def doc_index(segment_ids: jax.Array | None, b: int, l: int) -> jax.Array:
    """(b, l) int32 document number: 0 at position 0, +1 wherever the id changes. Masks compare these, so ids
    that come back (e.g. 0,0,1,1,0) still start a new document each time they change."""
    if segment_ids is None:
        return jnp.zeros((b, l), jnp.int32)
    s = segment_ids
    starts = jnp.concatenate([jnp.zeros((b, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def batch_sharded(fn: Callable[..., Any], batched: dict[str, jax.Array | None],
                  shared: dict[str, jax.Array | None] | None = None, **static: Any) -> Any:
    """`fn(**batched, **shared, **static)`, run on each device's rows when the context mesh splits the batch.

    A Pallas kernel is a custom call, which GSPMD cannot partition: under a batch-sharded jit it would gather
    the operands onto every device and run the whole global batch there. Inside `jax.shard_map` every device runs
    it on its own rows instead. `batched`: arrays with the batch on axis 0 (None for absent ones), split over the
    batch axes (`train.mesh.batch_split_axes`); `shared`: arrays every shard needs whole (A, D, dt_bias),
    replicated, their gradients summed over the shards; every output has the batch on axis 0. Without a context
    mesh, or with a batch the axes do not divide evenly, it is the plain call."""
    shared = shared or {}
    rows = next(v.shape[0] for v in batched.values() if v is not None)
    axes = batch_split_axes(rows)
    if axes is None:
        return fn(**batched, **shared, **static)

    def body(b: dict[str, jax.Array | None], s: dict[str, jax.Array | None]) -> Any:
        return fn(**b, **s, **static)
    # check_vma off: a kernel's primitives (pallas_call, custom_vjp) need not carry varying-axis rules; the
    # specs say all there is (batch split, the rest replicated), and the transpose psums the shared gradients
    return jax.shard_map(body, in_specs=(P(axes), P()), out_specs=P(axes), check_vma=False)(batched, shared)


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def _on_tpu() -> bool:
    try:
        return jax.default_backend() == "tpu"
    except RuntimeError:
        return False


def _on_hopper() -> bool:
    """A GPU of compute capability 9.x (H100 / H200): what the Mosaic GPU kernel's wgmma needs."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def _gpu_ssd_choice(x: jax.Array, B: jax.Array, kernel_chunk: int) -> str:
    # Mosaic GPU's forward beat the Triton kernel's by 1.25-1.39x on the H200 (benchmarks/results/scan_mgpu.md;
    # the backward is the Triton one either way), so Hopper takes it wherever its own limits allow.
    from pallas_kernels import ssd_chunk_scan_mgpu as mg
    if not _on_hopper() or not (mg.GPU_VERIFIED or unverified_allowed()):
        return PALLAS_TRITON
    try:
        mg.check_mgpu_args(x, B, kernel_chunk, interpret=False)
    except KernelError:
        return PALLAS_TRITON
    return PALLAS_MOSAIC_GPU


def _tpu_ssd_choice(x, dt, A, B, C, arrays: dict) -> str:
    # The Mosaic kernel equals the reference in TPU interpret mode and compiles with libtpu, but has never run
    # nor been timed on a TPU: the XLA reference stays the default there until it has.
    if not unverified_allowed():
        return REFERENCE
    from pallas_kernels.ssd_chunk_scan_tpu import TPU_CHUNK, check_tpu_args
    try:
        check_tpu_args(x, dt, A, B, C, chunk_size=TPU_CHUNK, **arrays)
    except KernelError:
        return REFERENCE
    return PALLAS_MOSAIC_TPU


def ssd_choice(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, **kw) -> str:
    """Which implementation `ssd` would use for these arguments (raises KernelError for bad ones)."""
    kw = dict(kw)
    chunk = kw.pop("chunk_size", 256)
    arrays = {k: kw.get(k) for k in ("D", "dt_bias", "initial_state", "segment_ids")}
    check_ssd_args(x, dt, A, B, C, chunk_size=chunk, kernel=False, **arrays)
    if not force_reference() and _on_tpu():
        return _tpu_ssd_choice(x, dt, A, B, C, arrays)
    if force_reference() or not _on_gpu():
        return REFERENCE
    kernel_chunk = kw.get("kernel_chunk_size", 64)
    try:
        check_ssd_args(x, dt, A, B, C, chunk_size=kernel_chunk, **arrays)
    except KernelError:
        return REFERENCE  # a shape the kernel does not tile (e.g. head_dim 48): the reference takes it
    return _gpu_ssd_choice(x, B, kernel_chunk)


def ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
        D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
        initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
        chunk_size: int = 256, kernel_chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD, same signature and result as `mamba_llama_jax.ops.ssd.ssd_chunked`.

    On GPU runs the Pallas kernel (on Hopper the Mosaic GPU forward where it tiles, else Triton); elsewhere (CPU;
    TPU unless MAMBA_LLAMA_UNVERIFIED_KERNELS=1 opts in to the Mosaic kernel) or with MAMBA_LLAMA_FORCE_REFERENCE=1
    the XLA reference. `chunk_size` is the reference's chunk; the GPU kernels tile by `kernel_chunk_size` (64 fits
    the on-chip (chunk x chunk) tiles best): the maths is chunk-independent, only round-off differs.
    """
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state, segment_ids=segment_ids)
    choice = ssd_choice(x, dt, A, B, C, chunk_size=chunk_size, kernel_chunk_size=kernel_chunk_size,
                        **{k: v for k, v in kw.items() if k != "dt_softplus"})
    _last["ssd"] = choice
    batched = dict(x=x, dt=dt, B=B, C=C, initial_state=initial_state, segment_ids=segment_ids)
    shared = dict(A=A, D=D, dt_bias=dt_bias)
    if choice == PALLAS_TRITON:
        from pallas_kernels.ssd_chunk_scan import ssd_chunk_scan
        return batch_sharded(ssd_chunk_scan, batched, shared, dt_softplus=dt_softplus, chunk_size=kernel_chunk_size)
    if choice == PALLAS_MOSAIC_GPU:
        from pallas_kernels.ssd_chunk_scan_mgpu import ssd_chunk_scan_mgpu
        return batch_sharded(ssd_chunk_scan_mgpu, batched, shared, dt_softplus=dt_softplus,
                             chunk_size=kernel_chunk_size)
    if choice == PALLAS_MOSAIC_TPU:  # tiles by its own TPU_CHUNK (the MXU's edge), not kernel_chunk_size
        from pallas_kernels.ssd_chunk_scan_tpu import TPU_CHUNK, ssd_chunk_scan_tpu
        return batch_sharded(ssd_chunk_scan_tpu, batched, shared, dt_softplus=dt_softplus, chunk_size=TPU_CHUNK)
    from mamba_llama_jax.ops.ssd import ssd_chunked
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, **kw)


# -------------------------------------------------------------------------------------- multistep verify


def verify_choice(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                  D: jax.Array | None = None, dt_bias: jax.Array | None = None,
                  accepted: jax.Array | None = None) -> str:
    """Which implementation `verify` would use (raises KernelError for bad arguments): the Pallas kernel on a
    GPU once its compiled test has passed (`multistep_verify.GPU_VERIFIED`, or MAMBA_LLAMA_UNVERIFIED_KERNELS=1)
    and off a GPU with MAMBA_LLAMA_INTERPRET_KERNELS=1 (interpret mode), for shapes it tiles; the reference
    `ops.ssd.ssd_verify` otherwise."""
    from pallas_kernels import multistep_verify as mv
    kw = dict(D=D, dt_bias=dt_bias, accepted=accepted)
    mv.check_verify_args(state, x, dt, A, B, C, kernel=False, **kw)
    if not kernel_allowed(mv.GPU_VERIFIED):
        return mv.REFERENCE
    try:
        mv.check_verify_args(state, x, dt, A, B, C, kernel=True, **kw)
    except KernelError:
        return mv.REFERENCE  # e.g. head_dim 48: the reference takes it
    return mv.PALLAS_TRITON


def verify(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
           D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = True,
           accepted: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """k decode steps from a cached Mamba2 state, same signature and result as `ops.ssd.ssd_verify`: y and the
    per-prefix states, or (given `accepted`) the state after that many steps. Records the choice
    (`last_choice("verify")`)."""
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, accepted=accepted)
    choice = verify_choice(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, accepted=accepted)
    _last["verify"] = choice
    if choice == PALLAS_TRITON:
        from pallas_kernels.multistep_verify import multistep_verify
        return batch_sharded(multistep_verify, dict(state=state, x=x, dt=dt, B=B, C=C, accepted=accepted),
                             dict(A=A, D=D, dt_bias=dt_bias), dt_softplus=dt_softplus, interpret=not _on_gpu())
    from mamba_llama_jax.ops.ssd import ssd_verify
    return ssd_verify(state, x, dt, A, B, C, **kw)


# ------------------------------------------------------------------------------------- Mamba1 selective scan

SELECTIVE_REFERENCE = "reference_sequential"


def selective_scan_choice(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                          D: jax.Array | None = None, z: jax.Array | None = None,
                          delta_bias: jax.Array | None = None, initial_state: jax.Array | None = None,
                          segment_ids: jax.Array | None = None) -> str:
    """Which implementation `selective_scan` would use (raises KernelError for bad arguments): the Pallas kernel
    on a GPU once its compiled test has passed (`selective_scan.GPU_VERIFIED`, or MAMBA_LLAMA_UNVERIFIED_KERNELS=1)
    and off a GPU with MAMBA_LLAMA_INTERPRET_KERNELS=1; the sequential reference otherwise. The kernel pads
    whatever it does not tile, so every valid shape may take it."""
    from pallas_kernels import selective_scan as ss
    ss.check_selective_scan_args(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                                 segment_ids=segment_ids, kernel=False)
    return PALLAS_TRITON if kernel_allowed(ss.GPU_VERIFIED) else SELECTIVE_REFERENCE


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                   D: jax.Array | None = None, z: jax.Array | None = None, delta_bias: jax.Array | None = None,
                   delta_softplus: bool = True, initial_state: jax.Array | None = None,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mamba1 selective scan, same signature and result as `mamba_llama_jax.ops.scan.selective_scan`; records
    the choice (`last_choice("selective_scan")`)."""
    arrays = dict(D=D, z=z, delta_bias=delta_bias, initial_state=initial_state, segment_ids=segment_ids)
    choice = selective_scan_choice(u, delta, A, B, C, **arrays)
    _last["selective_scan"] = choice
    if choice == PALLAS_TRITON:
        from pallas_kernels.selective_scan import selective_scan_pallas
        batched = dict(u=u, delta=delta, B=B, C=C, z=z, initial_state=initial_state, segment_ids=segment_ids)
        return batch_sharded(selective_scan_pallas, batched, dict(A=A, D=D, delta_bias=delta_bias),
                             delta_softplus=delta_softplus, interpret=not _on_gpu())
    from mamba_llama_jax.ops.scan import selective_scan as reference
    return reference(u, delta, A, B, C, delta_softplus=delta_softplus, **arrays)
