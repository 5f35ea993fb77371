"""Pallas decode attention == `mamba_llama_jax.ops.attention.decode_attention_reference`: output and both caches.

CPU: interpret mode at tiny shapes. GPU (`-m gpu`, on the device): compiled through Triton at SmolLM2's head
shapes. Every kernel test checks that the traced function holds a `pallas_call`, so a silent fallback to the
reference cannot pass as the kernel.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.attention import decode_attention_reference
from mamba_llama_jax.ops.partials import matmul_t_partials, project_partials, weigh
from pallas_kernels import decode_attention as da
from pallas_kernels import dispatch
from pallas_kernels.decode_attention import (
    decode_attention, decode_attention_choice, decode_attention_pallas, decode_attention_partials_pallas,
    decode_attention_partials_reference, merge_partials, merge_partials_pallas, plan,
)
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_helpers import clear_jit_caches, has_pallas_call, lower_for_h100, on_gpu, rel  # noqa: E402


def make_inputs(b, slots, h, kv, d, index, *, dtype=jnp.float32, seed=0, pad=None):
    k = jax.random.split(jax.random.key(seed), 6)
    qkv = jax.random.normal(k[0], (b, (h + 2 * kv) * d)).astype(dtype)
    kc = jax.random.normal(k[1], (b, slots, kv, d)).astype(dtype)
    vc = jax.random.normal(k[2], (b, slots, kv, d)).astype(dtype)
    pos = jax.random.randint(k[3], (b,), 0, 4000).astype(jnp.float32)
    inv = 1.0 / (1e4 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = pos[:, None] * inv
    slot = jnp.arange(slots)[None, :]
    # left padding of different lengths per row (pad[r] slots invalid); the new token (slot `index`) is real
    pad = np.zeros(b, int) if pad is None else np.asarray(pad)
    valid = ((slot >= jnp.asarray(pad)[:, None]) | (slot == index)) & (slot <= index)
    return qkv, kc, vc, jnp.cos(ang), jnp.sin(ang), jnp.int32(index), valid


def assert_equal_to_reference(args, h, kv, *, window=0, tol=1e-5, interpret=True, **kw):
    fn = lambda *a: decode_attention_pallas(*a, num_heads=h, num_kv_heads=kv, window=window, interpret=interpret,
                                            **kw)
    assert "pallas_call" in str(jax.make_jaxpr(fn)(*args))
    got = jax.jit(fn)(*args)
    # one compiled program, not the reference's ops compiled one by one (each case's shapes are new)
    want = jax.jit(functools.partial(decode_attention_reference, num_heads=h, num_kv_heads=kv, window=window))(
        *args)
    for g, w, name in zip(got, want, ("out", "k_cache", "v_cache")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel(g, w) < tol, (name, rel(g, w))
    # the cache outside the written slot is untouched, the written slot holds the new k/v
    idx = int(args[5])
    np.testing.assert_array_equal(np.asarray(got[2][:, idx], np.float32),
                                  np.asarray(args[0][:, (h + kv) * args[1].shape[-1]:], np.float32)
                                  .reshape(got[2][:, idx].shape))


@contextlib.contextmanager
def fresh_plan(**settings):
    """`da.override_plan(**settings)` with the kernels' caches cleared before and after: their jit caches key on
    their arguments only, so a step traced under other settings would be reused."""
    clear_jit_caches()
    try:
        with da.override_plan(**settings):
            yield
    finally:
        clear_jit_caches()


def each_plan(shapes: list[tuple], slow: list[str | None]) -> list:
    """Every shape under both plans (the planned one and the KV head's whole group a program), ids `planned-...` /
    `group-...`; `slow[i]` names the plan under which shape i runs only in `make test-slow` (5-13 s a case on 2
    cores; its other plan stays in the default run)."""
    return [pytest.param(*shape, group, id="-".join([plan, *(getattr(v, "__name__", str(v)) for v in shape)]),
                         marks=[pytest.mark.slow] if plan == slow_plan else [])
            for shape, slow_plan in zip(shapes, slow, strict=True)
            for group, plan in ((False, "planned"), (True, "group"))]


@pytest.mark.parametrize("b,slots,h,kv,d,index,window,splits,group", each_plan([
    (2, 32, 4, 2, 16, 0, 0, 1),      # first slot: attends to itself only
    (2, 48, 4, 2, 16, 37, 0, 1),     # several blocks, dynamic bound
    (1, 64, 6, 2, 16, 50, 48, 1),    # static window shorter than the cache
    (1, 64, 3, 3, 16, 63, 0, 4),     # MHA (g = 1), split over the sequence, last slot
    (3, 64, 9, 3, 32, 21, 0, 2),     # SmolLM2's grouping (g = 3), 2 filled blocks in 2 splits, row 2's first padding
], slow=["group", "group", "planned", None, None]))
def test_kernel_equals_reference_interpret(b, slots, h, kv, d, index, window, splits, group):
    """The planned kernel (at these batches one query head a program, HEADS_BY_BATCH) and the KV head's whole group a
    program: the reference's output and caches."""
    args = make_inputs(b, slots, h, kv, d, index, pad=[0, 5, 17][:b], seed=index)
    with fresh_plan(heads=h // kv if group else 0):
        assert_equal_to_reference(args, h, kv, window=window, splits=splits, block=16)


@pytest.mark.parametrize("b,slots,h,kv,d,index,window,splits,dtype,group", each_plan([
    (2, 48, 4, 2, 32, 37, 0, 1, jnp.float32),     # g = 2, several blocks
    (1, 64, 3, 3, 32, 63, 0, 4, jnp.float32),     # MHA (g = 1), split, last slot
    (3, 64, 9, 3, 32, 21, 0, 2, jnp.float32),     # SmolLM2's grouping, a split with no valid slot
    (1, 64, 6, 2, 32, 50, 48, 1, jnp.float32),    # window shorter than the cache
    (2, 64, 9, 3, 32, 40, 0, 2, jnp.bfloat16),    # bf16: p as two rounded parts
], slow=["group", "group", "planned", "planned", "group"]))
def test_dot_form_equals_reference_interpret(b, slots, h, kv, d, index, window, splits, dtype, group):
    """The tensor-core form (q heads as tile rows, dots for q·Kᵀ and p·V), planned and with the whole group a
    program: the same output and caches."""
    args = make_inputs(b, slots, h, kv, d, index, pad=[0, 5, 17][:b], seed=index, dtype=dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    with fresh_plan(heads=h // kv if group else 0):
        assert_equal_to_reference(args, h, kv, window=window, splits=splits, block=16, dot=True, tol=tol)
        if splits > 1:
            assert_partials_equal(args, h, kv, block=16, splits=splits, window=window, tol=tol, dot=True)


@pytest.mark.parametrize("block,dtype", [(32, jnp.float32), (64, jnp.bfloat16)])
def test_dot_form_in_the_planned_blocks_equals_reference_interpret(block, dtype):
    """The tensor-core form in the blocks `plan` gives from batch 16 (64 slots) and 64 (32 slots,
    DOT_BLOCK_BY_BATCH) at SmolLM2's heads: a block's p·V contracts over its slots, so the tile shapes differ
    from the 16-slot cases above."""
    b, slots, h, kv, d, index = 2, 128, 9, 3, 64, 100
    args = make_inputs(b, slots, h, kv, d, index, pad=[0, 37], seed=block, dtype=dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert_equal_to_reference(args, h, kv, splits=1, block=block, dot=True, tol=tol)


F32, BF16 = jnp.float32, jnp.bfloat16
AFTER, BLOCK = dict(newest="after"), dict(newest="block")


@pytest.mark.parametrize("plan,other,b,slots,index,splits,dtype", [
    (AFTER, BLOCK, 2, 64, 0, 1, F32),     # the first slot: only the new token counts
    pytest.param(AFTER, BLOCK, 3, 96, 48, 4, BF16, marks=pytest.mark.slow),  # 4 blocks in 4 splits: the new token
    # opens the last one (15 s; `make test-slow`)
    (BLOCK, AFTER, 2, 96, 50, 4, F32),
    # one query head a program (HEADS_BY_BATCH): three programs a KV head, the first writing the new token's K/V,
    # against the whole group (3) a program
    (dict(AFTER, heads=1), dict(AFTER, heads=3), 3, 96, 48, 4, BF16),
    (dict(BLOCK, heads=1), dict(BLOCK, heads=3), 2, 96, 50, 1, F32),
    # and the whole group a program, which these small batches no longer take by default (the mirrors of the two
    # cases above: 13 s and 6 s, in `make test-slow`)
    pytest.param(dict(AFTER, heads=3), dict(AFTER, heads=1), 3, 96, 48, 4, BF16, marks=pytest.mark.slow),
    pytest.param(dict(BLOCK, heads=3), dict(BLOCK, heads=1), 2, 96, 50, 1, F32, marks=pytest.mark.slow),
], ids=lambda v: "+".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_dot_form_options_equal_reference_interpret(plan, other, b, slots, index, splits, dtype):
    """The tensor-core form with the new token added after the block loop (`newest="after"`) or substituted into
    its block ("block"), and with one query head a program (`heads=1`): output, partials and caches the
    reference's; a row whose new slot is invalid (row 1) leaves the new token out as the reference does; the
    `other` settings trace a different kernel (the option took effect)."""
    h, kv, d = 9, 3, 32
    args = make_inputs(b, slots, h, kv, d, index, pad=[0, 5, 17][:b], seed=index + 1, dtype=dtype)
    if index:
        args = args[:6] + (args[6].at[1, index].set(False),)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    kernel_text = lambda: str(jax.make_jaxpr(functools.partial(
        decode_attention_pallas, num_heads=h, num_kv_heads=kv, block=16, splits=splits, interpret=True,
        dot=True))(*args))
    with fresh_plan(**plan):
        assert_equal_to_reference(args, h, kv, splits=splits, block=16, dot=True, tol=tol)
        if splits > 1:
            assert_partials_equal(args, h, kv, block=16, splits=splits, tol=tol, dot=True)
        text = kernel_text()
    with fresh_plan(**other):
        assert text != kernel_text()  # the option took effect


def test_heads_are_planned_by_batch():
    """HEADS_BY_BATCH: one head a program up to batch 4, the whole group from 5 (measured, see there); an override
    that divides the group wins at every batch, one that does not leaves the group whole; a bad value raises."""
    assert [da.planned_heads(3, b) for b in (1, 2, 4, 5, 16, 64, 256)] == [1, 1, 1, 3, 3, 3, 3]
    assert [da.planned_heads(g, 1) for g in (1, 4, 8)] == [1, 1, 1]
    with da.override_plan(heads=1):
        assert [da.planned_heads(g, 64) for g in (1, 3, 4)] == [1, 1, 1]
    with da.override_plan(heads=2):
        assert [da.planned_heads(g, b) for g in (1, 3, 4) for b in (1, 64)] == [1, 1, 3, 3, 2, 2]
    for bad in (-1, 1.5):
        with pytest.raises(KernelError, match="heads"):
            with da.override_plan(heads=bad):
                pass


@pytest.mark.parametrize("heads,splits", [(1, 1), (2, 2), pytest.param(1, 4, marks=pytest.mark.slow)])  # 1-4: 15 s
def test_elementwise_form_with_part_of_a_group_equals_reference_interpret(heads, splits):
    """The elementwise form with 1 or 2 of a 4-head group a program (HEADS_BY_BATCH), merged and as split partials:
    the reference's outputs and caches, row 1's new slot invalid; the programs split the group (a different
    kernel)."""
    h, kv, d, index = 8, 2, 16, 40
    args = make_inputs(3, 64, h, kv, d, index, pad=[0, 5, 17], seed=heads + splits)
    args = args[:6] + (args[6].at[1, index].set(False),)
    text = lambda: str(jax.make_jaxpr(functools.partial(decode_attention_pallas, num_heads=h, num_kv_heads=kv,
                                                        block=16, splits=splits, interpret=True, dot=False))(*args))
    with fresh_plan(heads=h // kv):
        whole = text()
    with fresh_plan(heads=heads):
        assert text() != whole
        assert_equal_to_reference(args, h, kv, splits=splits, block=16, dot=False)
        if splits > 1:
            assert_partials_equal(args, h, kv, block=16, splits=splits, dot=False)


def test_newest_is_planned_by_batch():
    """NEWEST_BY_BATCH: substituted into its block at batch 1, after the loop from 16 (measured, see there); the
    override wins; a bad value raises."""
    assert [da.planned_newest(b) for b in (1, 8, 16, 64, 256)] == ["block", "block", "after", "after", "after"]
    with da.override_plan(newest="block"):
        assert da.planned_newest(64) == "block"
    with pytest.raises(KernelError, match="newest"):
        with da.override_plan(newest="late"):
            pass


@pytest.mark.parametrize("dot", [False, True], ids=["elementwise", "dot"])
def test_an_index_past_the_cache_writes_where_the_reference_writes(dot):
    """index >= slots (a caller's bug): the kernel clamps its write as dynamic_update_slice clamps the reference's
    (to the last slot), so output and caches equal the reference's; unclamped, the bounds-checked interpreter
    raises (an out-of-bounds store, which on a GPU corrupts memory)."""
    b, slots, h, kv, d = 2, 32, 4, 2, 32
    args = make_inputs(b, slots, h, kv, d, slots - 1, seed=3)
    args = args[:5] + (jnp.int32(slots + 2),) + args[6:]
    got = decode_attention_pallas(*args, num_heads=h, num_kv_heads=kv, block=16, splits=2, interpret=True, dot=dot)
    want = decode_attention_reference(*args, num_heads=h, num_kv_heads=kv)
    for g, w, name in zip(got, want, ("out", "k_cache", "v_cache")):
        assert rel(g, w) < 1e-5, (name, rel(g, w))


def test_dot_form_is_planned_by_batch_and_override(monkeypatch):
    assert da.planned_dot(1) is True and da.planned_dot(64) is True  # DOT_MIN_BATCH = 1: every batch
    monkeypatch.setattr(da, "DOT_MIN_BATCH", 0)
    assert da.planned_dot(1) is False and da.planned_dot(64) is False  # 0: never
    monkeypatch.setattr(da, "DOT_MIN_BATCH", 16)
    assert [da.planned_dot(b) for b in (1, 15, 16, 64)] == [False, False, True, True]
    with da.override_plan(dot=False):
        assert da.planned_dot(64) is False and da.planned_dot(64, dot=True) is True
    with da.override_plan(dot=True):
        assert da.planned_dot(1) is True
    with pytest.raises(KernelError, match="dot must be"):
        with da.override_plan(dot="yes"):
            pass
    args = make_inputs(2, 48, 4, 2, 32, 37, seed=1)
    fn = lambda dot: lambda *a: decode_attention_pallas(*a, num_heads=4, num_kv_heads=2, block=16, interpret=True,
                                                        dot=dot)
    # the traced kernels differ (the dot form holds dot_general ops), so the flag reaches the kernel
    assert "dot_general" in str(jax.make_jaxpr(fn(True))(*args))
    assert "dot_general" not in str(jax.make_jaxpr(fn(False))(*args))
    small = make_inputs(2, 48, 4, 2, 16, 37, seed=1)  # head 16: half a head is below a dot's smallest K
    with pytest.raises(KernelError, match="head_dim >= 32"):
        jax.make_jaxpr(fn(True))(*small)
    with da.override_plan(dot=True):  # planned, not asked for: the elementwise form
        assert "dot_general" not in str(jax.make_jaxpr(fn(None))(*small))


def test_unfused_merge_by_the_merge_kernel_interpret():
    """override_plan(merge="kernel"): the split kernel's partials merged by merge_partials_pallas, same result."""
    args = make_inputs(3, 64, 9, 3, 32, 40, pad=[0, 5, 17], seed=3)
    with fresh_plan(merge="kernel"):
        fn = lambda *a: decode_attention_pallas(*a, num_heads=9, num_kv_heads=3, splits=4, block=16, interpret=True)
        assert str(jax.make_jaxpr(fn)(*args)).count("pallas_call") == 2  # attention, then the merge kernel
        assert_equal_to_reference(args, 9, 3, splits=4, block=16)
    with pytest.raises(KernelError, match="merge must be"):
        with da.override_plan(merge="combine"):
            pass


def test_kernel_bf16_interpret():
    args = make_inputs(2, 32, 4, 2, 16, 20, dtype=jnp.bfloat16, pad=[3, 0])
    assert_equal_to_reference(args, 4, 2, tol=1e-2, block=16)


def test_dispatch_cpu_uses_reference_and_bad_args_raise(monkeypatch):
    args = make_inputs(1, 32, 4, 2, 16, 5)
    kw = dict(num_heads=4, num_kv_heads=2)
    assert decode_attention_choice(*args[:5], args[6], **kw) == "reference_xla"
    out = decode_attention(*args, **kw)
    assert dispatch.last_choice("decode_attention") == "reference_xla"
    monkeypatch.delitem(dispatch._last, "no_such_op", raising=False)
    assert dispatch.last_choices("decode_attention", "no_such_op") == {"decode_attention": "reference_xla",
                                                                       "no_such_op": None}
    want = decode_attention_reference(*args, **kw)
    np.testing.assert_allclose(out[0], want[0])
    with pytest.raises(KernelError, match="qkv"):
        decode_attention_choice(args[0][:, :-1], *args[1:5], args[6], **kw)
    with pytest.raises(KernelError, match="num_kv_heads"):
        decode_attention_choice(*args[:5], args[6], num_heads=4, num_kv_heads=3)


def assert_partials_equal(args, h, kv, *, block, splits, window=0, tol=1e-5, interpret=True, dot=None):
    kw = dict(num_heads=h, num_kv_heads=kv, window=window, block=block, splits=splits)
    fn = lambda *a: decode_attention_partials_pallas(*a, interpret=interpret, dot=dot, **kw)
    assert "pallas_call" in str(jax.make_jaxpr(fn)(*args))
    got = jax.jit(fn)(*args)
    want = jax.jit(functools.partial(decode_attention_partials_reference, **kw))(*args)  # one program, as above
    for g, w, name in zip(got, want, ("o_part", "m", "l", "k_cache", "v_cache")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
    o, m, l = (np.asarray(a, np.float64) for a in got[:3])
    wo, wm, wl = (np.asarray(a, np.float64) for a in want[:3])
    empty = wm < -1e29  # splits that saw no valid slot: m stays NEG_INF, l and o zero
    np.testing.assert_array_equal(m < -1e29, empty)
    assert np.abs(m[~empty] - wm[~empty]).max() < tol * 10
    assert rel(l, wl) < tol and rel(o, wo) < tol and rel(got[3], want[3]) < tol and rel(got[4], want[4]) < tol
    # merged, they are the attention output
    ref = decode_attention_reference(*args, num_heads=h, num_kv_heads=kv, window=window)[0]
    assert rel(merge_partials(*got[:3], args[0].dtype), ref) < max(tol, 1e-5)


@pytest.mark.parametrize("b,slots,h,kv,d,index,window,block,splits", [
    (1, 64, 4, 2, 16, 37, 0, 16, 4),     # 3 filled blocks in 4 splits: one each, the last idle
    (2, 96, 6, 2, 16, 20, 0, 16, 4),     # 2 filled blocks: splits 2, 3 see nothing yet (m = NEG_INF)
    (3, 64, 9, 3, 16, 47, 48, 16, 2),    # static window, g = 3, uneven split (3 blocks in 2)
    (2, 128, 4, 4, 16, 127, 0, 32, 4),   # MHA, last slot
])
def test_partials_kernel_equals_reference_interpret(b, slots, h, kv, d, index, window, block, splits):
    args = make_inputs(b, slots, h, kv, d, index, pad=[0, 5, 17][:b], seed=index)
    assert_partials_equal(args, h, kv, block=block, splits=splits, window=window)


def test_window_shares_kernel_equals_reference_interpret():
    """SHARES = "window" (the splits share the window's blocks, statically): kernel and reference split alike —
    here differently from the default (2 filled blocks of 6: one split holds both, the other three idle)."""
    args = make_inputs(2, 96, 6, 2, 16, 20, pad=[0, 5], seed=20)
    with fresh_plan(shares="window"):
        assert_partials_equal(args, 6, 2, block=16, splits=4)
        window = decode_attention_partials_reference(*args, num_heads=6, num_kv_heads=2, block=16, splits=4)
    fill = decode_attention_partials_reference(*args, num_heads=6, num_kv_heads=2, block=16, splits=4)
    assert (np.asarray(window[2])[:, 1] == 0).all() and (np.asarray(fill[2])[:, 1] > 0).all()  # l of split 1


def test_splits_share_the_filled_blocks():
    """Each split takes ceil(filled / splits) consecutive blocks of those up to the newest slot, so the longest
    chain a program runs shrinks with the splits at every fill, not only once the window is full."""
    ids = np.asarray(da.split_of_slots(jnp.int32(20), 96, 96, 16, 4))  # 2 filled blocks of 6
    np.testing.assert_array_equal(ids[:32], [0] * 16 + [1] * 16)
    assert (ids[32:] >= 2).all()  # past the newest slot: not valid, whatever their id
    for index in range(96):
        filled = index // 16 + 1
        for splits in (1, 2, 4, 6):
            ids = np.asarray(da.split_of_slots(jnp.int32(index), 96, 96, 16, splits))[: filled * 16]
            assert (ids < splits).all() and (np.diff(ids) >= 0).all()  # consecutive shares
            blocks = np.bincount(ids, minlength=splits) // 16
            assert blocks.sum() == filled and blocks.max() == -(-filled // splits)
    # an index past the cache is clamped as the write clamps it: every block filled
    assert np.asarray(da.split_of_slots(jnp.int32(500), 64, 64, 16, 2)).tolist() == [0] * 32 + [1] * 32
    # the window's shares (SHARES = "window"): 2 blocks a split whatever the fill
    assert np.asarray(da.split_of_slots(jnp.int32(20), 96, 96, 16, 3, fill=False)).tolist() == \
        [0] * 32 + [1] * 32 + [2] * 32
    with pytest.raises(KernelError, match="shares must be"):
        with da.override_plan(shares="even"):
            pass


@pytest.mark.parametrize("b,slots,h,kv,d,index,block,splits", [
    (1, 64, 4, 2, 16, 37, 16, 4),
    (2, 96, 6, 2, 16, 20, 16, 4),  # splits that saw nothing (m = NEG_INF) add nothing
])
def test_merge_kernel_equals_merge_partials_interpret(b, slots, h, kv, d, index, block, splits):
    args = make_inputs(b, slots, h, kv, d, index, pad=[0, 5][:b], seed=index)
    o_part, m, l = decode_attention_partials_reference(*args, num_heads=h, num_kv_heads=kv, block=block,
                                                       splits=splits)[:3]
    assert has_pallas_call(functools.partial(merge_partials_pallas, dtype=jnp.float32, interpret=True), o_part, m, l)
    got = merge_partials_pallas(o_part, m, l, jnp.float32, interpret=True)
    want = merge_partials(o_part, m, l, jnp.float32)
    assert got.shape == want.shape == (b, h * d) and got.dtype == want.dtype
    assert rel(got, want) < 1e-6
    with pytest.raises(KernelError, match="powers of two"):
        merge_partials_pallas(o_part[:, :3], m[:, :3], l[:, :3], jnp.float32, interpret=True)



def test_merge_splits_dispatch(monkeypatch):
    """The merge dispatcher: the reference on a CPU, the kernel in interpret mode; the choice recorded."""
    args = make_inputs(1, 64, 4, 2, 16, 37)
    parts = decode_attention_partials_reference(*args, num_heads=4, num_kv_heads=2, block=16, splits=4)[:3]
    want = merge_partials(*parts, jnp.float32)
    monkeypatch.delenv(dispatch.INTERPRET_ENV, raising=False)
    np.testing.assert_array_equal(da.merge_splits(*parts, jnp.float32), want)
    assert dispatch.last_choice("decode_attention_merge") == "reference_xla"
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    assert rel(da.merge_splits(*parts, jnp.float32), want) < 1e-6
    assert dispatch.last_choice("decode_attention_merge") == "pallas_triton"
    dispatch.forget_choices("decode_attention_merge", "not_an_op")  # a run that reports only its own traces
    assert dispatch.last_choices("decode_attention_merge") == {"decode_attention_merge": None}


def test_override_plan_sets_the_splits_for_a_while():
    base = plan(1, 3, 384, max_splits=16)
    with da.override_plan(splits=4):
        assert plan(1, 3, 384, max_splits=16) == (64, 4)  # 384 slots: 6 blocks of 64 in 4 splits
        assert plan(64, 3, 384) == (64, 4)  # also where `plan` alone would not split
        assert plan(1, 3, 384, max_splits=2)[1] == 2  # the consumer's cap still holds
    assert plan(1, 3, 384, max_splits=16) == base
    with pytest.raises(KernelError, match="power of two"):
        with da.override_plan(splits=3):
            pass


def test_override_plan_sets_the_block_and_warps_for_a_while(monkeypatch):
    monkeypatch.setattr(da, "DOT_MIN_BATCH", 0)  # the elementwise form's plan (2 splits at batch 64)
    assert [da.planned_warps(0, blk) for blk in (16, 32, 64, 128)] == [1, 2, 4, 4]  # a warp per 16 slots, <= 4
    assert da.planned_warps(2, 16) == 2
    with da.override_plan(block=64, warps=8):
        assert plan(1, 3, 384, max_splits=16) == (64, 4)  # planned 16 splits, but 384 slots hold 6 blocks of 64
        assert plan(64, 3, 256) == (64, 2)  # the planned 2 splits kept
        assert plan(1, 3, 96) == (32, 2)  # the largest block tiling 96 slots
        assert da.planned_warps(0, 16) == 8 and da.planned_warps(2, 16) == 2  # an explicit count still wins
    with da.override_plan(splits=1, block=128):
        assert plan(1, 3, 384, max_splits=16) == (128, 1)
    assert da.planned_warps(0, 16) == 1 and plan(64, 3, 256) == (128, 2)
    for bad in (dict(block=8), dict(block=48), dict(warps=3)):
        with pytest.raises(KernelError, match="power of two"):
            with da.override_plan(**bad):
                pass
    with da.override_plan(stages=3):
        assert da.planned_stages(1) == da.planned_stages(256) == 3
    assert da.planned_stages(1) == da.planned_stages(64) == 3 and da.planned_stages(65) == da.planned_stages(256) == 2
    assert da.by_batch(((4, 7), (8, 9)), 3) == 0 and da.by_batch(((4, 7), (8, 9)), 4) == 7
    assert da.by_batch(((4, 7), (8, 9)), 100) == 9
    with pytest.raises(KernelError, match="stages must be in 1..8"):
        with da.override_plan(stages=9):
            pass


def test_plan_fills_the_gpu_at_small_batch(monkeypatch):
    # 192 programs already: the tensor-core form (the default) unsplit in 32-slot blocks (DOT_BLOCK_BY_BATCH from
    # batch 64), the elementwise one in 2 splits of 128-slot blocks
    assert plan(64, 3, 256) == (32, 1) and plan(64, 3, 384) == (32, 1)
    assert [da.dot_block_cap(b) for b in (1, 15, 16, 63, 64, 256)] == [0, 0, 64, 64, 32, 32]
    with monkeypatch.context() as m:
        m.setattr(da, "DOT_MIN_BATCH", 0)
        assert plan(64, 3, 256) == (128, 2)
        assert plan(64, 3, 384) == (128, 2) and plan(64, 3, 384, max_splits=1) == (128, 1)
    with da.override_plan(dot=False):
        assert plan(64, 3, 256) == (128, 2)
    assert plan(44, 3, 4096) == (64, 2)  # 132 programs: the dot form splits up to 2·SMS programs ...
    with da.override_plan(dot=False):
        assert plan(44, 3, 4096) == (128, 4)  # ... the elementwise form up to 4·SMS
    # the form the kernel will run decides: heads under 32 wide run elementwise, so their plan splits as that form
    assert plan(64, 3, 256, dot=False) == (128, 2) and plan(64, 3, 256, dot=True) == (32, 1)
    assert da.uses_dot(64, 64) is True and da.uses_dot(64, 16) is False and da.uses_dot(64, 64, dot=False) is False
    with pytest.raises(KernelError, match="head_dim >= 32"):
        da.uses_dot(64, 16, dot=True)
    assert plan(256, 3, 4096) == (32, 1)  # 768 programs: unsplit, in 32-slot blocks
    with da.override_plan(dot=False):
        assert plan(256, 3, 4096) == (128, 1)
    # batch 16: 64-slot blocks, its 16 splits of 16 capped by the 4 blocks 256 slots hold; batch 8 unchanged
    assert plan(16, 3, 256) == (64, 4) and plan(16, 3, 256, dot=False) == (16, 16) and plan(8, 3, 256) == (16, 16)
    with da.override_plan(block=128):  # an override's block replaces the rule: the profile's `ab128`
        assert plan(64, 3, 384) == (128, 1)
    for b, window, cap in [(1, 384, 16), (1, 4352, 16), (4, 384, 16), (16, 4352, 4), (1, 64, 64)]:
        block, splits = plan(b, 3, window, max_splits=cap)
        assert window % block == 0 and block >= 16 and splits & (splits - 1) == 0
        assert 1 <= splits <= min(cap, window // block)
        assert block * splits <= window and block <= 128
        want = da.MAX_PROGRAMS // (b * 3)
        assert splits * 2 > min(cap, window // da.MIN_SPLIT_SLOTS, want)  # the largest power of two in the bounds
    assert plan(1, 3, 384, max_splits=16) == (16, 16)  # the H200's best at batch 1, short context: b16 s16
    assert plan(1, 3, 4096) == (64, 64)


def lowers_for_h100(fn, *avals) -> None:
    """Lowers `fn` for CUDA as an H100 would (Pallas -> Triton IR): raises what the Triton lowering rejects.
    Uses JAX internals to name the GPU; skips where they moved."""
    assert "xla.gpu.triton" in lower_for_h100(fn, *avals)


@pytest.mark.parametrize("b,slots", [(1, 384), (1, 4352), (64, 384)])
def test_kernels_lower_to_triton_at_smollm2_shapes(b, slots):
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    h, kv, d = 9, 3, 64
    avals = (S((b, (h + 2 * kv) * d), bf), S((b, slots, kv, d), bf), S((b, slots, kv, d), bf), S((b, d // 2), f32),
             S((b, d // 2), f32), S((), jnp.int32), S((b, slots), bool))
    block, splits = plan(b, kv, slots, max_splits=16)
    for dot in (False, True):  # the elementwise and the tensor-core form
        lowers_for_h100(functools.partial(decode_attention_pallas, num_heads=h, num_kv_heads=kv, dot=dot), *avals)
        lowers_for_h100(functools.partial(decode_attention_partials_pallas, num_heads=h, num_kv_heads=kv,
                                          block=block, splits=splits, dot=dot), *avals)
    if splits > 1:
        lowers_for_h100(functools.partial(merge_partials_pallas, dtype=bf), S((b, splits, h * d), f32),
                        S((b, splits, h), f32), S((b, splits, h), f32))
    with fresh_plan(newest="after"):  # the tensor-core form's new token after its loop (NEWEST_BY_BATCH)
        lowers_for_h100(functools.partial(decode_attention_partials_pallas, num_heads=h, num_kv_heads=kv,
                                          block=block, splits=splits, dot=True), *avals)
    with fresh_plan(heads=1):  # a program a query head (HEADS_BY_BATCH), both forms
        for dot in (False, True):
            lowers_for_h100(functools.partial(decode_attention_partials_pallas, num_heads=h, num_kv_heads=kv,
                                              block=block, splits=splits, dot=dot), *avals)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("b,slots,index,dtype", [
    (1, 384, 200, jnp.bfloat16), (64, 384, 300, jnp.bfloat16), (1, 4352, 4200, jnp.bfloat16),
    (4, 256, 130, jnp.float32),
])
def test_kernel_equals_reference_gpu(b, slots, index, dtype):
    args = make_inputs(b, slots, 9, 3, 64, index, dtype=dtype, pad=[0, 7, 100, 3] * (b // 4) or [11])
    assert_equal_to_reference(args, 9, 3, tol=1e-2 if dtype == jnp.bfloat16 else 1e-4, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("b,slots,index", [(1, 384, 200), (1, 4352, 4200), (4, 384, 60)])
def test_partials_kernel_equals_reference_gpu(b, slots, index):
    args = make_inputs(b, slots, 9, 3, 64, index, dtype=jnp.bfloat16, pad=[0, 7, 100, 3][:b])
    block, splits = plan(b, 3, slots, max_splits=16)
    assert splits > 1
    assert_partials_equal(args, 9, 3, block=block, splits=splits, tol=1e-2, interpret=False)
    o_part, m, l = decode_attention_partials_pallas(*args, num_heads=9, num_kv_heads=3, block=block,
                                                    splits=splits)[:3]
    got = merge_partials_pallas(o_part, m, l, jnp.bfloat16)
    assert rel(got.astype(jnp.float32), merge_partials(o_part, m, l, jnp.bfloat16).astype(jnp.float32)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("b,slots,index,dtype", [
    (64, 384, 300, jnp.bfloat16), (1, 384, 200, jnp.bfloat16), (4, 256, 130, jnp.float32),
])
def test_dot_form_equals_reference_gpu(b, slots, index, dtype):
    """The tensor-core form compiled through Triton, merged and unmerged, at SmolLM2's head shapes."""
    args = make_inputs(b, slots, 9, 3, 64, index, dtype=dtype, pad=[0, 7, 100, 3] * (b // 4) or [11])
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
    assert_equal_to_reference(args, 9, 3, tol=tol, interpret=False, dot=True)
    block, splits = plan(b, 3, slots, max_splits=16)
    assert_partials_equal(args, 9, 3, block=block, splits=splits, tol=tol, interpret=False, dot=True)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("heads", [0, 1])
@pytest.mark.parametrize("newest", ["after", "block"])
@pytest.mark.parametrize("b,slots,index", [(64, 384, 300), (1, 384, 200), (16, 384, 256), (4, 384, 230)])
def test_dot_form_newest_equals_reference_gpu(newest, heads, b, slots, index):
    """The tensor-core form with either place of the new token (`override_plan(newest=)`), its KV head's whole group
    or one query head a program (`heads=`), compiled through Triton at SmolLM2's heads, merged and unmerged, in the
    blocks and splits the batch plans."""
    args = make_inputs(b, slots, 9, 3, 64, index, dtype=jnp.bfloat16, pad=[0, 7, 100, 3] * (b // 4) or [11])
    block, splits = plan(b, 3, slots, max_splits=16)
    with fresh_plan(newest=newest, heads=heads):
        assert_equal_to_reference(args, 9, 3, tol=1e-2, interpret=False, dot=True)
        assert_partials_equal(args, 9, 3, block=block, splits=splits, tol=1e-2, interpret=False, dot=True)


# ------------------------------------------------------------ q·k·v as split-K partials (`rows=`, inference.split_k)


def make_partial_inputs(b, slots, h, kv, d, index, *, width, parts, dtype=jnp.float32, seed=0, pad=None):
    """`make_inputs` with the q·k·v row replaced by its split-K partials of RMSNorm(rows) without the row scale:
    (args, rows, norm weight, wt)."""
    _, kc, vc, cos, sin, idx, valid = make_inputs(b, slots, h, kv, d, index, dtype=dtype, seed=seed, pad=pad)
    k = jax.random.split(jax.random.key(seed + 1), 3)
    rows = (3.0 * jax.random.normal(k[0], (b, width))).astype(dtype)
    g = (1.0 + 0.2 * jax.random.normal(k[1], (width,))).astype(dtype)
    wt = (jax.random.normal(k[2], ((h + 2 * kv) * d, width)) / np.sqrt(width)).astype(dtype)
    p = matmul_t_partials(weigh(rows, g), wt, parts)
    return (p, kc, vc, cos, sin, idx, valid), rows, g, wt


def assert_rows_form_equals_reference(args, rows, h, kv, *, eps=1e-5, tol=1e-5, interpret=True, splits=0,
                                      dot=None):
    """The kernel summing the partials and scaling by the rows' norm factor = the reference on
    `project_partials` (merged, and where split, unmerged)."""
    kw = dict(num_heads=h, num_kv_heads=kv)
    qkv = project_partials(args[0], rows, eps)
    want = decode_attention_reference(qkv, *args[1:], **kw)
    got = jax.jit(lambda *a: decode_attention_pallas(*a, interpret=interpret, rows=rows, eps=eps, splits=splits,
                                                     dot=dot, **kw))(*args)
    for g_, w_, name in zip(got, want, ("out", "k_cache", "v_cache")):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype, name
        assert rel(g_, w_) < tol, (name, rel(g_, w_))
    if splits > 1:
        block = 16
        got_p = decode_attention_partials_pallas(*args, block=block, splits=splits, interpret=interpret, rows=rows,
                                                 eps=eps, dot=dot, **kw)
        want_p = decode_attention_partials_reference(*args, block=block, splits=splits, rows=rows, eps=eps, **kw)
        for g_, w_ in zip(got_p, want_p):
            assert rel(g_, w_) < tol, rel(g_, w_)


@pytest.mark.parametrize("dtype,parts,splits,dot", [
    (jnp.float32, 4, 1, False), (jnp.float32, 3, 2, True), (jnp.bfloat16, 2, 1, True), (jnp.float32, 1, 1, True),
])
def test_rows_form_equals_reference_interpret(dtype, parts, splits, dot):
    args, rows, _, _ = make_partial_inputs(4, 64, 4, 2, 32, 40, width=96, parts=parts, dtype=dtype,
                                           pad=[0, 7, 20, 3])
    assert_rows_form_equals_reference(args, rows, 4, 2, tol=2e-2 if dtype == jnp.bfloat16 else 1e-5,
                                      splits=splits, dot=dot)


def test_rows_form_is_the_norm_then_projection():
    """project_partials(partials of weigh(x, g) @ W) is RMSNorm(x) @ W (fp32), and the dispatcher on the CPU takes
    that path to the reference."""
    from pallas_kernels.fused_decode import norm_matmul_reference

    args, rows, g, wt = make_partial_inputs(3, 64, 4, 2, 32, 30, width=96, parts=4)
    np.testing.assert_allclose(project_partials(args[0], rows, 1e-5), norm_matmul_reference(rows, g, wt, eps=1e-5),
                               rtol=1e-5, atol=1e-5)
    got = decode_attention(*args, num_heads=4, num_kv_heads=2, rows=rows, eps=1e-5)
    want = decode_attention_reference(norm_matmul_reference(rows, g, wt, eps=1e-5), *args[1:], num_heads=4,
                                      num_kv_heads=2)
    for g_, w_ in zip(got, want):
        assert rel(g_, w_) < 1e-5


def test_rows_form_bad_shapes_raise():
    args, rows, _, _ = make_partial_inputs(2, 64, 4, 2, 32, 30, width=96, parts=2)
    kw = dict(num_heads=4, num_kv_heads=2)
    with pytest.raises(KernelError, match="rows must be"):
        decode_attention(*args, rows=rows[:1], eps=1e-5, **kw)
    with pytest.raises(KernelError, match="split-K partials"):
        decode_attention(args[0][0], *args[1:], rows=rows, eps=1e-5, **kw)  # a projection, not partials
    with pytest.raises(KernelError, match="width"):
        decode_attention_pallas(*args, rows=jnp.zeros((2, 90)), eps=1e-5, interpret=True, **kw)


def test_rows_form_lowers_to_triton_at_smollm2_shape():
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    h, kv, d, b, slots = 9, 3, 64, 64, 384
    avals = (S((4, b, (h + 2 * kv) * d), f32), S((b, slots, kv, d), bf), S((b, slots, kv, d), bf), S((b, d // 2), f32),
             S((b, d // 2), f32), S((), jnp.int32), S((b, slots), bool), S((b, 576), bf))
    fn = lambda *a: decode_attention_pallas(*a[:7], num_heads=h, num_kv_heads=kv, rows=a[7], eps=1e-5)
    lowers_for_h100(fn, *avals)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu(), reason="needs a GPU (the device)")
@pytest.mark.parametrize("b,index,parts,splits", [(64, 300, 4, 0), (16, 200, 4, 0), (4, 60, 2, 2)])
def test_rows_form_equals_reference_gpu(b, index, parts, splits):
    """SmolLM2's shapes (hidden 576, 9 / 3 heads of 64), bf16, compiled: the split-K form of issue 3's batch 64."""
    args, rows, _, _ = make_partial_inputs(b, 384, 9, 3, 64, index, width=576, parts=parts, dtype=jnp.bfloat16,
                                           pad=[0, 7, 100, 3] * (b // 4))
    assert_rows_form_equals_reference(args, rows, 9, 3, tol=1e-2, interpret=False, splits=splits)
