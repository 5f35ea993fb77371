"""MOHAWK matrix orientation: on a tiny case the materialised matrices and the loss equal a direct computation with
loops (and reproduce the layers they come from: P·V is the attention's output, M·x + D·x the SSD's); training
with objective 'orient' lowers the loss."""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from mamba_llama_jax.config import HybridConfig, LossConfig, MambaConfig, OptimConfig  # noqa: E402
from mamba_llama_jax.data import pipeline  # noqa: E402
from mamba_llama_jax.errors import ConfigError  # noqa: E402
from mamba_llama_jax.models.mamba import causal_conv  # noqa: E402
from mamba_llama_jax.ops.ssd import ssd_chunked  # noqa: E402
from mamba_llama_jax.train import mohawk, stages, trainer  # noqa: E402

SEG = [1, 1, 1, 1, 2, 2, 0]  # two documents and one padding position


@pytest.fixture(scope="module")
def case():
    t = tiny.teacher(scale=2.0)
    h = tiny.hybrid(t)  # layer 0 Mamba2 (attention-initialised), layer 1 attention
    rng = np.random.default_rng(3)
    batch = {"tokens": jnp.asarray(rng.integers(1, 64, (1, len(SEG))), jnp.int32),
             "loss_mask": jnp.ones((1, len(SEG)), jnp.int32), "segment_ids": jnp.asarray([SEG], jnp.int32)}
    ref = mohawk.orient_reference(t, batch)
    ctx = stages.context(h, batch["tokens"], batch["segment_ids"] > 0, batch["segment_ids"])
    return t, h, batch, ref, ctx


def _valid(i, j):
    return j <= i and SEG[i] == SEG[j] and SEG[i] > 0


def hand_attention(q, k):
    """softmax over the valid keys of q_i·k_j/√d, query head h reading KV head h // (H / KV); loops."""
    L, H, d = q.shape
    rep = H // k.shape[1]
    P = np.zeros((H, L, L))
    for h in range(H):
        for i in range(L):
            js = [j for j in range(L) if _valid(i, j)]
            if not js:
                continue
            s = np.array([q[i, h] @ k[j, h // rep] / math.sqrt(d) for j in js])
            e = np.exp(s - s.max())
            P[h, i, js] = e / e.sum()
    return P


def mixer_internals(mixer, x, ctx):
    _, xbc, dt = mixer._project(x, ctx)
    conv = causal_conv(xbc, mixer.conv1d.weight[...], mixer.conv1d.bias[...], None, ctx.segment_ids)
    xs, B, C = mixer._heads(jax.nn.silu(conv).astype(xbc.dtype))
    A = -jnp.exp(mixer.A_log[...])
    return xs, B, C, dt, A


def hand_mamba(B, C, dt, A):
    """M_ij = (C_i·B_j)·exp(Σ_{j<k≤i} dt_k A)·dt_j on valid pairs; loops."""
    L, H = dt.shape
    M = np.zeros((H, L, L))
    for h in range(H):
        for i in range(L):
            for j in range(L):
                if _valid(i, j):
                    decay = math.exp(sum(dt[k, h] * A[h] for k in range(j + 1, i + 1)))
                    M[h, i, j] = (C[i, h] @ B[j, h]) * decay * dt[j, h]
    return M


def test_attention_matrix_by_hand_and_reproduces_the_layer(case):
    t, _, _, (ins, qs, ks), ctx = case
    P = np.asarray(mohawk.attention_matrix(qs[0], ks[0], ctx))[0]
    np.testing.assert_allclose(P, hand_attention(np.asarray(qs[0][0]), np.asarray(ks[0][0])), atol=1e-6)
    attn = t.layers[0].mixer
    v = attn.v_proj(ins[0]).reshape(1, len(SEG), attn.num_kv_heads, attn.head_dim)
    v = jnp.repeat(v, attn.num_heads // attn.num_kv_heads, axis=2)
    out = attn.o_proj(jnp.einsum("hij,jhd->ihd", P, v[0]).reshape(1, len(SEG), -1))
    want, _ = attn(ins[0], ctx, None)
    real = np.asarray(SEG) > 0
    np.testing.assert_allclose(np.asarray(out)[0, real], np.asarray(want)[0, real], atol=1e-5)


def test_mamba_matrix_by_hand_and_reproduces_the_ssd(case):
    _, h, _, (ins, _, _), ctx = case
    mixer = h.layers[0].mixer
    xs, B, C, dt, A = mixer_internals(mixer, ins[0], ctx)
    M = np.asarray(mohawk.mamba2_matrix(mixer, ins[0], ctx))[0]
    np.testing.assert_allclose(M, hand_mamba(np.asarray(B[0]), np.asarray(C[0]), np.asarray(dt[0]), np.asarray(A)),
                               atol=1e-6)
    D = mixer.D[...]
    y, _ = ssd_chunked(xs, dt, A, B, C, D=D, dt_softplus=False, segment_ids=ctx.segment_ids, chunk_size=4)
    mx = jnp.einsum("hij,jhp->ihp", M, xs[0]) + D[None, :, None] * xs[0]
    real = np.asarray(SEG) > 0
    np.testing.assert_allclose(np.asarray(mx)[real], np.asarray(y)[0, real], atol=1e-5)


def test_orient_loss_equals_direct_computation(case):
    _, h, batch, ref, ctx = case
    ins, qs, ks = ref
    xs, B, C, dt, A = mixer_internals(h.layers[0].mixer, ins[0], ctx)
    M = hand_mamba(np.asarray(B[0]), np.asarray(C[0]), np.asarray(dt[0]), np.asarray(A))
    P = hand_attention(np.asarray(qs[0][0]), np.asarray(ks[0][0]))
    want = ((M - P) ** 2).sum() / (M.shape[0] * sum(s > 0 for s in SEG))
    loss, parts = mohawk.orient_loss(h, batch, ref, LossConfig())
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert parts["orient"] == loss


def test_orientation_training_lowers_the_loss(tmp_path):
    t = tiny.teacher(scale=2.0)
    h = tiny.hybrid(t)
    # Four documents, one per row, so every step sees the same matrices: the fall is not hidden by batch noise.
    # (At the attention initialisation M is small — it scales with dt ~ 0.01 — so the loss starts near Σ P².)
    st = tiny.stage(steps=40, objective="orient", optim=OptimConfig(lr=3e-2, schedule="constant", grad_clip=1.0),
                    data=tiny.replace(tiny.stage().data, pack=False))
    ds = pipeline.build_dataset(tiny.token_examples(4), tiny.PadTok(), st.data, batch_size=st.batch_size)
    before = {k: np.asarray(v) for k, v in trainer.Flattener(nnx.state(h, nnx.Param)).flat(
        nnx.state(h, nnx.Param)).items()}
    r = trainer.fit(st, h, t, ds, out_dir=tmp_path, log_every=1, progress=False)
    vals = [m["orient"] for m in r.metrics]
    assert np.mean(vals[-4:]) < 0.5 * vals[0], vals
    after = trainer.Flattener(nnx.state(h, nnx.Param)).flat(nnx.state(h, nnx.Param))
    changed = {k for k in before if not np.array_equal(before[k], np.asarray(after[k]))}
    assert changed and all(k.startswith("layers/0/mixer/") for k in changed)  # only the Mamba layer trains
    assert "layers/0/mixer/out_proj/kernel" not in changed  # M does not depend on it: no gradient, no step


def test_orient_needs_mamba2():
    t = tiny.teacher()
    h = tiny.hybrid(t, hyb=HybridConfig(attn_fraction=0.5, mamba=MambaConfig(variant="mamba1", d_state=8)))
    batch = {"tokens": jnp.ones((1, 4), jnp.int32), "loss_mask": jnp.ones((1, 4), jnp.int32),
             "segment_ids": jnp.ones((1, 4), jnp.int32)}
    with pytest.raises(ConfigError, match="Mamba2"):
        mohawk.orient_loss(h, batch, mohawk.orient_reference(t, batch), LossConfig())
