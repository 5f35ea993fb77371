"""Mosaic GPU chunked-SSD forward (`pallas_kernels.ssd_chunk_scan_mgpu`) == `mamba_llama_jax.ops.ssd.ssd_chunked`.

CPU: the kernel runs in Mosaic GPU interpret mode (`interpret=True`: `plgpu.InterpretGPUParams`, the mode that
`plgpu.force_gpu_interpret_mode` switches on; jax >= 0.11) at small shapes; the backward is the Triton kernel's
in Pallas interpret mode. The whole Mosaic GPU lowering (layouts, wgmma tiles, TMA, shared-memory budget) also runs
on the CPU through `jax.export(..., platforms=("cuda",))`; only ptxas and the run itself need the GPU
(`-m gpu`, on a Hopper device). A Mosaic GPU kernel traces to `mpmd_map` (what `plgpu.kernel` binds), not to
`pallas_call`: the tests look for that primitive and the kernel's name, so a fallback to XLA cannot pass.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.ssd import ssd_chunked
from pallas_kernels import dispatch
from pallas_kernels import ssd_chunk_scan_mgpu as mg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import grad_of_outputs, make_ssd_inputs, needs_gpu, rel, ssd_caller  # noqa: E402

needs_interpret = pytest.mark.skipif(
    not mg.interpret_available(),
    reason=f"jax {jax.__version__} has no Mosaic GPU interpret mode (plgpu.force_gpu_interpret_mode)")

ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def has_mgpu_kernel(fn, *args) -> bool:
    """The traced function holds the Mosaic GPU kernel (plgpu.kernel binds mpmd_map, named after the body)."""
    text = str(jax.make_jaxpr(fn)(*args))
    return "mpmd_map" in text and mg.KERNEL_NAME in text


def check_forward(ins, segs, *, softplus=True, tol, interpret=True, chunk=64, against=None):
    present = [a for a in ARGS if ins[a] is not None]
    vals = [ins[a] for a in present]
    fk = ssd_caller(mg.ssd_chunk_scan_mgpu, ins, present, segs, softplus, chunk_size=chunk, interpret=interpret)
    assert has_mgpu_kernel(fk, *vals), "the kernel path must trace the Mosaic GPU kernel"
    y, fin = jax.jit(fk)(*vals)
    # the reference in fp32 on upcast inputs: the kernel must match the maths, not the reference's round-off
    fr = against or ssd_caller(ssd_chunked, ins, present, segs, softplus, chunk_size=chunk)
    yr, finr = jax.jit(fr)(*[v.astype(jnp.float32) for v in vals])
    assert y.shape == ins["x"].shape and y.dtype == ins["x"].dtype and fin.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert rel(y, yr) < tol, ("y", rel(y, yr))
    assert rel(fin, finr) < tol, ("final_state", rel(fin, finr))


# (b, l, h, p, n, g, dtype, segments, initial state)
CPU_CASES = [
    pytest.param(2, 100, 4, 64, 32, 2, jnp.float32, False, True, id="odd-length-groups-init"),
    pytest.param(1, 64, 2, 64, 16, 2, jnp.float32, False, False, id="b1-g=h-one-chunk", marks=pytest.mark.slow),
    pytest.param(2, 150, 2, 64, 64, 1, jnp.float32, True, True, id="g1-segments-init"),
    pytest.param(1, 130, 4, 64, 64, 2, jnp.bfloat16, True, True, id="bf16-segments-odd-length"),
    pytest.param(1, 96, 2, 128, 32, 2, jnp.bfloat16, False, True, id="bf16-p128", marks=pytest.mark.slow),
]


@needs_interpret
@pytest.mark.parametrize("b,l,h,p,n,g,dtype,seg,init", CPU_CASES)
def test_interpret_matches_reference(b, l, h, p, n, g, dtype, seg, init):
    ins, segs = make_ssd_inputs(b, l, h, p, n, g, dtype=dtype, seg=seg, init=init, seed=l + h, seg_rate=0.03)
    if seg:
        assert int(segs.max()) > 0, "the case must hold a document boundary"
    check_forward(ins, segs, tol=2e-2 if dtype == jnp.bfloat16 else 1e-5)


@needs_interpret
def test_interpret_optional_args_absent_and_no_softplus():
    ins, segs = make_ssd_inputs(1, 80, 2, 64, 16, 1, init=False, positive_dt=True, seed=3)
    ins["D"] = None
    ins["dt_bias"] = None
    check_forward(ins, segs, softplus=False, tol=1e-5)


@needs_interpret
def test_interpret_chunk128():
    ins, segs = make_ssd_inputs(1, 200, 2, 64, 32, 2, dtype=jnp.bfloat16, seed=4)
    check_forward(ins, segs, chunk=128, tol=2e-2)


@needs_interpret
def test_gradient_through_triton_backward_matches_reference():
    ins, segs = make_ssd_inputs(1, 100, 2, 64, 16, 1, seg=True, seed=11, seg_rate=0.03)
    present = list(ARGS)
    vals = [ins[a] for a in present]
    gk_fn = grad_of_outputs(ssd_caller(mg.ssd_chunk_scan_mgpu, ins, present, segs, True, chunk_size=64,
                                       interpret=True), len(present))
    jaxpr = str(jax.make_jaxpr(gk_fn)(*vals))
    assert mg.KERNEL_NAME in jaxpr, "the forward must be the Mosaic GPU kernel"
    assert "ssd_chunk_scan_bwd" in jaxpr, "the backward must be the Triton kernel, not an XLA VJP"
    gk = jax.jit(gk_fn)(*vals)
    gr = jax.jit(grad_of_outputs(ssd_caller(ssd_chunked, ins, present, segs, True, chunk_size=64),
                                 len(present)))(*vals)
    for name, a, r in zip(present, gk, gr):
        assert a.shape == ins[name].shape and a.dtype == ins[name].dtype, name
        assert rel(a, r) < 1e-4, (name, rel(a, r))


# ------------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("change,kw,match", [
    (dict(dt=jnp.zeros((1, 64, 3))), {}, "dt must be"),
    (dict(x=jnp.zeros((1, 64, 2, 64), jnp.int32)), {}, "x must be float32"),
    (dict(C=jnp.zeros((1, 64, 2, 8))), {}, "C must have B's shape"),
    (dict(x=jnp.zeros((1, 64, 2, 32)), initial_state=None), {}, "multiple of 64"),
    ({}, dict(chunk_size=32), "chunk_size must be 64 or 128"),
    ({}, dict(chunk_size=128, n=256), "shared memory"),
    ({}, dict(interpret=False), "bfloat16 or float16 on the GPU"),
])
def test_bad_arguments_raise_kernel_error(change, kw, match):
    kw = dict(kw)
    n = kw.pop("n", 16)
    ins, _ = make_ssd_inputs(1, 64, 2, 64, n, 2, seed=1)
    if n == 256:
        ins["x"] = ins["x"].astype(jnp.bfloat16)
    ins.update(change)
    kw.setdefault("interpret", True)
    with pytest.raises(KernelError, match=match):
        mg.ssd_chunk_scan_mgpu(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], D=ins["D"],
                               dt_bias=ins["dt_bias"], initial_state=ins["initial_state"], **kw)


# --------------------------------------------------------------------------- Mosaic GPU lowering, on the CPU


def _export_for_cuda(b, l, h, p, n, g, *, seg: bool, chunk: int = 64, dtype=jnp.bfloat16) -> str:
    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    specs = [S((b, l, h, p), dtype), S((b, l, h), f32), S((h,), f32), S((b, l, g, n), dtype),
             S((b, l, g, n), dtype), S((h,), f32), S((h,), f32), S((b, h, p, n), f32)]
    if seg:
        specs.append(S((b, l), jnp.int32))

    def f(x, dt, A, B, C, D, bias, init, *segs):
        return mg.ssd_chunk_scan_mgpu(x, dt, A, B, C, D=D, dt_bias=bias, initial_state=init,
                                      segment_ids=segs[0] if segs else None, chunk_size=chunk)
    try:
        from jax import export
        exported = export.export(jax.jit(f), platforms=("cuda",))(*specs)
    except ImportError as e:  # pragma: no cover - depends on the jaxlib build
        pytest.skip(f"this jaxlib cannot lower Mosaic GPU: {e!r}")
    return exported.mlir_module()


@pytest.mark.parametrize("shape,seg,chunk,dtype", [
    pytest.param((1, 200, 4, 64, 32, 2), True, 64, jnp.bfloat16, id="segments-odd-length-groups"),
    pytest.param((1, 256, 2, 64, 64, 1), False, 128, jnp.float16, id="f16-chunk128"),
    pytest.param((2, 512, 4, 64, 128, 4), True, 64, jnp.bfloat16, id="n128-segments"),
    pytest.param((8, 2048, 9, 64, 64, 9), False, 64, jnp.bfloat16, id="smollm2-shape"),
])
def test_mosaic_gpu_lowering_for_hopper_on_cpu(shape, seg, chunk, dtype):
    """The whole Mosaic GPU lowering (register layouts, wgmma tiles, TMA copies, shared-memory budget; arch 9.0)
    succeeds: what is left for the device is ptxas and the run."""
    module = _export_for_cuda(*shape, seg=seg, chunk=chunk, dtype=dtype)
    assert "mosaic_gpu" in module


# --------------------------------------------------------------------------------------- compiled, on the GPU


needs_hopper = pytest.mark.skipif(not dispatch._on_hopper(),
                                  reason="the Mosaic GPU kernel uses wgmma: needs compute capability 9.x")


@pytest.mark.gpu
@needs_gpu
@needs_hopper
def test_gpu_compiled_matches_triton_and_reference():
    from pallas_kernels.ssd_chunk_scan import ssd_chunk_scan
    b, l, h, p, n, g = 8, 2048, 9, 64, 64, 9
    ins, segs = make_ssd_inputs(b, l, h, p, n, g, dtype=jnp.bfloat16, seed=7)
    present = list(ARGS)
    vals = [ins[a] for a in present]
    triton = ssd_caller(ssd_chunk_scan, ins, present, segs, True, chunk_size=64)
    check_forward(ins, segs, tol=2e-2, interpret=False)
    y, fin = jax.jit(ssd_caller(mg.ssd_chunk_scan_mgpu, ins, present, segs, True, chunk_size=64))(*vals)
    yt, fint = jax.jit(triton)(*vals)
    assert rel(y, yt) < 1e-2, rel(y, yt)
    assert rel(fin, fint) < 1e-2, rel(fin, fint)
    gk = jax.jit(grad_of_outputs(ssd_caller(mg.ssd_chunk_scan_mgpu, ins, present, segs, True, chunk_size=64),
                                 len(present)))(*vals)
    gt = jax.jit(grad_of_outputs(triton, len(present)))(*vals)
    for name, a, t in zip(present, gk, gt):
        assert rel(a, t) < 2e-2, (name, rel(a, t))


# ---------------------------------------------------------------------------------------------- the dispatcher


def _as_gpu(monkeypatch, hopper: bool) -> None:
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_on_hopper", lambda: hopper)
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)


def test_dispatcher_takes_mgpu_on_hopper_where_it_tiles(monkeypatch):
    ins, _ = make_ssd_inputs(2, 128, 2, 64, 32, 2, dtype=jnp.bfloat16)
    args = [ins[a] for a in ("x", "dt", "A", "B", "C")]
    _as_gpu(monkeypatch, hopper=True)
    assert dispatch.ssd_choice(*args) == dispatch.PALLAS_MOSAIC_GPU
    assert dispatch.ssd_choice(*args, kernel_chunk_size=128) == dispatch.PALLAS_MOSAIC_GPU
    for chunk in (32, 256):  # mgpu tiles 64 / 128; Triton takes 16..256
        assert dispatch.ssd_choice(*args, kernel_chunk_size=chunk) == dispatch.PALLAS_TRITON, chunk
    f32 = [a.astype(jnp.float32) if i in (0, 3, 4) else a for i, a in enumerate(args)]
    assert dispatch.ssd_choice(*f32) == dispatch.PALLAS_TRITON  # fp32 x: no tf32 wgmma with transposes
    narrow, _ = make_ssd_inputs(2, 128, 2, 32, 32, 2, dtype=jnp.bfloat16)  # head_dim 32: Triton only
    assert dispatch.ssd_choice(*[narrow[a] for a in ("x", "dt", "A", "B", "C")]) == dispatch.PALLAS_TRITON
    monkeypatch.setattr(mg, "GPU_VERIFIED", False)
    monkeypatch.delenv(dispatch.UNVERIFIED_ENV, raising=False)
    assert dispatch.ssd_choice(*args) == dispatch.PALLAS_TRITON
    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    assert dispatch.ssd_choice(*args) == dispatch.PALLAS_MOSAIC_GPU
    _as_gpu(monkeypatch, hopper=False)  # an A100 (8.0): wgmma does not exist there
    assert dispatch.ssd_choice(*args) == dispatch.PALLAS_TRITON
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert dispatch.ssd_choice(*args) == dispatch.REFERENCE


@pytest.mark.parametrize("platform,capability,hopper", [
    ("gpu", "9.0", True), ("gpu", "8.0", False), ("gpu", "8.9", False), ("gpu", "10.0", False),
    ("cpu", "", False),
])
def test_dispatcher_reads_the_compute_capability(monkeypatch, platform, capability, hopper):
    """Only compute capability 9.x (H100 / H200) takes the Mosaic GPU kernel: it is built of wgmma, which
    neither Ampere / Ada (8.x) nor Blackwell (10.x) run."""
    import types

    ins, _ = make_ssd_inputs(1, 64, 2, 64, 16, 1, dtype=jnp.bfloat16)
    args = [ins[a] for a in ("x", "dt", "A", "B", "C")]
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    fake = types.SimpleNamespace(platform=platform, compute_capability=capability)
    monkeypatch.setattr(jax, "devices", lambda *a, **k: [fake])
    assert dispatch._on_hopper() is hopper
    want = dispatch.PALLAS_MOSAIC_GPU if hopper else dispatch.PALLAS_TRITON
    assert dispatch.ssd_choice(*args) == want


def check_dispatched(ins, segs, *, tol_y: float, tol_g: float) -> None:
    """`dispatch.ssd` with every optional argument picks the Mosaic GPU kernel, forward and gradients (through
    its custom_vjp: the Triton backward) equal to the fp32 reference."""
    vals = [ins[a] for a in ARGS]
    fk = ssd_caller(dispatch.ssd, ins, ARGS, segs, True)
    fr = ssd_caller(ssd_chunked, ins, ARGS, segs, True, chunk_size=64)
    assert has_mgpu_kernel(fk, *vals)
    assert dispatch.last_choice("ssd") == dispatch.PALLAS_MOSAIC_GPU
    vals32 = [v.astype(jnp.float32) for v in vals]
    y, fin = jax.jit(fk)(*vals)
    yr, finr = jax.jit(fr)(*vals32)
    assert rel(y, yr) < tol_y and rel(fin, finr) < tol_y, (rel(y, yr), rel(fin, finr))
    gk_fn = grad_of_outputs(fk, len(ARGS))
    jaxpr = str(jax.make_jaxpr(gk_fn)(*vals))
    assert mg.KERNEL_NAME in jaxpr and "ssd_chunk_scan_bwd" in jaxpr
    assert dispatch.last_choice("ssd") == dispatch.PALLAS_MOSAIC_GPU
    gk = jax.jit(gk_fn)(*vals)
    gr = jax.jit(grad_of_outputs(fr, len(ARGS)))(*vals32)
    for name, a, r in zip(ARGS, gk, gr):
        assert rel(a, r) < tol_g, (name, rel(a, r))


@needs_interpret
def test_dispatcher_runs_mgpu_with_its_arguments(monkeypatch):
    """`dispatch.ssd` hands every argument to the Mosaic GPU kernel (here in interpret mode, fp32)."""
    import functools

    _as_gpu(monkeypatch, hopper=True)
    monkeypatch.setattr(mg, "ssd_chunk_scan_mgpu", functools.partial(mg.ssd_chunk_scan_mgpu, interpret=True))
    orig = mg.check_mgpu_args  # fp32 x is refused for the GPU, allowed in interpret mode: check as interpret
    monkeypatch.setattr(mg, "check_mgpu_args", lambda x, B, c, interpret: orig(x, B, c, True))
    ins, segs = make_ssd_inputs(1, 96, 2, 64, 16, 1, dtype=jnp.float32, seg=True, seed=3)
    check_dispatched(ins, segs, tol_y=1e-5, tol_g=1e-4)


@pytest.mark.gpu
@needs_gpu
@needs_hopper
def test_gpu_dispatcher_takes_mgpu_and_matches_reference(monkeypatch):
    """On a real Hopper GPU `dispatch.ssd` runs the Mosaic GPU forward for bf16 (bf16 tolerances of the Triton
    kernel's GPU tests); fp32 x stays on Triton (test_ssd_chunk_scan.py::test_gpu_dispatch_picks_kernel)."""
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    ins, segs = make_ssd_inputs(2, 1000, 4, 64, 64, 2, dtype=jnp.bfloat16, seg=True, seed=5, seg_rate=0.005)
    assert int(segs.max()) > 0, "the case must hold a document boundary"
    check_dispatched(ins, segs, tol_y=2e-2, tol_g=4e-2)
