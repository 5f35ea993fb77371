"""build_hybrid: layouts by fraction, what is copied and converted, frozen masks, progressive conversion, shallow
students (keep_layers)."""

import jax
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig, from_dict
from mamba_llama_jax.convert.from_attention import attn_layers_for, build_hybrid, quiet_start, trainable_mask
from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.models.llama import Attention, LlamaLM
from mamba_llama_jax.models.mamba import Mamba1, Mamba2

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=8, num_heads=4, num_kv_heads=2,
                  dtype="float32")


@pytest.fixture(scope="module")
def teacher():
    return LlamaLM(CFG, rngs=nnx.Rngs(0))


def test_layouts_match_design():
    assert attn_layers_for(32, 0.5) == tuple(range(1, 32, 2))
    assert attn_layers_for(32, 0.25) == tuple(range(3, 32, 4))
    assert attn_layers_for(32, 0.125) == (7, 15, 23, 31)
    assert attn_layers_for(32, 0.0) == ()
    assert attn_layers_for(30, 0.5) == tuple(range(1, 30, 2))
    assert attn_layers_for(30, 0.25) == (3, 7, 11, 15, 19, 23, 27)
    assert attn_layers_for(30, 0.125) == (7, 15, 23)


def test_hybrid_config_errors():
    with pytest.raises(ConfigError, match="attn_fraction"):
        HybridConfig(attn_fraction=0.3)
    with pytest.raises(ConfigError, match="out of range"):
        HybridConfig(attn_layers=(1, 9)).layers_for(8)
    with pytest.raises(ConfigError, match="attn_layers"):
        HybridConfig()
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(HybridConfig, {"attn_fraction": 0.5, "mamba": {"d_stat": 4}})
    cfg = from_dict(HybridConfig, {"attn_layers": [3, 1], "mamba": {"variant": "mamba1", "scan": "associative"}})
    assert cfg.attn_layers == (1, 3) and cfg.mamba.variant == "mamba1"


@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_copies_and_conversions(teacher, variant):
    model = build_hybrid(teacher, HybridConfig(attn_fraction=0.5, mamba=MambaConfig(variant=variant)),
                         rngs=nnx.Rngs(1))
    eq = np.testing.assert_array_equal
    eq(model.embed_tokens.embedding[...], teacher.embed_tokens.embedding[...])
    eq(model.lm_head.kernel[...], teacher.lm_head.kernel[...])
    eq(model.norm.weight[...], teacher.norm.weight[...])
    for i, (layer, t) in enumerate(zip(model.layers, teacher.layers)):
        eq(layer.mlp.down_proj.kernel[...], t.mlp.down_proj.kernel[...])
        eq(layer.input_layernorm.weight[...], t.input_layernorm.weight[...])
        a = t.mixer
        if i in model.attn_layers:
            assert isinstance(layer.mixer, Attention)
            eq(layer.mixer.q_proj.kernel[...], a.q_proj.kernel[...])
            continue
        m = layer.mixer
        eq(m.out_proj.kernel[...], a.o_proj.kernel[...])
        if variant == "mamba2":
            assert isinstance(m, Mamba2)
            w, di, dxb = m.in_proj.kernel[...], m.d_inner, m.d_xb
            eq(w[:, di:di + dxb], a.v_proj.kernel[...])
            eq(w[:, di + dxb:di + 2 * dxb], a.k_proj.kernel[...])
            eq(w[:, di + 2 * dxb:2 * di + 2 * dxb], a.q_proj.kernel[...])
        else:
            assert isinstance(m, Mamba1)
            eq(m.in_proj_x.kernel[...], a.v_proj.kernel[...])
            eq(m.B_proj.kernel[...], a.k_proj.kernel[...])
            eq(m.C_proj.kernel[...], a.q_proj.kernel[...])


def test_trainable_masks(teacher):
    model = build_hybrid(teacher, HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(1))
    params = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(trainable_mask(model, "layerwise")(params))[0]
    on = {jax.tree_util.keystr(p) for p, v in flat if v}
    assert on and all("['mixer']" in p and any(f"['layers'][{i}]" in p for i in model.mamba_layers) for p in on)
    assert any("['layers'][0]['mixer']['A_log']" in p for p in on)
    assert len(on) == len(model.mamba_layers) * 8
    assert all(jax.tree.leaves(trainable_mask(model, "end_to_end")(nnx.to_pure_dict(params))))
    with pytest.raises(ConfigError, match="stage"):
        trainable_mask(model, "pretrain")


def test_progressive_keeps_trained_mamba_layers(teacher):
    prev = build_hybrid(teacher, HybridConfig(attn_layers=(1, 2, 3, 5, 6, 7)), rngs=nnx.Rngs(1))
    # pretend stage 1 trained layer 0's mixer and layer 2's attention
    prev.layers[0].mixer.A_log.set_value(prev.layers[0].mixer.A_log[...] + 1.0)
    prev.layers[2].mixer.v_proj.kernel.set_value(prev.layers[2].mixer.v_proj.kernel[...] * 2)
    new = build_hybrid(teacher, HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(2), previous=prev)
    assert new.mamba_layers == (0, 2, 4, 6)
    np.testing.assert_array_equal(new.layers[0].mixer.A_log[...], prev.layers[0].mixer.A_log[...])
    np.testing.assert_array_equal(new.layers[4].mixer.in_proj.kernel[...], prev.layers[4].mixer.in_proj.kernel[...])
    m2 = new.layers[2].mixer  # newly converted from the *previous* model's attention
    np.testing.assert_array_equal(m2.in_proj.kernel[:, m2.d_inner:m2.d_inner + m2.d_xb],
                                  prev.layers[2].mixer.v_proj.kernel[...])
    with pytest.raises(ConfigError, match="back into attention"):
        build_hybrid(teacher, HybridConfig(attn_layers=(0, 1)), rngs=nnx.Rngs(3), previous=prev)


def test_quiet_start_touches_only_the_newly_converted_mixers(teacher):
    """Identity conv (no bias) and a scaled gate norm on the mixers a build converts; mixers converted by an
    earlier stage keep what training gave them; attention layers are untouched."""
    first = build_hybrid(teacher, HybridConfig(attn_layers=(1, 2, 3, 5, 6, 7)), rngs=nnx.Rngs(1), quiet=0.05)
    plain = build_hybrid(teacher, HybridConfig(attn_layers=(1, 2, 3, 5, 6, 7)), rngs=nnx.Rngs(1))
    for i in (0, 4):
        m, p = first.layers[i].mixer, plain.layers[i].mixer
        w = np.asarray(m.conv1d.weight[...])
        assert (w[:, -1] == 1).all() and (w[:, :-1] == 0).all() and not np.asarray(m.conv1d.bias[...]).any()
        np.testing.assert_allclose(m.norm.weight[...], 0.05 * np.asarray(p.norm.weight[...]))
        assert not np.allclose(p.conv1d.weight[...], w)  # the method's own init is a fresh conv
        np.testing.assert_array_equal(m.in_proj.kernel[...], p.in_proj.kernel[...])  # the Q/K/V copies stay
    first.layers[0].mixer.norm.weight.set_value(first.layers[0].mixer.norm.weight[...] * 0 + 0.7)  # "trained"
    second = build_hybrid(teacher, HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(2), previous=first, quiet=0.1)
    np.testing.assert_allclose(second.layers[0].mixer.norm.weight[...], 0.7)
    np.testing.assert_allclose(second.layers[2].mixer.norm.weight[...], 0.1)  # converted by this build
    np.testing.assert_array_equal(second.layers[1].mixer.q_proj.kernel[...],
                                  teacher.layers[1].mixer.q_proj.kernel[...])
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        quiet_start(second, [0], 0.0)
    mamba1 = HybridConfig(attn_fraction=0.5, mamba=MambaConfig(variant="mamba1"))
    with pytest.raises(ConfigError, match="Mamba2"):
        build_hybrid(teacher, mamba1, rngs=nnx.Rngs(3), quiet=0.05)


def test_mismatched_dims_are_refused(teacher):
    with pytest.raises(ConfigError, match="d_state"):
        build_hybrid(teacher, HybridConfig(attn_fraction=0.5, mamba=MambaConfig(d_state=4)), rngs=nnx.Rngs(1))


# ------------------------------------------------------------------------------------------ shallow students


@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_shallow_student_copies_the_kept_layers(teacher, variant):
    model = build_hybrid(teacher, HybridConfig(keep_layers=(0, 2), attn_fraction=0, mamba=MambaConfig(
        variant=variant)), rngs=nnx.Rngs(1))
    assert model.cfg.num_layers == len(model.layers) == 2 and model.mamba_layers == (0, 1)
    assert model.hybrid.keep_layers is None and model.hybrid.attn_layers == ()  # what it exports
    eq = np.testing.assert_array_equal
    eq(model.embed_tokens.embedding[...], teacher.embed_tokens.embedding[...])
    eq(model.lm_head.kernel[...], teacher.lm_head.kernel[...])
    eq(model.norm.weight[...], teacher.norm.weight[...])
    for layer, t in zip(model.layers, (teacher.layers[0], teacher.layers[2])):
        for name in ("gate_proj", "up_proj", "down_proj"):
            eq(getattr(layer.mlp, name).kernel[...], getattr(t.mlp, name).kernel[...])
        eq(layer.input_layernorm.weight[...], t.input_layernorm.weight[...])
        eq(layer.post_attention_layernorm.weight[...], t.post_attention_layernorm.weight[...])
        m, a = layer.mixer, t.mixer
        eq(m.out_proj.kernel[...], a.o_proj.kernel[...])
        if variant == "mamba2":
            w, di, dxb = m.in_proj.kernel[...], m.d_inner, m.d_xb
            eq(w[:, di:di + dxb], a.v_proj.kernel[...])
            eq(w[:, di + dxb:di + 2 * dxb], a.k_proj.kernel[...])
            eq(w[:, di + 2 * dxb:2 * di + 2 * dxb], a.q_proj.kernel[...])
        else:
            eq(m.in_proj_x.kernel[...], a.v_proj.kernel[...])
            eq(m.B_proj.kernel[...], a.k_proj.kernel[...])
            eq(m.C_proj.kernel[...], a.q_proj.kernel[...])


def test_shallow_attention_layers_index_the_kept_layers(teacher):
    model = build_hybrid(teacher, HybridConfig(keep_layers=(1, 4, 6, 7), attn_fraction=0.5), rngs=nnx.Rngs(1))
    assert model.attn_layers == (1, 3) and model.hybrid.attn_layers == (1, 3)
    np.testing.assert_array_equal(model.layers[1].mixer.q_proj.kernel[...], teacher.layers[4].mixer.q_proj.kernel[...])
    np.testing.assert_array_equal(model.layers[3].mixer.v_proj.kernel[...], teacher.layers[7].mixer.v_proj.kernel[...])
    on = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(
        trainable_mask(model, "layerwise")(nnx.state(model, nnx.Param)))[0] if v}
    assert on and all(any(f"['layers'][{i}]" in p for i in (0, 2)) for p in on)  # the student's own Mamba layers


def test_keeping_every_layer_is_the_full_build(teacher):
    layout = HybridConfig(attn_fraction=0.5)
    full = build_hybrid(teacher, layout, rngs=nnx.Rngs(1))
    same = build_hybrid(teacher, HybridConfig(attn_fraction=0.5, keep_layers=tuple(range(8))), rngs=nnx.Rngs(1))
    assert same.cfg == full.cfg and same.attn_layers == full.attn_layers
    a, b = nnx.state(full, nnx.Param), nnx.state(same, nnx.Param)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_bad_keep_layers(teacher):
    with pytest.raises(ConfigError, match="at least one"):
        HybridConfig(attn_fraction=0, keep_layers=())
    with pytest.raises(ConfigError, match=r"ascending order, got \[0, 2, 2\]"):
        HybridConfig(attn_fraction=0, keep_layers=(0, 2, 2))
    with pytest.raises(ConfigError, match="ascending"):
        from_dict(HybridConfig, {"attn_fraction": 0, "keep_layers": [3, 1]})
    with pytest.raises(ConfigError, match="non-negative"):
        HybridConfig(attn_fraction=0, keep_layers=(-1, 2))
    with pytest.raises(ConfigError, match=r"attn_layers \[2\] out of range: with keep_layers they index the 2 kept"):
        from_dict(HybridConfig, {"attn_layers": [0, 2], "keep_layers": [0, 5]})
    with pytest.raises(ConfigError, match=r"keep_layers \[8, 9\] out of range for a teacher with 8 layers"):
        build_hybrid(teacher, HybridConfig(attn_fraction=0, keep_layers=(0, 8, 9)), rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="keep_layers"):
        from_dict(HybridConfig, {"attn_fraction": 0, "keep_layers": "0,2"})
    assert from_dict(HybridConfig, {"attn_fraction": 0, "keep_layers": [0, 2]}).keep_layers == (0, 2)


def test_shallow_progressive_stages(teacher):
    """A later stage of a shallow layout maps layer to layer; a full-depth previous gives up its kept layers;
    any other depth is refused."""
    prev = build_hybrid(teacher, HybridConfig(keep_layers=(0, 3, 7), attn_layers=(1, 2)), rngs=nnx.Rngs(1))
    prev.layers[0].mixer.A_log.set_value(prev.layers[0].mixer.A_log[...] + 1.0)  # "trained"
    prev.layers[1].mixer.v_proj.kernel.set_value(prev.layers[1].mixer.v_proj.kernel[...] * 2)
    new = build_hybrid(teacher, HybridConfig(keep_layers=(0, 3, 7), attn_layers=(2,)), rngs=nnx.Rngs(2),
                       previous=prev)
    assert new.mamba_layers == (0, 1) and len(new.layers) == 3
    np.testing.assert_array_equal(new.layers[0].mixer.A_log[...], prev.layers[0].mixer.A_log[...])
    m1 = new.layers[1].mixer  # converted from the previous stage's (trained) attention of the same layer
    np.testing.assert_array_equal(m1.in_proj.kernel[:, m1.d_inner:m1.d_inner + m1.d_xb],
                                  prev.layers[1].mixer.v_proj.kernel[...])
    with pytest.raises(ConfigError, match="back into attention"):
        build_hybrid(teacher, HybridConfig(keep_layers=(0, 3, 7), attn_layers=(0, 2)), rngs=nnx.Rngs(3),
                     previous=prev)
    with pytest.raises(ConfigError, match="must repeat its keep_layers"):
        build_hybrid(teacher, HybridConfig(attn_fraction=0), rngs=nnx.Rngs(3), previous=prev)
    with pytest.raises(ConfigError, match="previous hybrid has 3 layers"):
        build_hybrid(teacher, HybridConfig(keep_layers=(0, 7), attn_fraction=0), rngs=nnx.Rngs(3), previous=prev)
    full = build_hybrid(teacher, HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(1))
    full.layers[4].mixer.A_log.set_value(full.layers[4].mixer.A_log[...] + 1.0)
    picked = build_hybrid(teacher, HybridConfig(keep_layers=(4, 5), attn_fraction=0), rngs=nnx.Rngs(2),
                          previous=full)
    np.testing.assert_array_equal(picked.layers[0].mixer.A_log[...], full.layers[4].mixer.A_log[...])
    np.testing.assert_array_equal(picked.layers[1].mlp.up_proj.kernel[...], full.layers[5].mlp.up_proj.kernel[...])
