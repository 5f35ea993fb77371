"""`pallas_kernels.pdl`: the PDL instructions reach the Triton module a GPU compiles (lowered for an H100 here, no
GPU needed), the trigger wraps a kernel without changing what it computes, and it stays off where it cannot run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import os
import sys

from pallas_kernels import pdl
from pallas_kernels import triton_call as tc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import lower_for_h100, on_gpu  # noqa: E402

pytestmark = pytest.mark.skipif(not pdl.available(), reason="this jax's Pallas Triton lowering moved")


def add_one(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0


def test_lowered_kernel_carries_each_instruction_where_asked():
    def probe(x_ref, o_ref):
        t = pdl.globaltimer_lo()
        pdl.wait()
        o_ref[...] = x_ref[...] + (t * 0).astype(jnp.float32)

    def call(kernel):
        return lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(1,),
                                        compiler_params=tc.compiler_params(4, 1))(x)

    aval = jax.ShapeDtypeStruct((16,), jnp.float32)
    plain = lower_for_h100(call(add_one), aval)
    triggered = lower_for_h100(call(pdl.triggered(add_one)), aval)
    probed = lower_for_h100(call(probe), aval)
    assert "griddepcontrol" not in plain
    assert "griddepcontrol.launch_dependents" in triggered and "griddepcontrol.wait" in triggered
    assert "griddepcontrol.wait" in probed and "%globaltimer_lo" in probed


@pytest.mark.skipif(on_gpu(), reason="off a GPU only")
def test_trigger_is_off_without_a_gpu_even_when_asked(monkeypatch):
    monkeypatch.setenv(pdl.TRIGGER_ENV, "1")
    assert not pdl.trigger_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("on", ["1", "0"])
def test_triggered_kernel_computes_the_same_on_the_gpu(monkeypatch, on):
    monkeypatch.setenv(pdl.TRIGGER_ENV, on)
    x = jnp.arange(256.0)
    f = jax.jit(lambda v: tc.triton_call(add_one, grid=(1,), out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
                                         interpret=False, num_warps=4, num_stages=1, name="add_one")(v))
    np.testing.assert_array_equal(np.asarray(f(x)), np.arange(256.0) + 1)
