"""Shared test set-up: deterministic, CPU, fp32 matmuls so tolerances mean what they say."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
