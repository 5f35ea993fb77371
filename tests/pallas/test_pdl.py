"""`pallas_kernels.pdl`: each instruction reaches the Triton module a GPU compiles (lowered for an H100 here, no GPU
needed) exactly where a kernel asks for it, and nowhere else."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import pdl
from pallas_kernels import triton_call as tc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import lower_for_h100  # noqa: E402

pytestmark = pytest.mark.skipif(not pdl.available(), reason="this jax's Pallas Triton lowering moved")


def test_lowered_kernel_carries_each_instruction_where_asked():
    def add_one(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    def triggered(x_ref, o_ref):
        pdl.launch_dependents()
        add_one(x_ref, o_ref)

    def probe(x_ref, o_ref):
        t = pdl.globaltimer_lo()
        pdl.wait()
        o_ref[...] = x_ref[...] + (t * 0).astype(jnp.float32)

    def call(kernel):
        return lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(1,),
                                        compiler_params=tc.compiler_params(4, 1))(x)

    aval = jax.ShapeDtypeStruct((16,), jnp.float32)
    plain, trig, probed = (lower_for_h100(call(k), aval) for k in (add_one, triggered, probe))
    assert "griddepcontrol" not in plain and "globaltimer" not in plain
    assert "griddepcontrol.launch_dependents" in trig and "griddepcontrol.wait" not in trig
    assert "griddepcontrol.wait" in probed and "%globaltimer_lo" in probed and "launch_dependents" not in probed
