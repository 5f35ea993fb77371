"""Helpers shared by the kernel tests: relative error, the `pallas_call`-in-the-jaxpr check (and its launch), the
GPU marker, the chunked-SSD inputs, a fixed weighting of (y, final state) to differentiate, and Triton lowering
for an H100 without a GPU (imported by path, like tests/train/tiny.py: the tests are not a package)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def rel(a, r) -> float:
    """‖a − r‖ / ‖r‖ in float64 (bf16 inputs widened first)."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(r, jnp.float32), np.float64)
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def has_pallas_call(fn, *args) -> bool:
    """Whether `fn` really traces a kernel: a dispatcher that fell back to the reference would not."""
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def traced_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs it calls (jit bodies), in order; not those of a pallas_call's
    kernel."""
    for e in jaxpr.eqns:
        yield e
        if e.primitive.name != "pallas_call":
            for v in e.params.values():
                if hasattr(v, "jaxpr"):
                    yield from traced_eqns(v.jaxpr)


def pallas_call_launch(fn, *args) -> tuple[tuple[int, ...], int]:
    """The grid and pipeline stages of the first `pallas_call` `fn` traces (nested jaxprs searched too)."""
    e = next(e for e in traced_eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == "pallas_call")
    return tuple(e.params["grid_mapping"].grid), e.params["compiler_params"].num_stages


def on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


needs_gpu = pytest.mark.skipif(not on_gpu(), reason="needs a GPU (JAX_PLATFORMS=cuda on the device)")


def make_ssd_inputs(b, l, h, p, n, g, *, dtype=jnp.float32, seed=0, seg=False, init=True, positive_dt=False,
                    seg_rate: float = 0.06):
    """Random chunked-SSD arguments (x, dt, A, B, C, D, dt_bias, initial_state) and, with `seg`, segment ids."""
    k = jax.random.split(jax.random.key(seed), 9)
    dt = jax.random.normal(k[1], (b, l, h)) - 1.0
    if positive_dt:  # dt_softplus=False needs dt + dt_bias >= 0
        dt = jnp.abs(dt) * 0.3
    ins = dict(
        x=jax.random.normal(k[0], (b, l, h, p)).astype(dtype),
        dt=dt,
        A=-jnp.exp(jax.random.uniform(k[2], (h,), minval=-1.0, maxval=1.5)),
        B=jax.random.normal(k[3], (b, l, g, n)).astype(dtype),
        C=jax.random.normal(k[4], (b, l, g, n)).astype(dtype),
        D=jax.random.normal(k[5], (h,)),
        dt_bias=(jnp.abs(jax.random.normal(k[6], (h,))) * 0.3 if positive_dt else jax.random.normal(k[6], (h,))),
        initial_state=jax.random.normal(k[7], (b, h, p, n)) if init else None,
    )
    segs = jnp.cumsum(jax.random.bernoulli(k[8], seg_rate, (b, l)).astype(jnp.int32), axis=1) if seg else None
    return ins, segs


def weighted_sum(y, fin):
    """A scalar of (y, final state) with fixed, position-dependent weights: its gradient checks every output."""
    wy = jnp.sin(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) * 0.37)
    wf = jnp.cos(jnp.arange(fin.size, dtype=jnp.float32).reshape(fin.shape) * 0.11)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(fin * wf)


def ssd_caller(fn, ins, present, segs, softplus, **kw):
    """f(*vals) = fn(x, dt, A, B, C, D=, dt_bias=, initial_state=, segment_ids=segs, dt_softplus=softplus, **kw)
    with the arguments named in `present` taken from vals (in order) and the others from `ins`: what the chunked
    SSD tests differentiate."""
    def f(*vals):
        full = dict(ins)
        full.update(zip(present, vals))
        return fn(full["x"], full["dt"], full["A"], full["B"], full["C"], D=full["D"], dt_bias=full["dt_bias"],
                  initial_state=full["initial_state"], segment_ids=segs, dt_softplus=softplus, **kw)
    return f


def grad_of_outputs(f, n: int):
    """The gradient, in all n arguments, of `weighted_sum` of f's (y, final state)."""
    return jax.grad(lambda *v: weighted_sum(*f(*v)), argnums=tuple(range(n)))


def lower_for_h100(fn, *avals) -> str:
    """The module `fn` exports for CUDA with an H100 as the target (Pallas -> Triton IR, no GPU needed): raises
    whatever the Triton lowering rejects. Names the GPU through JAX internals; skips if they moved."""
    try:
        from jax import export
        from jax._src.pallas.triton import pallas_call_registration
        try:
            from jax._src import gpu_info  # jax >= 0.12.1
        except ImportError:
            from jax._src.pallas.triton import gpu_info  # jax 0.11 - 0.12.0
        h100 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the JAX version
        pytest.skip(f"JAX internals for an abstract GPU moved: {e!r}")
    lib = pallas_call_registration.gpu_info_lib
    saved, lib.get_gpu_info = lib.get_gpu_info, lambda: h100
    try:
        exported = export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*avals)
    finally:
        lib.get_gpu_info = saved
    return exported.mlir_module()


def clear_jit_caches() -> None:
    """Empties the traces and executables of every jitted function the project's kernel modules define, so that the
    next call traces again under the current plan or tiling. Not `jax.clear_caches()`: that also drops every
    eager op's executable, and a kernel test recompiling its inputs' and reference's ops after each clear spent
    ~40 % of its time on them. `clear_cache()` drops the traces of the function's body; `make_jaxpr(f)` of the
    jitted function itself keys its own trace on that object, evicted here too (a JAX internal: without it,
    everything is cleared)."""
    import sys

    try:
        from jax._src.interpreters.partial_eval import trace_to_jaxpr
        evict = trace_to_jaxpr.evict_weakref
    except (ImportError, AttributeError):
        jax.clear_caches()
        return
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] == "pallas_kernels":
            for obj in list(vars(mod).values()):
                if callable(getattr(obj, "clear_cache", None)) and hasattr(obj, "_fun"):
                    obj.clear_cache()
                    evict(obj)
