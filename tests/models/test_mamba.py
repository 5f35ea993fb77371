"""Mamba mixers: the attention-derived init is exact, every decode path equals the full forward, padding and
packing behave, parameter names and axes are the official ones."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import LlamaConfig, MambaConfig
from mamba_llama_jax.convert.from_attention import init_from_attention
from mamba_llama_jax.models.llama import Attention, Context
from mamba_llama_jax.models.mamba import Mamba1, Mamba2, make_mixer
from mamba_llama_jax.ops.ssd import ssd_chunked

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  dtype="float32")
# The scan choice only changes the full forward; tests/ops pins the scans to each other, so the other
# combinations run with the slow tests.
VARIANTS = [("mamba2", "chunked"), ("mamba1", "sequential")] + [
    pytest.param(v, s, marks=pytest.mark.slow)
    for v, s in [("mamba2", "sequential"), ("mamba2", "associative"), ("mamba1", "associative")]]


def ctx(b, t, mask=None, seg=None, prefill=False):
    m = jnp.ones((b, t), bool) if mask is None else mask
    return Context(positions=None, token_mask=m, segment_ids=seg, cos=None, sin=None, prefill=prefill)


class Jitted:
    """A mixer whose call and multistep run under jax.jit (one compile per shape instead of per primitive)."""

    def __init__(self, m):
        self.m = m
        graphdef, state = nnx.split(m)

        @functools.partial(jax.jit, static_argnames=("prefill", "method"))
        def run(state, x, mask, seg, cache, prefill, method):
            mod = nnx.merge(graphdef, state)
            c = Context(positions=None, token_mask=mask, segment_ids=seg, cos=None, sin=None, prefill=prefill)
            return getattr(mod, method)(x, c, cache)

        self._run = functools.partial(run, state)

    def __getattr__(self, name):
        return getattr(self.m, name)

    def __call__(self, x, c, cache):
        return self._run(x, c.token_mask, c.segment_ids, cache, c.prefill, "__call__")

    def multistep(self, x, c, cache):
        return self._run(x, c.token_mask, c.segment_ids, cache, c.prefill, "multistep")


def mixer(variant, scan, seed=0):
    return Jitted(make_mixer(CFG, MambaConfig(variant=variant, scan=scan, chunk_size=4), rngs=nnx.Rngs(seed)))


def inputs(b, t, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, t, CFG.hidden_size))


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_init_from_attention_is_causal_linear_attention():
    """A = 0, dt = 1, D = 0, no conv/gate/norm: y = O · Σ_{s<=t} (q_t·k_s) v_s per head, GQA heads as repeat_kv."""
    attn = Attention(CFG, rngs=nnx.Rngs(3))
    m = make_mixer(CFG, MambaConfig(chunk_size=4), rngs=nnx.Rngs(4))
    init_from_attention(m, attn)
    b, t = 2, 9
    x = inputs(b, t)
    zxbcdt = m.in_proj(x)
    xbc = zxbcdt[..., m.d_inner:m.d_inner + m.conv_dim]
    xs, B, C = m._heads(xbc)  # conv + SiLU bypassed
    h = CFG.num_heads
    y, _ = ssd_chunked(xs, jnp.ones((b, t, h)), jnp.zeros((h,)), B, C, dt_softplus=False, chunk_size=4)
    out = m.out_proj(y.reshape(b, t, -1))

    hd, rep = CFG.head_dim, CFG.num_heads // CFG.num_kv_heads
    q = attn.q_proj(x).reshape(b, t, h, hd)
    k = attn.k_proj(x).reshape(b, t, CFG.num_kv_heads, hd)
    v = attn.v_proj(x).reshape(b, t, CFG.num_kv_heads, hd)
    ref = np.zeros((b, t, h, hd), np.float32)
    for hh in range(h):
        kv = hh // rep
        scores = np.einsum("btd,bsd->bts", q[:, :, hh], k[:, :, kv]) * np.tril(np.ones((t, t)))
        ref[:, :, hh] = np.einsum("bts,bsd->btd", scores, v[:, :, kv])
    close(out, attn.o_proj(jnp.asarray(ref).reshape(b, t, -1)), 1e-4)


@pytest.mark.parametrize("variant,scan", VARIANTS)
def test_prefill_decode_and_kstep_equal_full_forward(variant, scan):
    m = mixer(variant, scan)
    b, t = 2, 11
    x = inputs(b, t)
    full, _ = m(x, ctx(b, t), None)
    cache = m.init_cache(b, 0)
    y, c_pre = m(x[:, :5], ctx(b, 5, prefill=True), cache)
    ys, c = [y], c_pre
    for i in range(5, t):
        yi, c = m(x[:, i:i + 1], ctx(b, 1), c)
        ys.append(yi)
    close(jnp.concatenate(ys, 1), full)
    # k tokens at once from the prefilled cache: equal to the k single steps and to the slice of the full forward
    yk, ck = m(x[:, 5:], ctx(b, t - 5), c_pre)
    close(yk, full[:, 5:])
    close(ck.ssm, c.ssm)
    # the conv window holds projected inputs: a k-row and a 1-row projection may round apart (XLA:CPU's XNNPACK
    # fusions in jax 0.12.1 do, by one ulp), so close, not bitwise
    close(ck.conv, c.conv)
    # multistep: same outputs, and the cache after every prefix
    ym, pref = m.multistep(x[:, 5:9], ctx(b, 4), c_pre)
    close(ym, full[:, 5:9])
    c2 = c_pre
    for j in range(4):
        _, c2 = m(x[:, 5 + j:6 + j], ctx(b, 1), c2)
        sel = pref.prefix(jnp.full((b,), j + 1))
        close(sel.ssm, c2.ssm)
        close(sel.conv, c2.conv)


@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_left_padding_leaves_state_untouched(variant):
    m = mixer(variant, "chunked")
    x = inputs(1, 6, seed=5)
    pad = 3
    xp = jnp.concatenate([inputs(1, pad, seed=6), x], 1)  # garbage under the padding
    mask = jnp.arange(6 + pad)[None] >= pad
    y_alone, c_alone = m(x, ctx(1, 6, prefill=True), m.init_cache(1, 0))
    y_pad, c_pad = m(xp, ctx(1, 6 + pad, mask=mask, prefill=True), m.init_cache(1, 0))
    close(y_pad[:, pad:], y_alone)
    close(c_pad.ssm, c_alone.ssm)
    close(c_pad.conv, c_alone.conv)
    # a masked decode step changes nothing
    _, c_same = m(inputs(1, 1, seed=7), ctx(1, 1, mask=jnp.zeros((1, 1), bool)), c_alone)
    np.testing.assert_array_equal(c_same.ssm, c_alone.ssm)
    np.testing.assert_array_equal(c_same.conv, c_alone.conv)


@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_packed_documents_equal_separate(variant):
    m = mixer(variant, "chunked" if variant == "mamba2" else "associative")
    a, b = inputs(1, 5, seed=8), inputs(1, 6, seed=9)
    seg = jnp.array([[0] * 5 + [1] * 6])
    y, c = m(jnp.concatenate([a, b], 1), ctx(1, 11, seg=seg, prefill=True), m.init_cache(1, 0))
    ya, _ = m(a, ctx(1, 5), None)
    yb, cb = m(b, ctx(1, 6, prefill=True), m.init_cache(1, 0))
    close(y[:, :5], ya)
    close(y[:, 5:], yb)
    close(c.ssm, cb.ssm)  # the cache after a packed prefill is the last document's
    close(c.conv, cb.conv)


def test_short_last_document_conv_window_is_its_own():
    m = mixer("mamba2", "chunked")
    a, b = inputs(1, 6, seed=10), inputs(1, 2, seed=11)
    seg = jnp.array([[3] * 6 + [4] * 2])
    _, c = m(jnp.concatenate([a, b], 1), ctx(1, 8, seg=seg, prefill=True), m.init_cache(1, 0))
    _, cb = m(b, ctx(1, 2, prefill=True), m.init_cache(1, 0))
    close(c.conv, cb.conv)


def _names(module):
    st = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    return {".".join(map(str, p)): tuple(leaf.shape) for p, leaf in
            ((tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(st)[0])}


def test_parameter_names_shapes_and_axes():
    d, di, dxb, h, hd = 32, 32, 16, 4, 8
    m2 = mixer("mamba2", "chunked").m
    assert _names(m2) == {
        "in_proj.kernel": (d, 2 * di + 2 * dxb + h), "conv1d.weight": (di + 2 * dxb, 4), "conv1d.bias": (di + 2 * dxb,),
        "dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (di,), "out_proj.kernel": (di, d)}
    m1 = mixer("mamba1", "sequential").m
    r = math.ceil(d / 16)
    assert _names(m1) == {
        "in_proj_x.kernel": (d, dxb), "in_proj_z.kernel": (d, di), "B_proj.kernel": (d, dxb),
        "C_proj.kernel": (d, di), "dt_proj_down.kernel": (d, r), "dt_proj.kernel": (r, di), "dt_proj.bias": (di,),
        "conv1d.weight": (di, 4), "conv1d.bias": (di,), "A_log": (di, 16), "D": (di,), "out_proj.kernel": (di, d)}
    for m in (m1, m2):
        for _, var in nnx.iter_graph(m):
            if isinstance(var, nnx.Param):
                axes = var.get_metadata()["out_sharding"]
                assert len(axes) == var[...].ndim and all(isinstance(a, str) for a in axes)
    del hd


def test_fresh_init_follows_official():
    mc = MambaConfig()
    m2 = make_mixer(CFG, mc, rngs=nnx.Rngs(0))
    dt = jax.nn.softplus(m2.dt_bias[...])
    assert bool(jnp.all(dt >= mc.dt_min * 0.999)) and bool(jnp.all(dt <= mc.dt_max * 1.001))
    a = jnp.exp(m2.A_log[...])
    assert bool(jnp.all((a >= 1) & (a <= 16)))
    np.testing.assert_array_equal(m2.D[...], 1.0)
    np.testing.assert_array_equal(m2.norm.weight[...], 1.0)
    assert float(jnp.abs(m2.conv1d.weight[...]).max()) <= 0.5
    assert float(jnp.abs(m2.in_proj.kernel[...]).max()) <= 1 / math.sqrt(CFG.hidden_size)
    m1 = make_mixer(CFG, MambaConfig(variant="mamba1"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(jnp.exp(m1.A_log[...]), jnp.broadcast_to(jnp.arange(1, 17.0), (32, 16)), rtol=1e-6)
    assert float(jnp.abs(m1.dt_proj.kernel[...]).max()) <= m1.dt_rank ** -0.5
    assert isinstance(m1, Mamba1) and isinstance(m2, Mamba2)


def test_bf16_compute_is_finite():
    cfg = LlamaConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    for v in ("mamba2", "mamba1"):
        m = make_mixer(cfg, MambaConfig(variant=v, chunk_size=4), rngs=nnx.Rngs(0))
        y, c = m(inputs(2, 9).astype(jnp.bfloat16), ctx(2, 9, prefill=True), m.init_cache(2, 0))
        assert y.dtype == jnp.bfloat16 and c.ssm.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
