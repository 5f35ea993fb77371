"""`pallas_kernels.l2_prefetch`: the ranges its threads take cover each array exactly, in the instruction's
granularity and never past its end; the instruction reaches the Triton module a GPU compiles (lowered for an H100
here, no GPU needed) once a prefetched array, before or after the kernel's own work, and never where nothing is
prefetched or in interpret mode. The kernels' results with it: `test_fused_decode.py`'s GPU test."""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_llama_jax.errors import KernelError
from pallas_kernels import fused_decode as fd
from pallas_kernels import l2_prefetch as lp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import triton_modules_for_h100  # noqa: E402

INSTR = "cp.async.bulk.prefetch.L2.global"
LINE_INSTR = "prefetch.global.L2 ["
needs_prim = pytest.mark.skipif(not lp.available(), reason="this jax's Pallas Triton lowering moved")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400_000), st.sampled_from([32, 128, 4 * 32 * 36, 4 * 32 * 192, 8 * 32 * 500]))
def test_ranges_cover_each_array_exactly(units, threads):
    nbytes = units * lp.ALIGN
    starts, sizes = lp.ranges(np.arange(threads), nbytes, threads)
    assert starts.shape == sizes.shape == (threads,)
    assert np.all(starts % lp.ALIGN == 0) and np.all(sizes % lp.ALIGN == 0) and np.all(sizes > 0)
    assert np.all(starts + sizes <= nbytes)
    covered = np.zeros(units, bool)
    for s, n in zip(starts // lp.ALIGN, sizes // lp.ALIGN):
        covered[s:s + n] = True
    assert covered.all()
    chunk, chunks = lp.chunking(nbytes, threads)
    assert chunks <= threads and chunk >= lp.MIN_CHUNK  # one pass; no thread handed a sliver


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400_000), st.sampled_from([32, 128, 4 * 32 * 36, 4 * 32 * 192, 8 * 32 * 500]))
def test_lines_cover_each_array_exactly(units, threads):
    nbytes = units * 2  # bf16 arrays
    at = lp.line_starts(np.arange(threads), nbytes, threads)
    lines, chunks = lp.line_chunking(nbytes, threads)
    assert at.shape == (threads, lines) and chunks <= threads and lines & (lines - 1) == 0
    assert at.min() >= 0 and at.max() <= nbytes - 1
    assert np.array_equal(np.unique(at // lp.LINE), np.arange(-(-nbytes // lp.LINE)))  # every line, none past
    assert lines == 1 or chunks * lines // 2 * lp.LINE < nbytes  # no more lines a thread than needed


def test_bad_sizes_and_places():
    for bad in (0, 24, -16):
        with pytest.raises(ValueError, match="multiples of 16"):
            lp.chunking(bad, 128)
    with pytest.raises(ValueError, match="'start' or 'end'"):
        lp.with_prefetch(lambda *r: None, n_in=1, n_prefetch=1, at="middle", grid=(1,), num_warps=4)
    with pytest.raises(KernelError, match="prefetch must be one of"):
        with fd.tiling(prefetch="gate_up"):
            pass
    with pytest.raises(KernelError, match="prefetch_by must be one of"):
        with fd.tiling(prefetch_by="words"):
            pass

S, BF = jax.ShapeDtypeStruct, jnp.bfloat16
D, INTER = 576, 1536  # SmolLM2-135M


def lowered_o(rows: int, at: str, n_ahead: int, by: str = "bulk") -> str:
    ahead = (S((2 * INTER, D), BF), S((D, INTER), BF))[:n_ahead]

    def fn(a, w, res, nw, *pf):
        return fd.matmul_residual_weigh_pallas(a, w, res, nw, squares=True, prefetch=pf, prefetch_at=at)
    with fd.tiling(prefetch_by=by):
        (text,) = triton_modules_for_h100(fn, S((rows, D), BF), S((D, D), BF), S((rows, D), BF), S((D,), BF),
                                          *ahead)
    return text


@needs_prim
@pytest.mark.parametrize("rows", [16, 64])
def test_weighed_kernels_lower_with_the_instruction_once_an_array(rows):
    for at in ("start", "end"):
        for n in (0, 1, 2):
            text = lowered_o(rows, at, n)
            assert text.count(INSTR) == n, (at, n)
            if n:  # before the K loop, or after the last store
                first, last = text.index(INSTR), text.rindex(INSTR)
                assert (last < text.index("scf.for")) if at == "start" else (first > text.rindex("tt.store")), at
    lines = lowered_o(rows, "start", 2, by="lines")
    assert lines.count(LINE_INSTR) == 2 and INSTR not in lines
    for pf in ((), (S((D, INTER), BF),)):
        (gu,) = triton_modules_for_h100(
            lambda hw, x, w, *dn: fd.gate_up_weighed_pallas(hw, x, w, eps=1e-5, prefetch=dn),
            S((rows, D), BF), S((rows, D), BF), S((2 * INTER, D), BF), *pf)
        assert gu.count(INSTR) == len(pf)


def test_interpret_mode_leaves_it_out():
    t = jax.random.normal(jax.random.key(0), (16, 64), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (64, 64), jnp.float32) / 8
    nw = jnp.ones((64,), jnp.float32)
    big = jnp.ones((128, 64), jnp.float32)
    got = fd.matmul_residual_weigh_pallas(t, w, t, nw, interpret=True, prefetch=(big,))
    want = fd.matmul_residual_weigh_pallas(t, w, t, nw, interpret=True)
    for g, r in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    jaxpr = str(jax.make_jaxpr(functools.partial(fd.matmul_residual_weigh_pallas, interpret=True))(
        t, w, t, nw, prefetch=(big,)))
    assert "prefetch_l2" not in jaxpr
