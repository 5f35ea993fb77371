"""Fused decode GEMVs (`pallas_kernels/fused_decode.py`) == their pure-JAX references, and the decode path wired
through them gives the reference path's greedy tokens.

CPU: interpret mode at tiny shapes, plus a lowering of every kernel to Triton IR for an H100 at SmolLM2's shapes
(catches what the Triton lowering rejects without a GPU). GPU (`-m gpu`, on the device): compiled at SmolLM2's
shapes. Every kernel test checks that the traced function holds a `pallas_call`, so a silent fallback to the
reference cannot pass as the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import HybridConfig, LlamaConfig
from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.models.llama import LlamaLM
from pallas_kernels import decode_attention as da
from pallas_kernels import dispatch
from pallas_kernels import fused_decode as fd
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import (  # noqa: E402
    clear_jit_caches, has_pallas_call, lower_for_h100, on_gpu, pallas_call_launch, rel,
)


SMOL = dict(d=576, h=9, kv=3, hd=64, inter=1536)  # SmolLM2-135M


def inputs(rows, k, n, *, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    return dict(
        x=jax.random.normal(ks[0], (rows, k)).astype(dtype),
        nw=(1.0 + 0.2 * jax.random.normal(ks[1], (k,))).astype(jnp.float32),
        w=(jax.random.normal(ks[2], (n, k)) / np.sqrt(k)).astype(dtype),  # output-major (N, K)
        w2=(jax.random.normal(ks[3], (2 * n, k)) / np.sqrt(k)).astype(dtype),
        res=jax.random.normal(ks[4], (rows, n)).astype(dtype),
        a=jax.random.normal(ks[5], (rows, k)).astype(dtype),
    )


def check_all(rows, k, n, *, dtype, tol, interpret):
    t = inputs(rows, k, n, dtype=dtype, seed=rows)
    cases = [
        ("norm_matmul", functools.partial(fd.norm_matmul_pallas, eps=1e-5, interpret=interpret),
         functools.partial(fd.norm_matmul_reference, eps=1e-5), (t["x"], t["nw"], t["w"])),
        ("norm_gate_up", functools.partial(fd.norm_gate_up_pallas, eps=1e-5, interpret=interpret),
         functools.partial(fd.norm_gate_up_reference, eps=1e-5), (t["x"], t["nw"], t["w2"])),
        ("matmul_residual", functools.partial(fd.matmul_residual_pallas, interpret=interpret),
         fd.matmul_residual_reference, (t["a"], t["w"], t["res"])),
    ]
    if rows in fd.DOT_ROWS:  # gate·up + SiLU·mul on normalised rows: dot path only
        cases.append(("gate_up", functools.partial(fd.gate_up_pallas, interpret=interpret), fd.gate_up_reference,
                      (t["x"], t["w2"])))
    for name, kern, ref, args in cases:
        assert has_pallas_call(kern, *args), name
        got, want = jax.jit(kern)(*args), ref(*args)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert np.isfinite(np.asarray(got, np.float32)).all(), name
        assert rel(got.astype(jnp.float32), want.astype(jnp.float32)) < tol, (name, rel(got, want))


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_gemv_kernels_equal_reference_interpret(rows):
    check_all(rows, 64, 48, dtype=jnp.float32, tol=1e-5, interpret=True)


@pytest.mark.parametrize("dot_rows", [16, 32])
def test_dot_path_row_groups_interpret(dot_rows):
    """32 rows through the dot path: in two groups of 16 (grid axis 1) or one; each group its own rows' norm."""
    assert fd.dot_group(32) == 16
    clear_jit_caches()
    try:
        with fd.tiling(dot_rows=dot_rows):
            assert fd.dot_group(32) == dot_rows
            check_all(32, 64, 48, dtype=jnp.float32, tol=1e-5, interpret=True)
    finally:
        clear_jit_caches()
    with pytest.raises(KernelError, match="dot_rows"):
        with fd.tiling(dot_rows=8):
            pass
    with pytest.raises(KernelError, match="merge"):
        with fd.tiling(merge="fused"):
            pass


def test_dot_path_output_blocks_interpret():
    """64 outputs per program on the dot path (`tiling(dot_block=64)`): one program's (16, 64) dots over the whole
    width equal the reference, the combine kernel's too; a block the dots cannot take is an error."""
    assert fd.pick_block_n(64, 16) == 16
    clear_jit_caches()
    try:
        with fd.tiling(dot_block=64):
            assert fd.pick_block_n(64, 16) == 64 and fd.pick_block_n(48, 16) == 16 and fd.pick_block_n(64, 3) == 1
            check_all(16, 64, 64, dtype=jnp.float32, tol=1e-5, interpret=True)
            h, kv, d, n = 4, 2, 16, 64
            (o_part, m, l), attn = split_attention(16, 64, h, kv, d, 40, 2, 16, dtype=jnp.float32, seed=3)
            w = jax.random.normal(jax.random.key(7), (n, h * d)) / 8.0
            res = jax.random.normal(jax.random.key(8), (16, n))
            got = fd.attn_combine_residual_pallas(o_part, m, l, w, res, interpret=True)
            assert rel(got, fd.matmul_residual_reference(attn, w, res)) < 1e-5
    finally:
        clear_jit_caches()
    with pytest.raises(KernelError, match="dot_block"):
        with fd.tiling(dot_block=8):
            pass


@pytest.mark.parametrize("dot_rows,stages,dot_k", [(16, 3, 128), (64, 1, 16), (64, 6, 32)])
def test_gate_up_on_normalised_rows_interpret(dot_rows, stages, dot_k):
    """gate_up_pallas: SiLU(h·W_gate)·(h·W_up) on already normalised rows, = gate_up_reference (fp32 and bf16), in
    row groups of 16 or all 64 rows a program, at any pipeline depth of its K loop (`tiling(dot_stages=)`) and K
    step (`tiling(dot_k=)`: 96 = 3 steps of 32 or 6 of 16); and norm_gate_up = RMSNorm then gate_up, exactly (the
    decode path's split of it, `inference.gate_up_rows`)."""
    clear_jit_caches()
    try:
        with fd.tiling(dot_rows=dot_rows, dot_stages=stages, dot_k=dot_k):
            assert fd.block_k(96, 64) == min(dot_k, 32) and fd.block_k(96, 4) == 32  # the 1-D path: up to 128
            for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
                t = inputs(64, 96, 48, dtype=dtype, seed=stages)
                got = fd.gate_up_pallas(t["x"], t["w2"], interpret=True)
                want = fd.gate_up_reference(t["x"], t["w2"])
                assert got.shape == (64, 48) and got.dtype == dtype
                assert rel(got.astype(jnp.float32), want.astype(jnp.float32)) < tol
    finally:
        clear_jit_caches()
    t = inputs(16, 64, 32, seed=1)
    np.testing.assert_array_equal(
        np.asarray(fd.norm_gate_up_reference(t["x"], t["nw"], t["w2"], eps=1e-5)),
        np.asarray(fd.gate_up_reference(fd.rms_norm_reference(t["x"], t["nw"], 1e-5), t["w2"])))


def test_gate_up_own_tiling():
    """gate_up_pallas launches with its own tiling (GATE_UP_TILING: row groups of 16, 32 outputs, 4 stages, K steps
    of 64; 8 stages at 16 rows) where no `tiling(...)` block names one; a block's named keys win, the others stay
    gate_up's; other dot-path kernels keep the dot path's defaults (16-row groups, 16 outputs, 3 stages, K steps up
    to 128) or their own (matmul_residual: all rows a program, 8 stages), and nothing leaks out of a call."""
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    h, w = S((64, 576), bf), S((3072, 576), bf)
    clear_jit_caches()
    try:
        assert fd.GATE_UP_TILING == {"dot_rows": 16, "dot_block": 32, "dot_stages": 4, "dot_k": 64}
        assert pallas_call_launch(fd.gate_up_pallas, h, w) == ((48, 4), 4)
        assert fd.GATE_UP_TILING_BY_ROWS == {16: {"dot_stages": 8}}
        assert pallas_call_launch(fd.gate_up_pallas, S((16, 576), bf), w) == ((48, 1), 8)  # 8 stages at 16 rows
        assert pallas_call_launch(fd.gate_up_pallas, S((32, 576), bf), w) == ((48, 2), 4)
        assert fd.MATMUL_RESIDUAL_TILING == {"dot_rows": 64, "dot_stages": 8}  # matmul_residual's own
        assert fd.dot_group(64) == 16 and pallas_call_launch(fd.matmul_residual_pallas, S((64, 1536), bf),
                                                             S((576, 1536), bf), S((64, 576), bf)) == ((36, 1), 8)
        launch = lambda: (clear_jit_caches(), pallas_call_launch(fd.gate_up_pallas, h, w))[1]  # noqa: E731
        with fd.tiling(dot_rows=64):
            assert launch() == ((48, 1), 4)
        with fd.tiling(dot_stages=3, dot_block=16):
            assert launch() == ((96, 4), 3)
            with fd.tiling(dot_rows=32):  # nested: both blocks' names hold
                assert launch() == ((96, 2), 3)
            assert launch() == ((96, 4), 3)
        assert launch() == ((48, 4), 4)
        assert fd.dot_group(64) == 16 and fd._TILING["dot_stages"] == 3 and fd._TILING["dot_k"] == 128
        assert not fd._NAMED and fd.block_k(576, 64) == 64 and fd.block_k(1536, 64) == 128
    finally:
        clear_jit_caches()


def test_gate_up_bad_args_and_dispatch(monkeypatch):
    t = inputs(16, 64, 32)
    with pytest.raises(KernelError, match="16, 32, 64"):
        fd.gate_up_pallas(t["x"][:8], t["w2"], interpret=True)  # the 1-D path's rows: no gate_up there
    with pytest.raises(KernelError, match="even number of rows"):
        fd.gate_up_pallas(t["x"], t["w2"][:-1], interpret=True)
    with pytest.raises(KernelError, match="even number of rows"):
        fd.gate_up(t["x"], t["w2"][:-1])  # the dispatcher too, whichever implementation it would pick
    with pytest.raises(KernelError, match="dot_stages"):
        with fd.tiling(dot_stages=9):
            pass
    with pytest.raises(KernelError, match="dot_k"):
        with fd.tiling(dot_k=48):
            pass
    assert_dot_path_dispatch(monkeypatch, fd.gate_up_choice, fd.GATE_UP_GPU_VERIFIED, 1536)


def assert_dot_path_dispatch(monkeypatch, choice, verified, n):
    """A dot-path kernel's choice: off a GPU the reference unless interpret mode is asked for (and then only at the
    dot path's rows); on a GPU the kernel once verified, or with the unverified-kernels switch."""
    assert choice(16, 64, 32) == fd.REFERENCE
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    assert choice(16, 64, 32) == fd.PALLAS_TRITON and choice(8, 64, 32) == fd.REFERENCE
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    assert choice(64, 576, n) == (fd.PALLAS_TRITON if verified else fd.REFERENCE)
    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    assert choice(64, 576, n) == fd.PALLAS_TRITON


def check_weighed(rows, k, n, inter, *, dtype, tol, interpret, squares=False):
    """The `weighed` MLP form's two kernels (`matmul_residual_weigh_pallas`, `gate_up_weighed_pallas`) = their
    references: rows and weighed rows exactly (one rounding each, the same), gate·up to `tol`; and the form's
    reference = RMSNorm then gate·up up to where it rounds (the row scale after the dots, as `project_partials`).
    With `squares`: the o-projection's sum-of-squares partials too (their zero padding rows exactly zero), and
    gate·up's row scale taken from them."""
    t = inputs(rows, k, n, dtype=dtype, seed=rows + k)
    w2 = (jax.random.normal(jax.random.key(k), (2 * inter, n)) / np.sqrt(n)).astype(dtype)
    nw = (1.0 + 0.2 * jax.random.normal(jax.random.key(n), (n,))).astype(dtype)  # the MLP norm's weight
    fn = functools.partial(fd.matmul_residual_weigh_pallas, squares=squares, interpret=interpret)
    assert has_pallas_call(fn, t["a"], t["w"], t["res"], nw)
    outs = fn(t["a"], t["w"], t["res"], nw)
    refs = fd.matmul_residual_weigh_reference(t["a"], t["w"], t["res"], nw, squares=squares)
    assert len(outs) == len(refs) == 2 + squares
    (h, hw), (rh, rhw) = outs[:2], refs[:2]
    assert h.dtype == hw.dtype == dtype and h.shape == hw.shape == (rows, n)
    assert rel(h, rh) < tol and rel(hw, rhw) < tol
    rsq = None
    if squares:
        parts, p2 = fd.square_parts(n, rows)
        sq, rsq = outs[2], refs[2]
        assert sq.shape == rsq.shape == (p2, rows) and sq.dtype == jnp.float32 and rel(sq, rsq) < 1e-5
        assert not np.any(np.asarray(sq[parts:]))
        hf = np.asarray(rh, np.float32)
        np.testing.assert_allclose(np.asarray(rsq).sum(0), (hf * hf).sum(1), rtol=1e-5)
    gfn = functools.partial(fd.gate_up_weighed_pallas, eps=1e-5, squares=rsq, interpret=interpret)
    rows_in = None if squares else rh
    assert has_pallas_call(gfn, rhw, rows_in, w2)
    got = gfn(rhw, rows_in, w2)
    want = fd.gate_up_weighed_reference(rhw, rows_in, w2, eps=1e-5, squares=rsq)
    assert got.shape == (rows, inter) and got.dtype == dtype and rel(got, want) < tol
    unfused = fd.gate_up_reference(fd.rms_norm_reference(rh, nw, 1e-5), w2)
    assert rel(want, unfused) < (1e-5 if dtype == jnp.float32 else 3e-2)


# 32 rows: 5 s on 2 cores, `make test-slow` (2026-12-08); 16 and 64, the form's smallest and largest, stay
@pytest.mark.parametrize("rows", [16, pytest.param(32, marks=pytest.mark.slow), 64])
def test_weighed_form_kernels_interpret(rows):
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        for squares in (False, True):
            check_weighed(rows, 64, 96, 48, dtype=dtype, tol=tol, interpret=True, squares=squares)


def test_weighed_form_bad_args_and_dispatch(monkeypatch):
    t = inputs(16, 64, 32)
    with pytest.raises(KernelError, match="norm_weight"):
        fd.matmul_residual_weigh_pallas(t["a"], t["w"], t["res"], t["nw"], interpret=True)  # (64,), not (32,)
    with pytest.raises(KernelError, match="16, 32, 64"):
        fd.gate_up_weighed_pallas(t["x"][:8], t["x"][:8], t["w2"], eps=1e-5, interpret=True)
    with pytest.raises(KernelError, match="shaped like hw"):
        fd.gate_up_weighed_pallas(t["x"], t["x"][:, :32], t["w2"], eps=1e-5, interpret=True)
    for bad in (jnp.ones((6, 16), jnp.float32), jnp.ones((8, 32), jnp.float32), jnp.ones((8, 16), jnp.bfloat16)):
        with pytest.raises(KernelError, match="squares"):  # not a power of two / not the rows / not fp32
            fd.gate_up_weighed_pallas(t["x"], None, t["w2"], eps=1e-5, squares=bad, interpret=True)
    with pytest.raises(KernelError, match="squares must be one of"):
        with fd.tiling(squares="down"):
            pass
    assert fd.square_parts(576, 64) == (36, 64) and fd.square_parts(64, 16) == (4, 4)
    assert_dot_path_dispatch(monkeypatch, fd.weighed_choice, fd.WEIGHED_GPU_VERIFIED, 576)


@pytest.mark.parametrize("rows", [16, 64])
def test_weighed_form_lowers_to_triton_at_smollm2_shapes(rows):
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    d, inter = SMOL["d"], SMOL["inter"]
    for squares in (False, True):
        lower_for_h100(functools.partial(fd.matmul_residual_weigh_pallas, squares=squares), S((rows, d), bf),
                       S((d, d), bf), S((rows, d), bf), S((d,), bf))
    lower_for_h100(functools.partial(fd.gate_up_weighed_pallas, eps=1e-5), S((rows, d), bf), S((rows, d), bf),
                   S((2 * inter, d), bf))
    lower_for_h100(lambda hw, sq, w: fd.gate_up_weighed_pallas(hw, None, w, eps=1e-5, squares=sq),
                   S((rows, d), bf), S((fd.square_parts(d, rows)[1], rows), jnp.float32), S((2 * inter, d), bf))


def test_gemv_kernels_bf16_interpret():
    check_all(2, 64, 32, dtype=jnp.bfloat16, tol=2e-2, interpret=True)


def split_attention(rows, slots, h, kv, d, index, splits, block, *, dtype, seed=0, interpret=True):
    """Partials from the attention kernel, and the reference output they must merge to."""
    ks = jax.random.split(jax.random.key(seed), 4)
    qkv = jax.random.normal(ks[0], (rows, (h + 2 * kv) * d)).astype(dtype)
    kc = jax.random.normal(ks[1], (rows, slots, kv, d)).astype(dtype)
    vc = jax.random.normal(ks[2], (rows, slots, kv, d)).astype(dtype)
    ang = jnp.arange(rows, dtype=jnp.float32)[:, None] * 10.0 + jnp.arange(d // 2, dtype=jnp.float32)[None] * 0.1
    slot = jnp.arange(slots)[None]
    valid = jnp.broadcast_to((slot >= (jnp.arange(rows)[:, None] % 5)) & (slot <= index), (rows, slots))
    args = (qkv, kc, vc, jnp.cos(ang), jnp.sin(ang), jnp.int32(index), valid)
    kw = dict(num_heads=h, num_kv_heads=kv, block=block, splits=splits)
    if interpret is None:
        parts = da.decode_attention_partials_reference(*args, **kw)
    else:
        parts = da.decode_attention_partials_pallas(*args, interpret=interpret, **kw)
    from mamba_llama_jax.ops.attention import decode_attention_reference
    want = decode_attention_reference(*args, num_heads=h, num_kv_heads=kv)[0]
    return parts[:3], want


@pytest.mark.parametrize("rows,splits", [(1, 4), (3, 2), pytest.param(32, 4, marks=pytest.mark.slow)])  # 32-4: 14 s
def test_attn_combine_residual_equals_reference_interpret(rows, splits):
    h, kv, d, n = 4, 2, 16, 32
    (o_part, m, l), attn = split_attention(rows, 64, h, kv, d, 40, splits, 16, dtype=jnp.float32, seed=rows)
    w = jax.random.normal(jax.random.key(7), (n, h * d)) / 8.0
    res = jax.random.normal(jax.random.key(8), (rows, n))
    kern = functools.partial(fd.attn_combine_residual_pallas, interpret=True)
    assert has_pallas_call(kern, o_part, m, l, w, res)
    got = jax.jit(kern)(o_part, m, l, w, res)
    assert rel(got, fd.attn_combine_residual_reference(o_part, m, l, w, res)) < 1e-5
    # merged partials are attention itself: the fused o-projection sees the same input as the unfused one
    assert rel(got, fd.matmul_residual_reference(attn, w, res)) < 1e-5


def test_dispatch_cpu_reference_env_and_bad_args(monkeypatch):
    t = inputs(2, 64, 32)
    monkeypatch.delenv(dispatch.INTERPRET_ENV, raising=False)
    assert fd.fused_decode_choice(2, 64, 32) == "reference_xla"  # CPU
    out = fd.norm_matmul(t["x"], t["nw"], t["w"], eps=1e-5)
    assert dispatch.last_choice("fused_decode") == "reference_xla"
    np.testing.assert_array_equal(out, fd.norm_matmul_reference(t["x"], t["nw"], t["w"], eps=1e-5))
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    assert fd.fused_decode_choice(2, 64, 32) == "pallas_triton"
    assert fd.fused_decode_choice(12, 64, 32) == "reference_xla"  # 12 rows: neither 1..8 nor a dot size
    assert fd.fused_decode_choice(2, 64, 40) == "reference_xla"  # width not a multiple of 16
    assert fd.fused_decode_choice(fd.DEFAULT_MAX_BATCH + 1, 64, 32) == "reference_xla"
    assert fd.fused_decode_choice(1, 2048, 8192) == "reference_xla"  # a 1B-sized model: XLA's GEMMs by default
    assert fd.fused_decode_choice(1, 576, 1536) == "pallas_triton"
    monkeypatch.setenv(fd.FUSED_DECODE_ENV, "8")  # an explicit batch bound lifts the size bound too
    assert fd.fused_decode_choice(1, 2048, 8192) == "pallas_triton"
    assert fd.fused_decode_choice(8, 64, 32) == "pallas_triton"
    monkeypatch.setenv(fd.FUSED_DECODE_ENV, "off")
    assert fd.fused_decode_choice(2, 64, 32) == "reference_xla"
    monkeypatch.setenv(fd.FUSED_DECODE_ENV, "1")
    assert fd.fused_decode_choice(2, 64, 32) == "pallas_triton"
    monkeypatch.setenv(fd.FUSED_DECODE_ENV, "banana")
    with pytest.raises(KernelError, match=fd.FUSED_DECODE_ENV):
        fd.max_batch()
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert fd.fused_decode_choice(2, 64, 32) == "reference_xla"
    with pytest.raises(KernelError, match="wt must be"):
        fd.norm_matmul(t["x"], t["nw"], t["w"][:, :-1], eps=1e-5)
    with pytest.raises(KernelError, match="wt must be"):  # the (K, N) layout of the unfused model is refused
        fd.matmul_residual(t["a"], t["w"].T[:, :16], t["res"])
    with pytest.raises(KernelError, match="rows"):
        fd.norm_matmul_pallas(jnp.zeros((12, 64)), t["nw"], t["w"], eps=1e-5, interpret=True)
    with pytest.raises(KernelError, match="splits"):
        fd.attn_combine_residual_pallas(jnp.zeros((1, 3, 64)), jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 4)),
                                        jnp.zeros((32, 64)), jnp.zeros((1, 32)), interpret=True)


# ----------------------------------------------------------------------------- Triton lowering, without a GPU


def lowers_for_h100(fn, *avals) -> None:
    """Lowers `fn` for CUDA as an H100 would (Pallas -> Triton IR): raises what the Triton lowering rejects.
    Uses JAX internals to name the GPU; skips where they moved."""
    assert "xla.gpu.triton" in lower_for_h100(fn, *avals)


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_kernels_lower_to_triton_at_smollm2_shapes(rows):
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    d, h, kv, hd, inter = SMOL["d"], SMOL["h"], SMOL["kv"], SMOL["hd"], SMOL["inter"]
    lowers_for_h100(functools.partial(fd.norm_matmul_pallas, eps=1e-5), S((rows, d), bf), S((d,), bf),
                    S(((h + 2 * kv) * hd, d), bf))
    lowers_for_h100(functools.partial(fd.norm_gate_up_pallas, eps=1e-5), S((rows, d), bf), S((d,), f32),
                    S((2 * inter, d), bf))
    lowers_for_h100(fd.matmul_residual_pallas, S((rows, inter), bf), S((d, inter), bf), S((rows, d), bf))
    if rows in fd.DOT_ROWS:
        for kw in ({}, {"dot_rows": 64, "dot_stages": 8}):  # its own; all rows a program with 8 stages (session 20's)
            clear_jit_caches()
            with fd.tiling(**kw):
                lowers_for_h100(fd.gate_up_pallas, S((rows, d), bf), S((2 * inter, d), bf))
        clear_jit_caches()
    sp = fd.combine_max_splits(rows)
    lowers_for_h100(fd.attn_combine_residual_pallas, S((rows, sp, h * hd), f32), S((rows, sp, h), f32),
                    S((rows, sp, h), f32), S((d, h * hd), bf), S((rows, d), bf))


# ------------------------------------------------------------------------------- the decode path, end to end

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, dtype="float32", rope_theta=1e4, max_position_embeddings=256)


def greedy(model, prompts, n, monkeypatch, *, kernels: bool):
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    if kernels:
        monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    else:
        monkeypatch.delenv(dispatch.INTERPRET_ENV, raising=False)
    jax.clear_caches()  # the kernel choice is made at trace time: no executable of the other path may be reused
    dispatch.record_choice("fused_decode", "none")
    gen = Generator(model, window_block=16)
    assert gen.decode_attention_impl() == ("pallas_triton" if kernels else "reference_xla")
    assert gen.fused_decode_impl(len(prompts)) == ("pallas_triton" if kernels else "reference_xla")
    out = gen.run(prompts, SamplingConfig(max_new_tokens=n)).ids()
    if kernels:
        assert dispatch.last_choice("fused_decode") == "pallas_triton"
        assert dispatch.last_choice("decode_attention") == "pallas_triton"
    return out


# ("teacher", "kernel") runs bounds-checked: 36-43 s on 2 cores (CI, 2026-12-06), so `make test-slow`
@pytest.mark.parametrize("kind,merge", [("teacher", "combine"), ("hybrid50", "combine"),
                                        pytest.param("teacher", "kernel", marks=pytest.mark.slow), ("teacher", "xla")])
def test_greedy_tokens_through_kernels_equal_reference(kind, merge, monkeypatch):
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from pallas_kernels.triton_call import CHECK_BOUNDS_ENV

    # The default merge runs bounds-checked; the other cases interpret unchecked: the checker's host callbacks
    # (one per access of every program) took 12-17 s of each case's 20-27 s, and every kernel these cases add runs
    # checked in its own tests (the combine prologue here, the Mamba2 step also at real widths in
    # test_bounds_real_shapes.py).
    if (kind, merge) != ("teacher", "kernel"):
        monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")
    model = LlamaLM(TINY, rngs=nnx.Rngs(0))
    if kind == "hybrid50":
        model = build_hybrid(model, HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(1))
    prompts = [[5, 17, 3, 88, 41, 9, 60] * 6, [12, 7, 70]]  # 48 slots + 6 new: 64 slots, attention in 4 splits
    assert da.plan(2, TINY.num_kv_heads, 64, max_splits=fd.combine_max_splits(2)) == (16, 4)
    dispatch.record_choice("mamba2_decode", "none")
    want = greedy(model, prompts, 6, monkeypatch, kernels=False)
    assert dispatch.last_choice("mamba2_decode") == "none"  # no FusedMamba2 without its kernel
    with fd.tiling(merge=merge):
        got = greedy(model, prompts, 6, monkeypatch, kernels=True)
    assert got == want
    # the hybrid's Mamba2 layers decode through FusedMamba2 and the fused Mamba2 step kernel
    assert dispatch.last_choice("mamba2_decode") == ("pallas_triton" if kind == "hybrid50" else "none")
    if merge == "kernel":
        assert dispatch.last_choice("decode_attention_merge") == "pallas_triton"


# ------------------------------------------------------------------------------------------------------- GPU


gpu = [pytest.mark.gpu, pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")]


# the 1-D row path (2 and 3: a speculative verify chunk's k+1 tokens at batch 1), several rows, the dot path (1 and
# 4 groups)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 16, 64])
@(lambda f: functools.reduce(lambda g, m: m(g), gpu, f))
def test_gemv_kernels_equal_reference_gpu(rows):
    d, inter = SMOL["d"], SMOL["inter"]
    check_all(rows, d, (SMOL["h"] + 2 * SMOL["kv"]) * SMOL["hd"], dtype=jnp.bfloat16, tol=2e-2, interpret=False)
    check_all(rows, inter, d, dtype=jnp.bfloat16, tol=2e-2, interpret=False)
    if rows in (1, 16):
        check_all(rows, d, inter, dtype=jnp.float32, tol=1e-4, interpret=False)


@pytest.mark.parametrize("rows", [16, 32, 64])
@(lambda f: functools.reduce(lambda g, m: m(g), gpu, f))
def test_weighed_form_kernels_equal_reference_gpu(rows):
    """The `weighed` MLP form's kernels compiled through Triton at SmolLM2's shapes (o: 576 → 576, gate·up 576 →
    2 × 1536), bf16 and fp32."""
    d, inter = SMOL["d"], SMOL["inter"]
    for squares in (False, True):
        check_weighed(rows, d, d, inter, dtype=jnp.bfloat16, tol=2e-2, interpret=False, squares=squares)
        check_weighed(rows, d, d, inter, dtype=jnp.float32, tol=1e-4, interpret=False, squares=squares)


@pytest.mark.parametrize("rows,slots,index", [(1, 384, 200), (1, 4352, 4200), (4, 384, 130), (16, 384, 300)])
@(lambda f: functools.reduce(lambda g, m: m(g), gpu, f))
def test_split_attention_and_combine_gpu(rows, slots, index):
    h, kv, hd, d = SMOL["h"], SMOL["kv"], SMOL["hd"], SMOL["d"]
    block, splits = da.plan(rows, kv, slots, max_splits=fd.combine_max_splits(rows))
    assert splits > 1
    (o_part, m, l), attn = split_attention(rows, slots, h, kv, hd, index, splits, block, dtype=jnp.bfloat16,
                                           interpret=False)
    w = (jax.random.normal(jax.random.key(7), (d, h * hd)) / 24.0).astype(jnp.bfloat16)
    res = jax.random.normal(jax.random.key(8), (rows, d)).astype(jnp.bfloat16)
    kern = fd.attn_combine_residual_pallas
    assert has_pallas_call(kern, o_part, m, l, w, res)
    got = jax.jit(kern)(o_part, m, l, w, res).astype(jnp.float32)
    assert rel(got, fd.attn_combine_residual_reference(o_part, m, l, w, res).astype(jnp.float32)) < 1e-2
    assert rel(got, fd.matmul_residual_reference(attn, w, res).astype(jnp.float32)) < 2e-2


@(lambda f: functools.reduce(lambda g, m: m(g), gpu, f))
def test_greedy_tokens_gpu_smollm2_shape(monkeypatch):
    """fp32 (so that summation order cannot flip a near-tie): SmolLM2's layer shapes, 4 layers, kernels vs
    the reference path, batch 1 and 4."""
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    cfg = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_layers=4, num_heads=9,
                      num_kv_heads=3, head_dim=64, dtype="float32", rope_theta=1e5, max_position_embeddings=1024)
    model = LlamaLM(cfg, rngs=nnx.Rngs(0))
    prompts = [list(range(3, 40)), list(range(100, 120)), [7] * 50, list(range(900, 990))]
    for rows in (1, 4):
        jax.clear_caches()  # the kernel choice is made at trace time
        monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
        want = Generator(model).run(prompts[:rows], SamplingConfig(max_new_tokens=16)).ids()
        monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV)
        monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
        jax.clear_caches()
        gen = Generator(model)
        assert gen.fused_decode_impl(rows) == "pallas_triton" and gen.decode_attention_impl() == "pallas_triton"
        assert gen.run(prompts[:rows], SamplingConfig(max_new_tokens=16)).ids() == want
