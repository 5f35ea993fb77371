"""`pallas_kernels.triton_call`: interpret mode is bounds-checked (what plain interpret mode lets through raises),
unwritten outputs show as NaN, and a kernel writing an aliased array through its input ref keeps Triton's
in-place meaning under the check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import triton_call as tc


def shifted_copy(shift_read: int, shift_write: int):
    """Program i copies x[4i + shift_read : +4] to out[4i + shift_write : +4] (grid 2 over 8 elements)."""
    def kernel(x_ref, o_ref):
        i = pl.program_id(0)
        o_ref[pl.ds(i * 4 + shift_write, 4)] = x_ref[pl.ds(i * 4 + shift_read, 4)]
    return tc.triton_call(kernel, grid=(2,), out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True,
                          num_warps=1, num_stages=1, name="shifted_copy")


@pytest.fixture
def checked(monkeypatch):
    monkeypatch.delenv(tc.CHECK_BOUNDS_ENV, raising=False)
    yield
    tc.reset_checked_interpreter()  # the interpreter must be reset after it raised


@pytest.mark.parametrize("shift_read,shift_write", [(2, 0), (0, 2)], ids=["read", "write"])
def test_out_of_bounds_access_raises_where_plain_interpret_mode_clamps(checked, monkeypatch, shift_read,
                                                                       shift_write):
    x = jnp.arange(8.0)
    monkeypatch.setenv(tc.CHECK_BOUNDS_ENV, "0")
    np.asarray(shifted_copy(shift_read, shift_write)(x))  # plain interpret mode: runs, clamped, no error
    monkeypatch.delenv(tc.CHECK_BOUNDS_ENV)
    with pytest.raises(Exception, match="[Oo]ut-of-bounds"):
        np.asarray(shifted_copy(shift_read, shift_write)(x))


def test_in_bounds_copy_is_exact(checked):
    x = jnp.arange(8.0)
    np.testing.assert_array_equal(np.asarray(shifted_copy(0, 0)(x)), np.arange(8.0))


def test_an_output_element_no_program_writes_is_nan(checked):
    def kernel(x_ref, o_ref):
        o_ref[pl.ds(pl.program_id(0) * 4, 3)] = x_ref[pl.ds(pl.program_id(0) * 4, 3)]  # skips every 4th
    out = tc.triton_call(kernel, grid=(2,), out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True,
                         num_warps=1, num_stages=1, name="gappy")(jnp.arange(8.0))
    assert np.isnan(np.asarray(out)[[3, 7]]).all() and np.isfinite(np.asarray(out)[[0, 1, 2, 4, 5, 6]]).all()


@pytest.mark.parametrize("check", ["1", "0"])
def test_aliased_array_written_through_its_input_ref(monkeypatch, check):
    """As the decode-attention kernels do with the KV cache: program i writes row i's slot `idx` through the input
    ref of an aliased cache and reads the row back; the rest of the cache is untouched (in place, as on a GPU)."""
    monkeypatch.setenv(tc.CHECK_BOUNDS_ENV, check)

    def kernel(new_ref, cache_ref, idx_ref, sum_ref, cache_out_ref):
        del cache_out_ref  # aliased to cache_ref
        i = pl.program_id(0)
        cache_ref[i, pl.ds(idx_ref[0], 1), :] = new_ref[pl.ds(i, 1), :]
        sum_ref[pl.ds(i, 1)] = jnp.sum(cache_ref[i, :, :], axis=(0, 1), keepdims=True)[0]

    cache = jnp.arange(3 * 8 * 16, dtype=jnp.float32).reshape(3, 8, 16)
    new = -jnp.ones((3, 16))
    call = tc.triton_call(kernel, grid=(3,), out_shape=(jax.ShapeDtypeStruct((3,), jnp.float32),
                                                       jax.ShapeDtypeStruct(cache.shape, cache.dtype)),
                          interpret=True, num_warps=1, num_stages=1, name="write_slot", input_output_aliases={1: 1})
    sums, out = call(new, cache, jnp.array([5], jnp.int32))
    want = np.asarray(cache).copy()
    want[:, 5] = -1.0
    np.testing.assert_array_equal(np.asarray(out), want)
    np.testing.assert_allclose(np.asarray(sums), want.sum(axis=(1, 2)))


def test_compiler_params():
    params = tc.compiler_params(4, 2)
    assert (params.num_warps, params.num_stages) == (4, 2)
