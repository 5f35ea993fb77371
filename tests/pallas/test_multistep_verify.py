"""Pallas multistep verify == `mamba_llama_jax.ops.ssd.ssd_verify`: outputs, per-prefix states, accepted states.

CPU: interpret mode at tiny shapes, and a lowering to Triton IR for an H100 at real shapes (catches what the
Triton lowering rejects, without a GPU). GPU (`-m gpu`, on the device): compiled through Triton at the SmolLM2
(h = 9) and h = 24 head shapes. Every kernel test checks that the traced function holds a `pallas_call`, so a silent
fallback to the reference cannot pass as the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.ssd import ssd_multistep, ssd_verify
from pallas_kernels import dispatch
from pallas_kernels import multistep_verify as mv
from pallas_kernels.multistep_verify import multistep_verify, pick_block_p
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import has_pallas_call, lower_for_h100, needs_gpu, rel  # noqa: E402


F32 = jnp.float32


def make_inputs(b, k, h, p, n, g, *, dtype=F32, seed=0, positive_dt=False):
    """numpy draws (no per-op JAX compiles for the set-up), in the dtypes the layer feeds: x/B/C in the compute
    dtype, dt/A/D/bias and the state in fp32."""
    r = np.random.default_rng(seed)
    f = lambda *shape: r.standard_normal(shape).astype(np.float32)
    dt, bias = f(b, k, h) - 1.0, f(h)
    if positive_dt:  # dt_softplus=False needs dt + dt_bias >= 0
        dt, bias = np.abs(dt) * 0.3, np.abs(bias) * 0.3
    return dict(
        state=jnp.asarray(f(b, h, p, n)),
        x=jnp.asarray(f(b, k, h, p), dtype),
        dt=jnp.asarray(dt),
        A=jnp.asarray(-np.exp(r.uniform(-1.0, 1.5, h)), F32),
        B=jnp.asarray(f(b, k, g, n), dtype),
        C=jnp.asarray(f(b, k, g, n), dtype),
        D=jnp.asarray(f(h)),
        dt_bias=jnp.asarray(bias),
    )


def _call(fn, ins, accepted, **kw):
    return fn(ins["state"], ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], D=ins["D"], dt_bias=ins["dt_bias"],
              accepted=accepted, **kw)


def check(ins, accepted_cases, *, interpret, tol_y, tol_s, **kw):
    """States mode, then accepted mode for each (b,) array in accepted_cases, kernel vs reference; the accepted
    state must also be the per-prefix state the count names (to round-off: the two modes compile separately and
    may contract multiply-adds differently) and, bit for bit, the input state itself for 0."""
    def same(a, b, fp32: bool):
        tol = (1e-6 if interpret else 1e-5) if fp32 else 1e-2  # one bf16 ulp is 2^-8 relative
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)

    kern = jax.jit(lambda ins, acc: _call(multistep_verify, ins, acc, interpret=interpret, **kw))
    kern_all = jax.jit(lambda ins: _call(multistep_verify, ins, None, interpret=interpret, **kw))
    ref = jax.jit(lambda ins, acc: _call(ssd_verify, ins, acc))
    ref_all = jax.jit(lambda ins: _call(ssd_verify, ins, None))
    assert has_pallas_call(lambda ins: _call(multistep_verify, ins, None, interpret=interpret, **kw), ins)

    y, states = kern_all(ins)
    yr, states_r = ref_all(ins)
    b, k = ins["x"].shape[:2]
    assert y.shape == ins["x"].shape and y.dtype == ins["x"].dtype
    assert states.shape == (b, k) + ins["state"].shape[1:] and states.dtype == F32
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert rel(y, yr) < tol_y, ("y", rel(y, yr))
    assert rel(states, states_r) < tol_s, ("states", rel(states, states_r))
    for acc in accepted_cases:
        acc = jnp.asarray(acc, jnp.int32)
        ya, st = kern(ins, acc)
        yra, str_ = ref(ins, acc)
        assert rel(yra, yr) < tol_y  # the reference's two modes agree too
        assert st.shape == ins["state"].shape and st.dtype == F32
        same(ya, y, ins["x"].dtype == F32)  # the same outputs in either mode
        assert rel(st, str_) < tol_s, ("accepted state", acc, rel(st, str_))
        picked = jnp.where((acc > 0)[:, None, None, None], states[jnp.arange(b), jnp.maximum(acc - 1, 0)],
                           ins["state"])
        same(st, picked, True)  # the state kept on chip is the one the per-prefix mode stores
        for r in range(b):
            if int(acc[r]) == 0:  # nothing accepted: the cached state comes back bit for bit
                np.testing.assert_array_equal(np.asarray(st[r]), np.asarray(ins["state"][r]))


# --------------------------------------------------------------------------------------------- CPU, interpret


# k = 1, 3, 4, 8 and 16 in the default run; the other k (2-5 s each) in `make test-slow`
@pytest.mark.parametrize("k", [k if k in (1, 3, 4, 8, 16) else pytest.param(k, marks=pytest.mark.slow)
                               for k in range(1, 17)])
def test_interpret_matches_reference_every_k(k):
    """b = 1, g < h, accepted = 0 and = k."""
    ins = make_inputs(1, k, 4, 16, 16, 2, seed=k)
    check(ins, [[0], [k]], interpret=True, tol_y=1e-5, tol_s=1e-5)


def test_interpret_rows_accept_different_counts_with_head_dim_blocks():
    ins = make_inputs(4, 5, 3, 32, 16, 1, seed=21)
    check(ins, [[0, 2, 5, 9], [1, 5, 0, -1]], interpret=True, tol_y=1e-5, tol_s=1e-5, block_p=16)


def test_interpret_bf16_inputs():
    ins = make_inputs(2, 6, 4, 16, 32, 2, dtype=jnp.bfloat16, seed=5)
    check(ins, [[0, 6], [3, 1]], interpret=True, tol_y=1e-2, tol_s=1e-5)


def test_interpret_no_softplus_no_optional_args():
    ins = make_inputs(1, 4, 2, 16, 16, 2, positive_dt=True, seed=8)
    args = (ins["state"], ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"])
    y, st = multistep_verify(*args, dt_softplus=False, interpret=True)
    yr, sr = ssd_verify(*args, dt_softplus=False)
    assert rel(y, yr) < 1e-5 and rel(st, sr) < 1e-5
    # the reference's per-prefix mode is the existing multistep reference
    ym, sm = ssd_multistep(*args, dt_softplus=False)
    np.testing.assert_array_equal(np.asarray(yr), np.asarray(ym))
    np.testing.assert_array_equal(np.asarray(sr), np.asarray(sm))


def test_pick_block_p_spreads_small_batches():
    assert pick_block_p(1, 9, 64) == 16  # 36 programs rather than 9
    assert pick_block_p(16, 9, 64) == 32
    assert pick_block_p(16, 24, 64) == 64
    assert pick_block_p(1, 32, 128) == 16


# ---------------------------------------------------------------------------------------------------- dispatch


def test_dispatch_uses_reference_on_cpu_and_reports_it(monkeypatch):
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.delenv(dispatch.INTERPRET_ENV, raising=False)
    ins = make_inputs(2, 3, 4, 16, 16, 2, seed=1)
    acc = jnp.asarray([1, 3], jnp.int32)
    y, st = jax.jit(lambda ins, acc: _call(dispatch.verify, ins, acc))(ins, acc)
    assert dispatch.last_choice("verify") == mv.REFERENCE
    yr, sr = jax.jit(lambda ins, acc: _call(ssd_verify, ins, acc))(ins, acc)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(yr))
    np.testing.assert_array_equal(np.asarray(st), np.asarray(sr))


def test_dispatch_gpu_rules(monkeypatch):
    ins = make_inputs(1, 3, 4, 16, 16, 2, seed=1)
    args = (ins["state"], ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"])
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.delenv(dispatch.UNVERIFIED_ENV, raising=False)
    monkeypatch.setattr(mv, "GPU_VERIFIED", False)
    assert dispatch.verify_choice(*args) == mv.REFERENCE  # not yet verified on a GPU: opt-in only
    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    assert dispatch.verify_choice(*args) == mv.PALLAS_TRITON
    monkeypatch.delenv(dispatch.UNVERIFIED_ENV)
    monkeypatch.setattr(mv, "GPU_VERIFIED", True)
    assert dispatch.verify_choice(*args, accepted=jnp.zeros((1,), jnp.int32)) == mv.PALLAS_TRITON
    odd = make_inputs(1, 3, 4, 24, 16, 2)  # head_dim 24 does not tile: the reference takes it
    assert dispatch.verify_choice(odd["state"], odd["x"], *args[2:]) == mv.REFERENCE
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert dispatch.verify_choice(*args) == mv.REFERENCE


def test_dispatch_interpret_mode_off_gpu(monkeypatch):
    """MAMBA_LLAMA_INTERPRET_KERNELS=1 wires the kernel (interpret mode) into every caller on a CPU."""
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    ins = make_inputs(2, 3, 4, 16, 16, 2, seed=4)
    acc = jnp.asarray([0, 2], jnp.int32)
    f = lambda ins, acc: _call(dispatch.verify, ins, acc)
    assert has_pallas_call(f, ins, acc)
    assert dispatch.last_choice("verify") == mv.PALLAS_TRITON
    y, st = jax.jit(f)(ins, acc)
    yr, sr = _call(ssd_verify, ins, acc)
    assert rel(y, yr) < 1e-5 and rel(st, sr) < 1e-5
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert dispatch.verify_choice(ins["state"], ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"]) == mv.REFERENCE


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.zeros((1, 3, 4))), "x must be"),
    (dict(x=jnp.zeros((1, 0, 4, 16))), "no steps"),
    (dict(state=jnp.zeros((1, 4, 8, 16))), "state must be"),
    (dict(dt=jnp.zeros((1, 3, 3))), "dt must be"),
    (dict(A=jnp.zeros((3,))), "A must be"),
    (dict(B=jnp.zeros((1, 3, 2, 8)), C=jnp.zeros((1, 3, 2, 8))), "d_state = 16"),
    (dict(B=jnp.zeros((1, 3, 3, 16)), C=jnp.zeros((1, 3, 3, 16))), "must divide the heads"),
    (dict(C=jnp.zeros((1, 3, 1, 16))), "C must have B's shape"),
    (dict(D=jnp.zeros((3,))), "D must be"),
    (dict(x=jnp.zeros((1, 3, 4, 16), jnp.int32)), "x must be float32"),
    (dict(accepted=jnp.zeros((2,), jnp.int32)), "accepted must be"),
    (dict(accepted=jnp.zeros((1,), jnp.float32)), "accepted must be integers"),
])
def test_bad_arguments_raise_kernel_error(change, match):
    ins = make_inputs(1, 3, 4, 16, 16, 2, seed=1)
    acc = change.pop("accepted", None)
    ins.update(change)
    with pytest.raises(KernelError, match=match):
        _call(multistep_verify, ins, acc, interpret=True)
    with pytest.raises(KernelError, match=match):
        _call(dispatch.verify, ins, acc)


def test_kernel_rejects_untileable_shapes():
    ins = make_inputs(1, 3, 4, 24, 16, 2)
    with pytest.raises(KernelError, match="powers of two"):
        _call(multistep_verify, ins, None, interpret=True)
    ins = make_inputs(1, 3, 4, 32, 16, 2)
    with pytest.raises(KernelError, match="block_p"):
        _call(multistep_verify, ins, None, interpret=True, block_p=8)


# ----------------------------------------------------------------------------- Triton lowering, without a GPU



@pytest.mark.parametrize("b,h,k,g,accepted,block_p", [
    (1, 9, 8, 9, True, None), (16, 9, 16, 9, False, None), (16, 24, 1, 24, True, None), (2, 8, 5, 2, False, 32),
])
def test_kernel_lowers_to_triton_for_h100(b, h, k, g, accepted, block_p):
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    avals = [S((b, h, 64, 64), F32), S((b, k, h, 64), bf), S((b, k, h), F32), S((h,), F32), S((b, k, g, 64), bf),
             S((b, k, g, 64), bf), S((h,), F32), S((h,), F32)] + ([S((b,), jnp.int32)] if accepted else [])

    def fn(state, x, dt, A, B, C, D, bias, *acc):
        return multistep_verify(state, x, dt, A, B, C, D=D, dt_bias=bias, accepted=acc[0] if acc else None,
                                block_p=block_p)

    assert "xla.gpu.triton" in lower_for_h100(fn, *avals)


# --------------------------------------------------------------------------------------- compiled, on the GPU


def _gpu_cases():
    for b in (1, 16):
        for h in (9, 24):
            for k in (1, 4, 8, 16):
                yield pytest.param(b, h, k, jnp.bfloat16, id=f"b{b}-h{h}-k{k}-bf16")
    yield pytest.param(16, 9, 8, F32, id="b16-h9-k8-fp32")
    yield pytest.param(2, 8, 5, F32, id="b2-h8-k5-g2-fp32")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,h,k,dtype", list(_gpu_cases()))
def test_gpu_compiled_matches_reference(b, h, k, dtype):
    g = 2 if h == 8 else h  # the model passes B/C per head; one case keeps groups
    ins = make_inputs(b, k, h, 64, 64, g, dtype=dtype, seed=b + h + k)
    rng = np.random.default_rng(k)
    per_row = np.concatenate([[0, k], rng.integers(0, k + 1, max(0, b - 2))])[:b]
    bf = dtype == jnp.bfloat16
    check(ins, [np.zeros(b), np.full(b, k), per_row], interpret=False, tol_y=1e-2 if bf else 1e-4, tol_s=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_gpu_dispatch_picks_kernel_when_allowed(monkeypatch):
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    ins = make_inputs(1, 4, 9, 64, 64, 9, dtype=jnp.bfloat16)
    f = lambda ins: _call(dispatch.verify, ins, jnp.full((1,), 4, jnp.int32))
    assert has_pallas_call(f, ins)
    assert dispatch.last_choice("verify") == mv.PALLAS_TRITON


@pytest.mark.gpu
@needs_gpu
def test_gpu_mamba2_layer_verify_and_advance_kernel_equals_reference(monkeypatch):
    """The SmolLM2 hybrid's Mamba2 layer (h = 9, p = n = 64), bf16: multistep + advance through the kernel equal
    the same through the reference."""
    from mamba_llama_jax.config import LlamaConfig, MambaConfig
    from mamba_llama_jax.models.mamba import Mamba2
    from mamba_llama_jax.models.llama import Context

    cfg = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_layers=1, num_heads=9,
                      num_kv_heads=3, head_dim=64, dtype="bfloat16", param_dtype="bfloat16")
    layer = Mamba2(cfg, MambaConfig(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    b, k = 16, 8
    x = jax.random.normal(jax.random.key(1), (b, k, 576), jnp.bfloat16)
    prompt = jax.random.normal(jax.random.key(2), (b, 12, 576), jnp.bfloat16)
    keep = jnp.asarray(np.arange(b) % (k + 1), jnp.int32)

    def run():
        @jax.jit
        def f(state):
            m = nnx.merge(graphdef, state)
            mask = jnp.ones((b, 12), bool)
            _, c = m(prompt, Context(None, mask, None, None, None, prefill=True), m.init_cache(b, 0))
            y, chunk = m.multistep(x, Context(None, jnp.ones((b, k), bool), None, None, None), c)
            return y, chunk.advance(keep)
        return f(state)

    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    y_k, c_k = run()
    assert dispatch.last_choice("verify") == mv.PALLAS_TRITON
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    y_r, c_r = run()
    assert dispatch.last_choice("verify") == mv.REFERENCE
    assert rel(y_k, y_r) < 2e-2
    # bf16 inputs (eps 7.8e-3): the kernel multiplies in fp32, the reference's einsums on a GPU round their
    # products (bf16 / TF32), so the two fp32 states differ at ~1e-3 (1.6e-3 seen on the H100, against the
    # 1e-3 this test first asked); the fp32 kernel tests above pin the arithmetic itself tightly.
    assert rel(c_k.ssm, c_r.ssm) < 5e-3
    np.testing.assert_array_equal(np.asarray(c_k.conv, np.float32), np.asarray(c_r.conv, np.float32))


@pytest.mark.gpu
@needs_gpu
def test_gpu_batched_commit_equals_per_layer_commits(monkeypatch):
    """`cache.advance_all` on the SmolLM2 target's 15 Mamba2 layers (9 heads each: one compiled call over 135 heads)
    gives each layer the state of its own compiled call, to the bit, and the same conv windows."""
    from mamba_llama_jax.models.cache import MambaCache, MambaChunk, advance_all

    monkeypatch.setenv(dispatch.UNVERIFIED_ENV, "1")
    b, t, h, n = 1, 3, 9, 64
    rng = np.random.default_rng(0)
    f = lambda *shape, dt=F32: jnp.asarray(rng.standard_normal(shape), dt)
    chunks = [MambaChunk(MambaCache(f(b, 3 * 576, 4, dt=jnp.bfloat16), f(b, h, 64, n)),
                         MambaCache(f(b, 3 * 576, 4, dt=jnp.bfloat16), f(b, h, 64, n)),
                         f(b, t, 3 * 576, dt=jnp.bfloat16), f(b, t, h, 64, dt=jnp.bfloat16), jnp.abs(f(b, t, h)),
                         f(b, t, h, n, dt=jnp.bfloat16), -jnp.exp(f(h)), "mamba2") for _ in range(15)]
    keep = jnp.asarray([2], jnp.int32)
    got = jax.jit(advance_all)(chunks, keep)
    assert dispatch.last_choice("verify") == mv.PALLAS_TRITON
    want = jax.jit(lambda cs, k: [c.advance(k) for c in cs])(chunks, keep)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g.ssm), np.asarray(w.ssm))
        np.testing.assert_array_equal(np.asarray(g.conv, np.float32), np.asarray(w.conv, np.float32))
