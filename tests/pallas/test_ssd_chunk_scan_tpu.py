"""TPU (Mosaic) chunked SSD == `mamba_llama_jax.ops.ssd.ssd_chunked`: outputs, final states and every gradient.

No TPU is at hand, so three things are checked instead of a run on one:
* numerics: the kernels run in Pallas's TPU interpret mode on CPU (`pltpu.InterpretParams`, which simulates
  VMEM, the block pipeline and megacore's split of "parallel" grid axes) at tiny shapes;
* lowering: `jax.export(..., platforms=["tpu"])` lowers both kernels to Mosaic at real shapes (block-shape rules,
  a lowering for every primitive used), no TPU software needed;
* compilation: where libtpu is importable (`pip install "jax[tpu]"`, or MAMBA_LLAMA_LIBTPU_PATH naming a folder
  that holds the `libtpu` package), a subprocess compiles forward + backward ahead of time for TPU v4, v5e, v5p
  and v6e with libtpu's Mosaic compiler (layouts, VMEM), as an AOT compile on a CPU host does.
What stays unchecked here: executing the compiled kernels on a TPU, and their speed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.ssd import ssd_chunked
from pallas_kernels import dispatch
from pallas_kernels.ssd_chunk_scan_tpu import ssd_chunk_scan_tpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import grad_of_outputs, make_ssd_inputs, rel, ssd_caller  # noqa: E402


def make_inputs(*args, **kwargs):
    return make_ssd_inputs(*args, seg_rate=0.08, **kwargs)


ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_against_reference(ins, segs, *, chunk, softplus=True, interpret=True, tol_y=1e-5, tol_g=1e-4):
    present = [a for a in ARGS if ins[a] is not None]

    def run(fn, kw):
        return ssd_caller(fn, ins, present, segs, softplus, **kw)

    def loss(fn, kw):
        return grad_of_outputs(run(fn, kw), len(present))

    vals = [ins[a] for a in present]
    vals32 = [v.astype(jnp.float32) for v in vals]  # the reference in fp32: the kernel must match the maths
    kern_kw = dict(chunk_size=chunk, interpret=interpret)
    fwd_k, grad_k = run(ssd_chunk_scan_tpu, kern_kw), loss(ssd_chunk_scan_tpu, kern_kw)
    assert "pallas_call" in str(jax.make_jaxpr(fwd_k)(*vals)), "the kernel path must trace a pallas_call"
    assert "ssd_chunk_scan_tpu_bwd" in str(jax.make_jaxpr(grad_k)(*vals)), "the backward must be the kernel's"

    y, fin = jax.jit(fwd_k)(*vals)
    yr, finr = jax.jit(run(ssd_chunked, dict(chunk_size=chunk)))(*vals32)
    assert y.shape == yr.shape and y.dtype == ins["x"].dtype and fin.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert rel(y, yr) < tol_y, ("y", rel(y, yr))
    assert rel(fin, finr) < tol_y, ("final_state", rel(fin, finr))
    gk = jax.jit(grad_k)(*vals)
    gr = jax.jit(loss(ssd_chunked, dict(chunk_size=chunk)))(*vals32)
    for name, a, r in zip(present, gk, gr):
        assert a.shape == ins[name].shape and a.dtype == ins[name].dtype, name
        assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))), name
        assert rel(a, r) < tol_g, (name, rel(a, r))


# -------------------------------------------------------------------------------------------- interpret mode

# (b, l, h, p, n, g, chunk, segments, initial state, interpret)
MEGACORE = pltpu.InterpretParams(num_cores_or_threads=2, random_seed=3)  # "parallel" axes split over 2 cores
CASES = [
    pytest.param(2, 40, 4, 16, 16, 2, 16, True, True, True, id="odd-length-groups-segments-init"),
    pytest.param(1, 32, 2, 16, 32, 2, 16, False, False, True, id="b1-g=h-plain", marks=pytest.mark.slow),  # 10 s
    pytest.param(2, 45, 2, 32, 16, 1, 32, True, True, MEGACORE, id="g1-chunk32-megacore-shuffled"),
]


@pytest.mark.parametrize("b,l,h,p,n,g,chunk,seg,init,interpret", CASES)
def test_interpret_matches_reference(b, l, h, p, n, g, chunk, seg, init, interpret):
    ins, segs = make_inputs(b, l, h, p, n, g, seg=seg, init=init, seed=l + h)
    check_against_reference(ins, segs, chunk=chunk, interpret=interpret)


def test_interpret_optional_args_absent_and_no_softplus():
    ins, segs = make_inputs(1, 24, 2, 16, 16, 1, init=False, positive_dt=True, seed=3)
    ins["D"] = None
    ins["dt_bias"] = None
    check_against_reference(ins, segs, chunk=16, softplus=False)


def test_interpret_bf16_inputs():
    ins, segs = make_inputs(1, 36, 2, 16, 16, 2, dtype=jnp.bfloat16, seg=True, seed=5)
    check_against_reference(ins, segs, chunk=16, tol_y=2e-2, tol_g=3e-2)


def test_packed_rows_equal_separate_rows():
    """Documents packed in one row give the outputs they give alone (state reset at each start), for a start on
    a chunk boundary (16) and one inside a chunk (20); the last document's final state is the row's."""
    ins, _ = make_inputs(1, 32, 2, 16, 16, 2, init=False, seed=9)
    segs = jnp.array([[4] * 16 + [7] * 4 + [4] * 12], jnp.int32)  # an id that comes back is a new document
    kw = dict(D=ins["D"], dt_bias=ins["dt_bias"], chunk_size=16, interpret=True)
    y, fin = ssd_chunk_scan_tpu(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], segment_ids=segs, **kw)
    for sl in (slice(16, 20), slice(20, 32)):
        y2, fin2 = ssd_chunk_scan_tpu(ins["x"][:, sl], ins["dt"][:, sl], ins["A"], ins["B"][:, sl],
                                      ins["C"][:, sl], **kw)
        np.testing.assert_allclose(np.asarray(y[:, sl]), np.asarray(y2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fin), np.asarray(fin2), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- Mosaic lowering


def _specs(b, l, h, p, n, g, dtype, sharding=None):
    S = lambda s, d: jax.ShapeDtypeStruct(s, d, sharding=sharding)
    f32 = jnp.float32
    return [S((b, l, h, p), dtype), S((b, l, h), f32), S((h,), f32), S((b, l, g, n), dtype), S((b, l, g, n), dtype),
            S((h,), f32), S((h,), f32), S((b, h, p, n), f32), S((b, l), jnp.int32)]


def _loss_grad(chunk, seg=True):
    def f(x, dt, A, B, C, D, bias, init, sg):
        y, fin = ssd_chunk_scan_tpu(x, dt, A, B, C, D=D, dt_bias=bias, initial_state=init,
                                    segment_ids=sg if seg else None, chunk_size=chunk)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(fin)
    return jax.grad(f, argnums=tuple(range(8)))


@pytest.mark.parametrize("shape,dtype,chunk,seg", [
    ((8, 2048, 9, 64, 64, 9), jnp.bfloat16, 128, False),  # SmolLM2's hybrid layer
    ((2, 1000, 32, 64, 128, 8), jnp.bfloat16, 256, True),  # odd length, state 64x128, groups, packed
    ((1, 300, 2, 64, 64, 2), jnp.float32, 128, True),
])
def test_lowers_to_mosaic_at_real_shapes(shape, dtype, chunk, seg):
    """Both kernels pass Pallas's TPU lowering (block shapes, a Mosaic rule for every op): no TPU needed."""
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        exp = jax.export.export(jax.jit(_loss_grad(chunk, seg)), platforms=["tpu"])(*_specs(*shape, dtype))
    text = exp.mlir_module()
    assert text.count("tpu_custom_call") == 2, "forward and backward must each be one Mosaic kernel"


_AOT_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    sys.path.insert(0, sys.argv[1])
    from tests.pallas.test_ssd_chunk_scan_tpu import _loss_grad, _specs
    topo = {"TPU v4": "v4=1x1x1", "TPU v5 lite": "v5e=1x1", "TPU v5p": "v5p=1x1x1", "TPU v6 lite": "v6e=1x1"}
    for kind, name in topo.items():
        dev = topologies.get_topology_desc(name, platform="tpu").devices[0]
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind=kind, num_cores=dev.num_cores, platform="tpu"))
        sh = jax.sharding.SingleDeviceSharding(dev)
        for shape, dtype, chunk in (((8, 2048, 24, 64, 64, 24), jnp.bfloat16, 128),
                                    ((2, 1000, 4, 64, 128, 2), jnp.bfloat16, 256),
                                    ((1, 300, 2, 64, 64, 1), jnp.float32, 128)):
            with jax.sharding.use_abstract_mesh(mesh):
                jax.jit(_loss_grad(chunk)).lower(*_specs(*shape, dtype, sharding=sh)).compile()
            print("compiled", kind, shape, flush=True)
""")


def _libtpu_path() -> str | None:
    path = os.environ.get("MAMBA_LLAMA_LIBTPU_PATH")
    if path:
        return path
    spec = importlib.util.find_spec("libtpu")
    return None if spec is None else os.path.dirname(os.path.dirname(spec.origin))


@pytest.mark.skipif(_libtpu_path() is None, reason="needs libtpu (pip install 'jax[tpu]', or a folder holding "
                                                   "the libtpu package in MAMBA_LLAMA_LIBTPU_PATH)")
def test_compiles_ahead_of_time_with_libtpu():
    """libtpu's Mosaic compiler accepts both kernels for four TPU generations (a subprocess, so that the TPU
    plugin never loads into this CPU test process)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, _libtpu_path(), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="", TPU_SKIP_MDS_QUERY="1")
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, ROOT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("compiled") == 12, out.stdout


# ---------------------------------------------------------------------------------------------------- dispatch


def test_dispatch_on_tpu_keeps_the_reference_unless_opted_in(monkeypatch):
    ins, _ = make_inputs(1, 16, 2, 64, 64, 2, dtype=jnp.bfloat16, seed=1)
    a = (ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"])
    monkeypatch.setattr(dispatch, "_on_tpu", lambda: True)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: False)
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.delenv(dispatch.UNVERIFIED_ENV, raising=False)
    assert dispatch.ssd_choice(*a) == dispatch.REFERENCE
    y, _ = dispatch.ssd(*a, D=ins["D"], chunk_size=8)  # runs the reference here, and says so
    assert dispatch.last_choice("ssd") == dispatch.REFERENCE
    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    assert dispatch.ssd_choice(*a) == dispatch.PALLAS_MOSAIC_TPU
    f = lambda x: dispatch.ssd(x, *a[1:], D=ins["D"])[0]
    assert "ssd_chunk_scan_tpu_fwd" in str(jax.make_jaxpr(f)(ins["x"]))
    assert dispatch.last_choice("ssd") == dispatch.PALLAS_MOSAIC_TPU
    odd = jnp.zeros((1, 16, 2, 24), jnp.bfloat16)  # head_dim 24: not a multiple of 16, the reference takes it
    assert dispatch.ssd_choice(odd, *a[1:]) == dispatch.REFERENCE
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert dispatch.ssd_choice(*a) == dispatch.REFERENCE


@pytest.mark.parametrize("change,match", [
    (dict(dt=jnp.zeros((1, 16, 3))), "dt must be"),
    (dict(B=jnp.zeros((1, 16, 3, 16)), C=jnp.zeros((1, 16, 3, 16))), "must divide the heads"),
    (dict(x=jnp.zeros((1, 16, 2, 16), jnp.float16)), "float32 or bfloat16 on TPU"),
    (dict(x=jnp.zeros((1, 16, 2, 24)), initial_state=None), "multiples of 16"),
    (dict(initial_state=jnp.zeros((1, 2, 16, 8))), "initial_state must be"),
    (dict(segment_ids=jnp.zeros((1, 16), jnp.float32)), "segment_ids must be integers"),
])
def test_bad_arguments_raise_kernel_error(change, match):
    ins, _ = make_inputs(1, 16, 2, 16, 16, 2, seed=1)
    ins.update(change)
    extra = {k: ins.get(k) for k in ("D", "dt_bias", "initial_state", "segment_ids")}
    with pytest.raises(KernelError, match=match):
        ssd_chunk_scan_tpu(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], chunk_size=16, interpret=True,
                           **extra)


def test_bad_chunk_size():
    ins, _ = make_inputs(1, 16, 2, 16, 16, 2, seed=1)
    for chunk in (96, 8, 512):
        with pytest.raises(KernelError, match="chunk_size"):
            ssd_chunk_scan_tpu(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], chunk_size=chunk, interpret=True)
