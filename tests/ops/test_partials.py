"""Projections as split-K partials (`mamba_llama_jax.ops.partials`): the sum is the GEMM, RMSNorm folds across."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.partials import matmul_t_partials, project_partials, row_scale, sum_partials, weigh
from pallas_kernels.fused_decode import matmul_t, norm_matmul_reference


def _inputs(rows=5, k=96, n=40):
    ks = jax.random.split(jax.random.key(0), 3)
    return (3.0 * jax.random.normal(ks[0], (rows, k)), 1.0 + 0.2 * jax.random.normal(ks[1], (k,)),
            jax.random.normal(ks[2], (n, k)) / np.sqrt(k))


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_partials_sum_to_the_gemm(parts):
    x, _, wt = _inputs()
    p = matmul_t_partials(x, wt, parts)
    assert p.shape == (parts, 5, 40) and p.dtype == jnp.float32
    np.testing.assert_allclose(sum_partials(p), matmul_t(x, wt), rtol=1e-5, atol=1e-5)


def test_norm_folds_across_the_partials():
    x, g, wt = _inputs()
    np.testing.assert_allclose(row_scale(x, 1e-5), 1 / np.sqrt(np.mean(np.square(np.asarray(x)), -1) + 1e-5),
                               rtol=1e-6)
    got = project_partials(matmul_t_partials(weigh(x, g), wt, 4), x, 1e-5)
    np.testing.assert_allclose(got, norm_matmul_reference(x, g, wt, eps=1e-5), rtol=1e-5, atol=1e-5)


def test_k_must_divide_into_the_slices():
    x, _, wt = _inputs()
    with pytest.raises(KernelError, match="K = 96 does not divide into 5 slices"):
        matmul_t_partials(x, wt, 5)
    with pytest.raises(KernelError, match="does not divide"):
        matmul_t_partials(x, wt, 0)
