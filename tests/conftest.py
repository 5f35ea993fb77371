"""Shared test set-up: deterministic, CPU, fp32 matmuls so tolerances mean what they say."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On the CPU, XLA's LLVM back end at optimisation level 0: most of a test's time is compiling small programs, which
# this makes ~30 % faster (the acceptance-loop test 32 -> 23 s; even the real 135 M teacher's greedy test 14.5 ->
# 11.9 s: its matmuls are library calls either way); the default run took 10m33s instead of ~16 min (2026-12-05).
# Set before jax starts a backend, and inherited by the processes tests start (CLI, multi-host, reliability
# workers). A level XLA_FLAGS already sets is left alone.
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def load_benchmark():
    """benchmarks/<name>.py as a module (benchmarks/ is not a package), registered in sys.modules so that its
    dataclasses resolve their annotations."""
    def load(name: str):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        return sys.modules[name]
    return load


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for one module whose tests compile the same programs again (each `fit` jits
    its own step; `jax.clear_caches()` before a kernel choice drops the reference path's executables too). Keyed by
    the program's HLO and compile options, so a hit runs exactly what compiling would give, and a program traced
    differently is compiled anew. Switched off after the module (a JAX internal: without it, nothing is cached)."""
    try:
        from jax._src.compilation_cache import reset_cache
    except ImportError:
        yield
        return
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # the large programs, not every small op
    reset_cache()
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    reset_cache()
