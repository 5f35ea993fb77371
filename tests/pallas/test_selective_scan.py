"""Pallas Mamba1 selective scan == `mamba_llama_jax.ops.scan.selective_scan`: outputs, final states, every gradient.

CPU: the kernels run in Pallas interpret mode at tiny shapes with small chunks (each chunk is unrolled, so small
chunks keep the interpret-mode compiles short). GPU (`-m gpu`, on the device): compiled through Triton at real
shapes. Every kernel test checks that the traced function holds the Pallas calls, so a silent fallback to the
reference cannot pass as the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import LlamaConfig, MambaConfig
from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.models.llama import Context
from mamba_llama_jax.models.mamba import make_mixer
from mamba_llama_jax.ops.scan import selective_scan, selective_scan_associative
from pallas_kernels import dispatch
from pallas_kernels.selective_scan import padded_group, plan_blocks, selective_scan_pallas
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import grad_of_outputs, needs_gpu, rel  # noqa: E402


ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(b, l, d, n, g, *, dtype=jnp.float32, seed=0, seg=False, init=True, gate=True, positive=False):
    k = jax.random.split(jax.random.key(seed), 10)
    delta = jax.random.normal(k[1], (b, l, d)) - 1.0
    if positive:  # delta_softplus=False needs delta + delta_bias >= 0
        delta = jnp.abs(delta) * 0.3
    ins = dict(
        u=jax.random.normal(k[0], (b, l, d)).astype(dtype),
        delta=delta,
        A=-jnp.exp(jax.random.uniform(k[2], (d, n), minval=-1.0, maxval=1.5)),
        B=jax.random.normal(k[3], (b, l, g, n)).astype(dtype),
        C=jax.random.normal(k[4], (b, l, g, n)).astype(dtype),
        D=jax.random.normal(k[5], (d,)),
        z=jax.random.normal(k[6], (b, l, d)).astype(dtype) if gate else None,
        delta_bias=jnp.abs(jax.random.normal(k[7], (d,))) * 0.3 if positive else jax.random.normal(k[7], (d,)),
        initial_state=jax.random.normal(k[8], (b, d, n)) if init else None,
    )
    segs = jnp.cumsum(jax.random.bernoulli(k[9], 0.1, (b, l)).astype(jnp.int32), axis=1) if seg else None
    return ins, segs


def _jaxpr(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


def check_against_reference(ins, segs, *, softplus=True, tol_y, tol_g, reference=selective_scan, **kernel_kw):
    present = [a for a in ARGS if ins[a] is not None]

    def run(fn, kw):
        def f(*vals):
            full = dict(ins)
            full.update(zip(present, vals))
            return fn(full["u"], full["delta"], full["A"], full["B"], full["C"], D=full["D"], z=full["z"],
                      delta_bias=full["delta_bias"], initial_state=full["initial_state"], segment_ids=segs,
                      delta_softplus=softplus, **kw)
        return f

    vals = [ins[a] for a in present]
    # the reference in fp32 on upcast inputs: the kernel must match the maths, not the reference's round-off
    vals32 = [v.astype(jnp.float32) for v in vals]
    fwd_k, fwd_r = run(selective_scan_pallas, kernel_kw), run(reference, {})
    assert "selective_scan_fwd" in _jaxpr(fwd_k, *vals), "the kernel path must trace the Pallas forward"
    y, fin = jax.jit(fwd_k)(*vals)
    yr, finr = jax.jit(fwd_r)(*vals32)
    assert y.dtype == ins["u"].dtype and y.shape == ins["u"].shape
    assert fin.dtype == jnp.float32 and fin.shape == (y.shape[0],) + ins["A"].shape
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert rel(y, yr) < tol_y, ("y", rel(y, yr))
    assert rel(fin, finr) < tol_y, ("final_state", rel(fin, finr))

    def grad_of(fn, kw):
        return grad_of_outputs(run(fn, kw), len(present))

    gk_fn = grad_of(selective_scan_pallas, kernel_kw)
    assert "selective_scan_bwd" in _jaxpr(gk_fn, *vals), "the backward must be the Pallas kernel, not an XLA VJP"
    gk = jax.jit(gk_fn)(*vals)
    gr = jax.jit(grad_of(reference, {}))(*vals32)
    for name, a, r in zip(present, gk, gr):
        assert a.shape == ins[name].shape and a.dtype == ins[name].dtype, name
        assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))), name
        assert rel(a, r) < tol_g, (name, rel(a, r))


# ------------------------------------------------------------------------------------------- interpret mode (CPU)

# (b, l, d, n, g, chunk, block_d, segments, initial state): each exercises a different tiling path
CPU_CASES = [
    # odd length (padded tail), groups of 4 channels, one group per program, documents + initial state
    pytest.param(2, 13, 8, 4, 2, 4, 4, True, True, id="odd-l-groups-segments-init"),
    # b = 1, one group split over two programs: dB/dC partial sums over the channel blocks
    pytest.param(1, 8, 16, 16, 1, 8, 8, False, False, id="b1-g1-two-blocks", marks=pytest.mark.slow),  # 9 s
    # groups of 2 channels, four groups per program (G > 1)
    pytest.param(2, 9, 16, 8, 8, 4, 8, True, False, id="many-groups-per-block"),
    # rep 12 -> padded to 16 channels a group, n 3 -> padded to 4
    pytest.param(1, 10, 12, 3, 1, 4, 16, False, True, id="padded-channels-and-state", marks=pytest.mark.slow),  # 9 s
]


@pytest.mark.parametrize("b,l,d,n,g,chunk,block_d,seg,init", CPU_CASES)
def test_interpret_matches_reference(b, l, d, n, g, chunk, block_d, seg, init):
    ins, segs = make_inputs(b, l, d, n, g, seg=seg, init=init, seed=l + d)
    check_against_reference(ins, segs, tol_y=1e-5, tol_g=1e-5, chunk_size=chunk, block_d=block_d,
                            bwd_block_d=block_d, interpret=True)


def test_interpret_optional_args_absent_and_no_softplus():
    ins, segs = make_inputs(1, 11, 8, 4, 2, init=False, gate=False, positive=True, seed=3)
    ins["D"] = None
    ins["delta_bias"] = None
    check_against_reference(ins, segs, softplus=False, tol_y=1e-5, tol_g=1e-5, chunk_size=4, block_d=8,
                            interpret=True)


def test_interpret_bf16_inputs_and_separate_bwd_tiling():
    ins, segs = make_inputs(1, 12, 16, 16, 4, dtype=jnp.bfloat16, seg=True, seed=5)
    ins["delta"] = ins["delta"].astype(jnp.bfloat16)
    # prefetch groups that do not divide the chunk: the remainder groups load correctly too
    check_against_reference(ins, segs, tol_y=1e-2, tol_g=2e-2, chunk_size=4, block_d=16, bwd_block_d=4,
                            prefetch=3, bwd_prefetch=3, interpret=True)


def test_interpret_equals_associative_reference():
    ins, segs = make_inputs(1, 7, 8, 4, 2, seg=True, seed=11)
    check_against_reference(ins, segs, tol_y=1e-5, tol_g=1e-5, reference=selective_scan_associative,
                            chunk_size=4, block_d=8, interpret=True)


def test_packed_rows_equal_separate_rows():
    """Two documents packed in one row give the outputs of the two run alone (state reset at the boundary)."""
    ins, _ = make_inputs(1, 12, 8, 4, 2, init=False, seed=9)
    segs = jnp.array([[3] * 7 + [5] * 5], jnp.int32)
    kw = dict(D=ins["D"], delta_bias=ins["delta_bias"], chunk_size=4, block_d=8, interpret=True)
    y, fin = selective_scan_pallas(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], z=ins["z"],
                                   segment_ids=segs, **kw)
    sl = slice(7, 12)
    y2, fin2 = selective_scan_pallas(ins["u"][:, sl], ins["delta"][:, sl], ins["A"], ins["B"][:, sl],
                                     ins["C"][:, sl], z=ins["z"][:, sl], **kw)
    np.testing.assert_allclose(np.asarray(y[:, sl]), np.asarray(y2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fin), np.asarray(fin2), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_interpret_default_tiling():
    """The GPU defaults (chunk 16, 32 channels a program) at a small shape: l = 40 pads to 48."""
    ins, segs = make_inputs(2, 40, 64, 16, 4, seg=True, seed=13)
    check_against_reference(ins, segs, tol_y=1e-5, tol_g=1e-5, interpret=True)


def test_tiling_plan():
    assert padded_group(16) == 16 and padded_group(1152) == 1152 and padded_group(12) == 16
    assert padded_group(20) == 24 and padded_group(3) == 4 and padded_group(9) == 16
    assert plan_blocks(96, 16, 32) == (2, 16)  # MambaInLlama layout: groups of d_state channels
    assert plan_blocks(72, 16, 64) == (4, 16)
    assert plan_blocks(9, 16, 64) == (1, 16)  # an odd number of groups: one group a program
    assert plan_blocks(1, 1152, 32) == (1, 32)
    assert plan_blocks(1, 24, 32) == (1, 8)


# ---------------------------------------------------------------------------------------------------- dispatch


def _clear_env(monkeypatch):
    for env in (dispatch.FORCE_REFERENCE_ENV, dispatch.UNVERIFIED_ENV, dispatch.INTERPRET_ENV):
        monkeypatch.delenv(env, raising=False)


def test_dispatch_uses_reference_on_cpu_and_reports_it(monkeypatch):
    _clear_env(monkeypatch)
    ins, segs = make_inputs(1, 8, 8, 4, 2, seg=True, seed=1)
    args = [ins[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=ins["D"], z=ins["z"], delta_bias=ins["delta_bias"], segment_ids=segs)
    f = lambda *a: dispatch.selective_scan(*a, **kw)
    assert "pallas_call" not in _jaxpr(f, *args)
    y, fin = f(*args)
    assert dispatch.last_choice("selective_scan") == dispatch.SELECTIVE_REFERENCE  # no GPU here
    yr, finr = selective_scan(*args, **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(yr))
    np.testing.assert_array_equal(np.asarray(fin), np.asarray(finr))


def test_dispatch_interpret_env_runs_the_kernel_on_cpu(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    ins, _ = make_inputs(1, 6, 8, 4, 2, seed=2)
    args = [ins[k] for k in ("u", "delta", "A", "B", "C")]
    f = lambda *a: dispatch.selective_scan(*a, D=ins["D"], z=ins["z"], initial_state=ins["initial_state"])
    assert "selective_scan_fwd" in _jaxpr(f, *args)
    assert dispatch.last_choice("selective_scan") == dispatch.PALLAS_TRITON
    y, _ = f(*args)
    yr, _ = selective_scan(*args, D=ins["D"], z=ins["z"], initial_state=ins["initial_state"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(yr), rtol=1e-5, atol=1e-5)


def test_dispatch_gating_and_force_reference_flag(monkeypatch):
    _clear_env(monkeypatch)
    ins, _ = make_inputs(1, 8, 8, 4, 2, seed=1)
    args = [ins[k] for k in ("u", "delta", "A", "B", "C")]
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    from pallas_kernels import selective_scan as ss
    monkeypatch.setattr(ss, "GPU_VERIFIED", False)
    assert dispatch.selective_scan_choice(*args) == dispatch.SELECTIVE_REFERENCE  # not verified, not opted in
    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    assert dispatch.selective_scan_choice(*args) == dispatch.PALLAS_TRITON
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert dispatch.selective_scan_choice(*args) == dispatch.SELECTIVE_REFERENCE
    monkeypatch.delenv(dispatch.UNVERIFIED_ENV)
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV)
    monkeypatch.setattr(ss, "GPU_VERIFIED", True)
    assert dispatch.selective_scan_choice(*args) == dispatch.PALLAS_TRITON


@pytest.mark.parametrize("change,match", [
    (dict(u=jnp.zeros((1, 8))), "u must be"),
    (dict(delta=jnp.zeros((1, 8, 7))), "delta must be"),
    (dict(A=jnp.zeros((7, 4))), "A must be"),
    (dict(B=jnp.zeros((1, 8, 3, 4)), C=jnp.zeros((1, 8, 3, 4))), "must divide the channels"),
    (dict(B=jnp.zeros((1, 8, 2, 8)), C=jnp.zeros((1, 8, 2, 8))), "B must be"),
    (dict(C=jnp.zeros((1, 8, 1, 4))), "C must have B's shape"),
    (dict(D=jnp.zeros((4,))), "D must have shape"),
    (dict(z=jnp.zeros((1, 7, 8))), "z must have shape"),
    (dict(initial_state=jnp.zeros((1, 8, 8))), "initial_state must have shape"),
    (dict(u=jnp.zeros((1, 8, 8), jnp.int32)), "u must be float32"),
    (dict(B=jnp.zeros((1, 8, 2, 4), jnp.int8), C=jnp.zeros((1, 8, 2, 4), jnp.int8)), "B must be float32"),
    (dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), "segment_ids must be integers"),
    (dict(segment_ids=jnp.zeros((1, 9), jnp.int32)), "segment_ids must be"),
])
def test_bad_arguments_raise_kernel_error(change, match):
    ins, _ = make_inputs(1, 8, 8, 4, 2, seed=1)
    ins["segment_ids"] = None
    ins.update(change)
    extra = {k: ins[k] for k in ("D", "z", "delta_bias", "initial_state", "segment_ids")}
    args = [ins[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(KernelError, match=match):
        selective_scan_pallas(*args, interpret=True, **extra)
    with pytest.raises(KernelError, match=match):
        dispatch.selective_scan(*args, **extra)


@pytest.mark.parametrize("kw,match", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=65), "chunk_size"), (dict(block_d=24), "block_d"),
    (dict(bwd_block_d=2048), "bwd_block_d"), (dict(num_warps=3), "num_warps"), (dict(prefetch=0), "prefetch"),
])
def test_bad_tiling_raises_kernel_error(kw, match):
    ins, _ = make_inputs(1, 8, 8, 4, 2, seed=1)
    with pytest.raises(KernelError, match=match):
        selective_scan_pallas(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], interpret=True, **kw)


# ------------------------------------------------------------------------------------------------ Mamba1 mixer

def test_mamba1_mixer_scan_kernel_goes_through_dispatch(monkeypatch):
    """mamba.scan='kernel': the reference on CPU (same output as 'sequential'), the kernel with the interpret
    switch (same output and gradient)."""
    _clear_env(monkeypatch)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, dtype="float32")
    b, t = 2, 9
    x = jax.random.normal(jax.random.key(0), (b, t, cfg.hidden_size))
    seg = jnp.array([[0] * 5 + [1] * 4, [0] * 9], jnp.int32)
    c = Context(positions=None, token_mask=jnp.ones((b, t), bool), segment_ids=seg, cos=None, sin=None)

    def loss_and_grad(scan):
        m = make_mixer(cfg, MambaConfig(variant="mamba1", d_state=4, scan=scan), rngs=nnx.Rngs(3))
        graphdef, state = nnx.split(m)
        f = lambda x: jnp.sum(nnx.merge(graphdef, state)(x, c, None)[0] ** 2)
        return jax.jit(jax.value_and_grad(f))(x)

    lr, gr = loss_and_grad("sequential")
    lk, gk = loss_and_grad("kernel")
    assert dispatch.last_choice("selective_scan") == dispatch.SELECTIVE_REFERENCE
    assert float(lk) == float(lr) and rel(gk, gr) == 0.0
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    lk, gk = loss_and_grad("kernel")
    assert dispatch.last_choice("selective_scan") == dispatch.PALLAS_TRITON
    assert abs(float(lk) - float(lr)) < 1e-5 * abs(float(lr)) and rel(gk, gr) < 1e-5


# --------------------------------------------------------------------------------------- compiled, on the GPU


GPU_CASES = [  # (b, l, d, n, g, dtype, segments, initial state, kernel tiling)
    # a Llama-1B-sized Mamba1 layer in the MambaInLlama layout (B/C in groups of d_state channels), bf16
    pytest.param(8, 2048, 1536, 16, 96, jnp.bfloat16, False, False, {}, id="d1536-g96-bf16"),
    # longer, classic Mamba1 B/C (one group), packed documents, initial state, fp32
    pytest.param(2, 8192, 1536, 16, 1, jnp.float32, True, True, {}, id="l8192-g1-fp32-segments-init"),
    # SmolLM2 layer (d_inner 2·576), odd length (padded tail), fp32, other tilings than the defaults
    pytest.param(4, 1000, 1152, 16, 72, jnp.float32, True, False,
                 dict(chunk_size=8, block_d=16, num_warps=2, bwd_block_d=64, bwd_num_warps=8, prefetch=8,
                      bwd_prefetch=1), id="l1000-d1152-g72-fp32-other-tiling"),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,l,d,n,g,dtype,seg,init,tiling", GPU_CASES)
def test_gpu_compiled_matches_reference(b, l, d, n, g, dtype, seg, init, tiling):
    ins, segs = make_inputs(b, l, d, n, g, dtype=dtype, seg=seg, init=init, seed=7)
    if segs is not None:  # ~ one document start every 500 positions, as in packed training data
        segs = jnp.cumsum(jax.random.bernoulli(jax.random.key(8), 0.002, (b, l)).astype(jnp.int32), axis=1)
    bf = dtype == jnp.bfloat16
    check_against_reference(ins, segs, tol_y=2e-2 if bf else 1e-3, tol_g=4e-2 if bf else 5e-3, **tiling)


@pytest.mark.gpu
@needs_gpu
def test_gpu_dispatch_picks_kernel(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    ins, _ = make_inputs(2, 256, 256, 16, 16, dtype=jnp.bfloat16)
    f = lambda u: dispatch.selective_scan(u, ins["delta"], ins["A"], ins["B"], ins["C"], D=ins["D"], z=ins["z"])[0]
    assert "selective_scan_fwd" in _jaxpr(f, ins["u"])
    assert dispatch.last_choice("selective_scan") == dispatch.PALLAS_TRITON
    y = jax.jit(f)(ins["u"])
    yr, _ = selective_scan(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], D=ins["D"], z=ins["z"])
    assert rel(y, yr) < 1e-2
