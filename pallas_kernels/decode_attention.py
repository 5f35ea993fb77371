"""One decode step of attention in one Pallas launch: RoPE on q/k, the K/V cache write, GQA over the valid slots.

Same signature and result as `mamba_llama_jax.ops.attention.decode_attention_reference` (see there for shapes),
plus `interpret`, `block` and `splits`. Why one kernel: at decode the step is launch-bound (~2 µs per XLA kernel,
~10 kernels per layer for rope, the two cache updates, scores, softmax and values); this does it in one.

Layout: grid (batch, kv_heads, splits). A program owns one KV head of one row and one share of the sequence: it
rotates that head's k, writes k/v into the cache (split 0 only; the caches are aliased in/out, so nothing else is
copied), and runs an online softmax over its share of the filled blocks for the g = h/kv query heads that share the
head — each K/V block is read once for all g heads. (Up to batch 4, HEADS_BY_BATCH splits each group over g programs,
one query head each, the grid's second axis kv_heads · g: more programs for the latency-bound loop, each block then
read g times.) The number of filled blocks is dynamic (`index // block + 1`,
bounded by the static window), so one compiled step serves every cache fill, and the splits share those blocks
(`split_of_slots`), not the window: a decode step's cache is filled from the prompt's end to the window's, and a
static share left the later splits idle while the first carried the whole chain. The new token's k/v enter the
softmax from registers (substituted into the block holding slot `index`, or, in the tensor-core form from batch 16,
added after the block loop by the split holding it: NEWEST_BY_BATCH), so no program depends on another's store.

Splits (`plan`): at small batch b·kv programs would leave most SMs idle with long serial chains (3 programs at
batch 1 for SmolLM2: measured no faster than XLA), so the sequence is split into short pieces.
Each split writes an unnormalised partial (output, running max, running sum); `decode_attention_partials` hands
them to the decode step, which merges them with `merge_partials_pallas` (one small launch, a program per row and
head) before the o-projection (or, `fused_decode.merge_mode`, in the o-projection's prologue: no launch, but
every program of it repeats the merge — measured slower); `decode_attention` merges them itself with a small XLA
epilogue.

Warps (`planned_warps`): one per 16 slots of a block, 1 to 4 — a 16-slot block is one warp's worth of work.

The q·k·v row may come as XLA's split-K partials instead (`rows=`: the partials of RMSNorm(rows) without its row
scale, `mamba_llama_jax.ops.partials`): every program sums its heads' partials and computes the row's RMSNorm
factor from `rows` in its prologue, which saves the decode step the norm's launch and the GEMM's reduction
(`mamba_llama_jax.inference.split_k`).

Two ways to compute a block (`planned_dot`): elementwise on the CUDA cores (the g heads one by one: products summed
across the head dimension for the scores, across the block's slots for the values), or tensor-core dots (the
default, measured faster in the whole decode loop: `DOT_MIN_BATCH`): the g heads stacked as the rows of a (G, d)
tile (G = 16, a dot's smallest M; the rows past g are zero), scores = q·Kᵀ (G, block) and values = p·V (G, d), the
online softmax per row. Why: at batch 64 the elementwise kernel took 14 µs a layer for ~0.4 MB of K/V a program
(~0.9 TB/s, decode_attn_b64.md) and slowed down with fewer warps (2 warps: 26 µs), the sign of a compute-bound
loop; the dots do that work in a few MMA instructions. With bf16 (fp16) caches p enters p·V as two bf16 (fp16)
dots, p's rounding and its remainder, so p is carried to ~16 bits, not 8 (the reference multiplies fp32 p with the
values); fp32 caches use fp32 dots at full precision.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba_llama_jax.errors import KernelError
from mamba_llama_jax.ops.attention import NEG_INF, decode_attention_reference, rope_and_write
from mamba_llama_jax.ops.partials import project_partials
from pallas_kernels import dispatch
from pallas_kernels.dispatch import is_pow2, pow2_at_least, pow2_at_most, pow2_dividing
from pallas_kernels.triton_call import triton_call

F32 = jnp.float32
PALLAS_TRITON = dispatch.PALLAS_TRITON
REFERENCE = "reference_xla"
SMS = 132  # H100 / H200 SXM streaming multiprocessors
MIN_SPLIT_SLOTS = 16  # the shortest sequence piece `plan` gives a program
MAX_PROGRAMS = 8 * SMS  # `plan` stops splitting here
# The longest K/V block a program loads at once. A cache of a multiple of MAX_BLOCK slots gets whole blocks of it;
# others get the largest power of two dividing their slots, down to 16 (the speculative loop's 208-slot caches:
# up to 13 serial blocks of 16 a program, where 128 gives 2), so callers that choose the length round it to this.
MAX_BLOCK = 128


def pick_block(slots: int, cap: int = MAX_BLOCK) -> int:
    """The largest power of two <= cap dividing `slots` (blocks must tile the cache exactly)."""
    return pow2_dividing(slots, cap)


# `override_plan` sets the split count, block, warps, merge, dot form and pipeline stages for a while (the
# decode-step benchmark's variants); 0 / "" / None = `plan` / `planned_warps` / the default / `planned_dot` /
# STAGES_BY_BATCH decides.
_PLAN_OVERRIDE: dict[str, Any] = {"splits": 0, "block": 0, "warps": 0, "merge": "", "dot": None, "stages": 0,
                                  "shares": "", "newest": "", "heads": 0}
# Software-pipeline depth of the K/V block loop (Triton's num_stages) by batch (`by_batch`): 3 up to batch 64, 2
# above. At batch 64 over 3-4 blocks the kernel is latency-bound: under Nsight Compute it read its K/V at
# ~1 TB/s with 9 % occupancy, its warps mostly waiting on global loads (benchmarks/results/ncu_attention_b64.md), so
# more loads in flight a program is the lever. Measured in the H100's decode loop, one process each
# (benchmarks/results/decode_profile_s24_b64.md, _b16.md, _b256.md, _rule.md, generate_s24_as2.md), 3 stages vs 2:
# batch 64 the kernel 0.300 vs 0.327 ms a step, the step 0.846-0.857 vs 0.873-0.884 (profile, unprofiled) and 0.883
# vs 0.930 ms (bench_generate); batches 16 and 1 within noise (0.683 vs 0.682-0.684; 0.465 vs 0.469-0.474); batch
# 256, with 768 programs to hide the latency, lost (the kernel 0.881 vs 0.838 ms a step, the step 1.889 vs 1.842).
# 4 stages lost at 64 (0.881, decode_profile_s24_b64_stages.md); the kernel alone under ncu at 3 stages:
# ncu_attention_b64_s24.md (11.9 µs against 12.7 at 2, long-scoreboard stalls 1.3 against 2.5 an issue).
STAGES_BY_BATCH = ((1, 3), (65, 2))
# (Reading the next block ahead in the tensor-core loop — its padding mask, or its K/V tiles too — was measured and
# removed: slower in the H100's decode loop at level 2 (the kernel +1.3 µs a layer at batch 64;
# benchmarks/results/decode_profile_s20_vp_gu.md), no faster at 1 (0.853 vs 0.846-0.847 ms a step at batch 64;
# decode_profile_s24_b64_stages.md). Triton's pipeliner (STAGES_BY_BATCH) does it.)
# What the splits share (`planned_shares`, `split_of_slots`): "fill" the filled blocks (up to the newest slot, at run
# time), or "window" the window's blocks, statically, as up to session 22 (then at a part-filled cache the splits
# past the fill sat idle and the first ones ran the whole chain). "fill" never gives a program a longer chain. In the
# H100's decode loop (prompt 128 + 256 new tokens, one process each; benchmarks/results/decode_profile_s24_b64.md,
# _b16.md, the profile's `sw` variant) the two are within noise, unprofiled ms a step: batch 64 0.882-0.884 fill vs
# 0.877 window (unsplit there: both the same work), 16 0.682-0.684 vs 0.688, 1 0.479-0.489 vs 0.479. Both pass the
# GPU tests (test-gpu-s24.xml, fill); "fill" stays for long caches filled part-way, where it shortens the chains.
SHARES = "fill"
# Where the tensor-core form takes the new token's key by batch (`planned_newest`, `by_batch`): "block" substitutes
# its k/v into the loaded block that holds its slot (a select on every loaded tile), "after" leaves that slot out of
# the loop, whose loaded tiles then go straight into the dots, and adds the token after it from registers (as
# verify_attention adds its chunk). Measured in the H100's decode loop, one process each, unprofiled ms a step
# (benchmarks/results/decode_profile_s26_b64.md, _rest.md): batch 64 0.815 vs 0.835-0.843 (the kernel 0.258 vs 0.283
# ms a step), 256 1.652 vs 1.686-1.690 (0.623 vs 0.643), 16 0.680 vs 0.682-0.687 (0.166 vs 0.170), but batch 1, its
# chains one or two 16-slot blocks long, 0.496 vs 0.479-0.486 (0.159 vs 0.150): there the tail costs more than the
# selects. Both pass the GPU tests (test-gpu-s26-options.xml). (p entering p·V as one rounded part instead of two
# was measured with it and removed: no faster with "after", 0.819 vs 0.815 at 64, decode_profile_s26_b64.md `apv1`.)
NEWEST_BY_BATCH = ((1, "block"), (16, "after"))
# Query heads a program attends for, by batch (`planned_heads`): 0 = its KV head's whole group (g = h / kv), one
# program per KV head, which loads each K/V block once for all g; a divisor of g splits the group over g / heads
# programs, which load the same blocks (the later ones mostly from L2). Only the first program of a group writes the
# new token's K/V; the others take it from registers (both `newest` forms do already). The idea: the kernel is
# latency-bound (at batch 64, 192 programs on 132 SMs at 9 % occupancy: benchmarks/results/ncu_attention_b64.md),
# and one head a program triples the programs with no merge to pay, as more splits would. Measured on the H100 in
# the decode loop at SmolLM2's heads (benchmarks/results/decode_profile_s32_heads*.md, generate_s32_heads.md): at
# batch 1 the kernel 3.59 -> 3.25 µs a layer and the step 0.465-0.468 -> 0.454 ms (the 50 % hybrid's step 0.579 ->
# 0.570), at 4 the kernel 3.69 -> 3.43 µs; at 16 it is 5.5 -> 7.8 µs and at 64 8.6 -> 11.4 µs (three programs
# reading each block cost more than the occupancy gains). So one head a program up to batch 4 (2 and 3 between
# measured wins), the whole group from 5: at 8 one head a program is 4.3 -> 4.6 µs a layer and at 12 4.8 -> 6.1, the
# step 0.759-0.770 vs 0.776-0.777 ms and 0.792-0.797 vs 0.832-0.846 (decode_profile_s33_heads_b8.md; 5-7 not
# measured).
HEADS_BY_BATCH = ((1, 1), (5, 0))

# The tensor-core form (`planned_dot`) serves batches >= DOT_MIN_BATCH (0 = never): every batch. Measured on H100s
# in the whole decode loop, each form in its own process (benchmarks/results/generate_s17a.md, generate_s17b.md,
# generate_s16.md), dot vs elementwise: 0.486-0.494 vs 0.507-0.510 ms a step at batch 1, 1.059-1.068 vs 1.136-1.153
# at 64; in one process the two are closer at 64 (1.046 vs 1.057, decode_profile_s17_b64.md: the kernel itself
# 0.306 vs 0.308 ms a step). `override_plan(dot=False)`, the profile's `aew` variant, turns it off.
DOT_MIN_BATCH = 1
DOT_ROWS = 16  # rows of the q tile: the g heads of a group, padded to a tensor-core dot's smallest M
DOT_MIN_K = 16  # a tensor-core dot's smallest contraction (Triton's tl.dot)
# The tensor-core form's most slots a block by batch (`dot_block_cap`): (least batch, slots), the last entry a batch
# reaches applies, in place of `plan`'s 128-slot blocks (batch 64, 256) or 16-slot splits (batch 16). Measured in the
# H100's decode loop, SmolLM2's shape, each pair in one process, unprofiled ms a step: 64-slot blocks at batch 64
# 0.886 / 0.882 → 0.873 / 0.870 (the kernel 0.336 → 0.325 ms a step) and at 16 0.733 / 0.732 → 0.691 / 0.691 (4
# splits of 64 slots instead of 16 of 16: the kernel 0.152 → 0.177 ms, but 60 launches a step fewer, the merge's;
# benchmarks/results/decode_profile_s22_attn_block*.md); 32-slot blocks from batch 64 (decode_profile_s24_ab32.md,
# _b64_blocks.md): batch 64 0.845 → 0.829 (0.850-0.853 → 0.832; the kernel 0.303 → 0.287), 256 1.860-1.864 →
# 1.700 (the kernel 0.838 → 0.663), but batch 16 0.688-0.691 → 0.714-0.719 (8 splits: a merge launch a layer more).
# Batch 1 keeps its measured 16-slot splits. Confirmed in session 25 (decode_profile_s25_blocks.md, _b16.md): 64
# 0.839-0.844 against 16 / 64 slots 0.904 / 0.858, 256 1.661-1.663 against 1.770 / 1.762, 16 0.684-0.686 against
# 32 slots in 4 / 2 splits 0.692 / 0.709; the `-m gpu` tests passed at these blocks (test-gpu-s25.xml).
DOT_BLOCK_BY_BATCH = ((16, 64), (64, 32))


def by_batch(table: tuple[tuple[int, int], ...], batch: int) -> int:
    """A tiling rule by batch: of `table`'s (least batch, value) entries, in increasing batch, the value of the last
    one `batch` reaches; 0 below the first."""
    value = 0
    for least, v in table:
        if batch >= least:
            value = v
    return value


def dot_block_cap(batch: int) -> int:
    """The tensor-core form's most slots a block at this batch (DOT_BLOCK_BY_BATCH), 0 where `plan` decides alone."""
    return by_batch(DOT_BLOCK_BY_BATCH, batch)


@contextlib.contextmanager
def override_plan(*, splits: int = 0, block: int = 0, warps: int = 0, merge: str = "",
                  dot: bool | None = None, stages: int = 0, shares: str = "", newest: str = "",
                  heads: int = 0) -> Iterator[None]:
    """Within the block, `plan` returns `splits` splits (a power of two; capped by the window and `max_splits`)
    of `block`-slot blocks (a power of two >= 16; capped by the largest block tiling the window), the kernel
    runs `warps` warps a program and `stages` pipeline stages (`STAGES_BY_BATCH`), `decode_attention_pallas` merges its
    splits with `merge` ("xla": `merge_partials`, the default; "kernel": `merge_partials_pallas`), `dot` picks the
    tensor-core form (True) or the elementwise one (False), `shares` what the splits share ("fill" / "window",
    `SHARES`), `newest` where the tensor-core form takes the new token ("block" / "after", NEWEST_BY_BATCH) and
    `heads` the query heads a program attends for (HEADS_BY_BATCH), for steps traced anew. Clear jax's caches
    (`jax.clear_caches`) so that nothing traced before is reused."""
    for name, v, least in (("splits", splits, 1), ("block", block, 16), ("warps", warps, 1)):
        if v and (v < least or v & (v - 1)):
            raise KernelError(f"decode_attention: override_plan {name} must be a power of two >= {least} (or 0), "
                              f"got {v}")
    if merge not in ("", "xla", "kernel"):
        raise KernelError(f"decode_attention: override_plan merge must be 'xla' or 'kernel', got {merge!r}")
    if dot not in (None, True, False):
        raise KernelError(f"decode_attention: override_plan dot must be True, False or None, got {dot!r}")
    if not 0 <= stages <= 8:
        raise KernelError(f"decode_attention: override_plan stages must be in 1..8 (or 0), got {stages}")
    if shares not in ("", "fill", "window"):
        raise KernelError(f"decode_attention: override_plan shares must be 'fill' or 'window', got {shares!r}")
    if newest not in ("", "block", "after"):
        raise KernelError(f"decode_attention: override_plan newest must be 'block' or 'after', got {newest!r}")
    if not isinstance(heads, int) or heads < 0:
        raise KernelError(f"decode_attention: override_plan heads must be an int >= 1 (or 0), got {heads!r}")
    old = dict(_PLAN_OVERRIDE)
    _PLAN_OVERRIDE.update(splits=splits, block=block, warps=warps, merge=merge, dot=dot, stages=stages,
                          shares=shares, newest=newest, heads=heads)
    try:
        yield
    finally:
        _PLAN_OVERRIDE.update(old)


def planned_warps(num_warps: int = 0, block: int = 128) -> int:
    """`num_warps` if given, else the override's (`override_plan`), else one warp per 16 slots of a block, 1 to 4.

    A program's work is one block of block × head_dim K and V per step of its loop: a 16-slot block is a single
    warp's worth. Measured on the H200 in the whole batch-1 decode loop (prompt 128 + 256 new tokens,
    benchmarks/results/decode_attn_b1.md): 16-slot blocks took 5.1 µs a layer with 1 warp vs 5.5 with 4 (2 and
    8: 6.1 / 5.8), 32-slot blocks 6.3 with 2 warps vs 6.8 with 4; at batch 64 (128-slot blocks,
    decode_attn_b64.md) 4 warps beat 2 and 8 (14.0 vs 25.9 / 21.3 µs)."""
    return num_warps or _PLAN_OVERRIDE["warps"] or max(1, min(4, block // 16))


def planned_stages(batch: int) -> int:
    """Pipeline stages of the K/V block loop at this batch: the override's (`override_plan`), else
    STAGES_BY_BATCH's."""
    return _PLAN_OVERRIDE["stages"] or by_batch(STAGES_BY_BATCH, batch)


def planned_shares() -> str:
    """What the splits share, "fill" or "window" (see SHARES): the override's (`override_plan`), else SHARES."""
    return _PLAN_OVERRIDE["shares"] or SHARES


def planned_newest(batch: int) -> str:
    """Where the tensor-core form takes the new token at this batch, "block" / "after": the override's
    (`override_plan`), else NEWEST_BY_BATCH's."""
    return _PLAN_OVERRIDE["newest"] or by_batch(NEWEST_BY_BATCH, batch)


def planned_heads(group: int, batch: int) -> int:
    """The query heads a program attends for at this batch, of a KV head's `group` (see HEADS_BY_BATCH): the
    override's (`override_plan`), else HEADS_BY_BATCH's, where it divides the group; else the whole group."""
    want = _PLAN_OVERRIDE["heads"] or by_batch(HEADS_BY_BATCH, batch)
    return want if want and group % want == 0 else group


def planned_dot(batch: int, dot: bool | None = None) -> bool:
    """Whether a step at this batch computes its blocks with tensor-core dots: `dot` if given, else the
    override's (`override_plan`), else batch >= DOT_MIN_BATCH (> 0). Heads smaller than 2·DOT_MIN_K never do
    (a planned dot form falls back; an explicit dot=True is an error)."""
    if dot is not None:
        return dot
    if _PLAN_OVERRIDE["dot"] is not None:
        return _PLAN_OVERRIDE["dot"]
    return 0 < DOT_MIN_BATCH <= batch


def uses_dot(batch: int, head_dim: int, dot: bool | None = None) -> bool:
    """The form the kernel runs: `planned_dot`, except that heads smaller than 2·DOT_MIN_K take the elementwise
    form (q·Kᵀ contracts over half a head, the two RoPE halves) — an error where dot=True was asked for."""
    use = planned_dot(batch, dot)
    if use and head_dim < 2 * DOT_MIN_K:
        if dot:
            raise KernelError(f"decode_attention: the dot form needs head_dim >= {2 * DOT_MIN_K}, got {head_dim}")
        use = False
    return use


def plan(batch: int, kv: int, window: int, *, max_splits: int = 64, dot: bool | None = None) -> tuple[int, int]:
    """(block, splits) for one decode step over a `window`-slot cache.

    With batch·kv programs covering the SMs: 128-slot blocks, split in pieces of at least one block up to about
    4·SMS programs for the elementwise form (batch 64 over 256 slots: 2 splits, 384 programs; measured on the H200,
    benchmarks/results/decode_variants_b64.md: 9.7 vs 14.1 µs a layer unsplit, the step 1.04 vs 1.14 ms with the XLA
    merge), 2·SMS for the tensor-core form (`dot`; None: `planned_dot`, and the kernel's callers pass `uses_dot`,
    the form it will run), which runs as fast unsplit and so saves the merge's launch (batch 64: 1 split; on the
    H100, decode_profile_s17_b64.md: the kernel 0.309 vs 0.306 ms a step, the step 1.005 vs 1.046 ms, 315 kernels
    instead of 345). Below that the sequence is split as finely as pieces of MIN_SPLIT_SLOTS slots allow, up to
    about MAX_PROGRAMS programs, in blocks of the split's length (16-128 slots). Measured on the H200
    (benchmarks/results/decode_attention.md, 2026-12-04), the best tilings were b16 s16 at batch 1 and 8 over 256
    slots, b64 s64 at batch 1 over 4096 slots, b128 s32 at batch 8 over 4096: short serial chains and many programs
    win. Splits are a power of two (the fused combine reads them as one tensor) and at most `max_splits` (what the
    consumer merges cheaply). The tensor-core form from batch 16 takes blocks of at most `dot_block_cap` slots, its
    splits then capped by the blocks the window holds (measured there: see DOT_BLOCK_BY_BATCH); an override's
    block or splits (`override_plan`) replaces that rule.
    """
    if forced := _PLAN_OVERRIDE["splits"]:
        splits = pow2_at_most(max(1, min(forced, window // MIN_SPLIT_SLOTS, max_splits)))
        block = pick_block(window, min(MAX_BLOCK, max(MIN_SPLIT_SLOTS, window // splits)))
    elif batch * kv >= SMS:
        block = pick_block(window)
        programs = (2 if planned_dot(batch, dot) else 4) * SMS
        splits = pow2_at_most(max(1, min(max_splits, window // block, programs // (batch * kv))))
    else:
        splits = pow2_at_most(max(1, min(window // MIN_SPLIT_SLOTS, max_splits, MAX_PROGRAMS // (batch * kv))))
        block = pick_block(window, min(MAX_BLOCK, max(MIN_SPLIT_SLOTS, window // splits)))
    block_cap = _PLAN_OVERRIDE["block"]
    if not (block_cap or forced) and planned_dot(batch, dot):
        block_cap = dot_block_cap(batch)
    if block_cap:
        block = pick_block(window, block_cap)
        splits = pow2_at_most(max(1, min(splits, window // block)))
    return block, splits


def _kernel(qkv_ref, kc_ref, vc_ref, cos_ref, sin_ref, idx_ref, valid_ref, rows_ref,  # inputs
            o_ref, m_ref, l_ref, kco_ref, vco_ref,  # outputs (kco/vco alias kc/vc)
            *, h: int, kv: int, d: int, block: int, nblocks: int, splits: int, partials: bool, dtype: Any,
            dot: bool, parts: int, eps: float, newest: str, fill: bool = True, hp: int = 0):
    del kco_ref, vco_ref  # aliased: written through kc_ref/vc_ref's buffers below
    bi, si = pl.program_id(0), pl.program_id(2)
    g, half = h // kv, d // 2
    hp = hp or g  # query heads this program attends for (HEADS_BY_BATCH): the group's hp-wide part jq
    ki, jq = (pl.program_id(1), 0) if hp == g else (pl.program_id(1) // (g // hp), pl.program_id(1) % (g // hp))
    head0 = ki * g + jq * hp
    # clamped as the reference's dynamic_update_slice clamps its write: an index past the cache (a caller's bug)
    # then gives the reference's answer instead of a write out of bounds
    index = jnp.minimum(idx_ref[0], kc_ref.shape[1] - 1)
    # this split's share of the filled blocks (those up to the newest slot), decided at run time (`fill`), or of the
    # window's (see SHARES)
    filled = filled_blocks(index, block, nblocks)
    lo, hi = split_range(si, filled, blocks_per_split(filled, splits, None if fill else nblocks))
    c, s = cos_ref[bi, :], sin_ref[bi, :]
    heads = [(head0 + j) * d for j in range(hp)] + [(h + ki) * d]  # this program's q heads, then its k head
    v_off = (h + kv + ki) * d
    vals = _projection(qkv_ref, rows_ref, bi, parts, eps, dtype,
                       [(o, half) for o in heads] + [(o + half, half) for o in heads] + [(v_off, d)])
    n = len(heads)

    def rope(i: int):  # head i's halves, rotated and rounded to the compute dtype, as the reference does
        x1, x2 = vals[i], vals[n + i]
        return ((x1 * c - x2 * s).astype(dtype).astype(F32), (x2 * c + x1 * s).astype(dtype).astype(F32))

    qs = [rope(i) for i in range(hp)]
    k1, k2 = rope(hp)
    k1c, k2c = k1.astype(kc_ref.dtype), k2.astype(kc_ref.dtype)
    v_new = vals[-1].astype(vc_ref.dtype)

    @pl.when((si == 0) & (jq == 0))  # one program of the group writes; the others' loop leaves that slot out
    def _write():
        kc_ref[bi, index, ki, pl.ds(0, half)] = k1c
        kc_ref[bi, index, ki, pl.ds(half, half)] = k2c
        vc_ref[bi, index, ki, :] = v_new

    scale = 1.0 / math.sqrt(d)
    if dot:
        _attend_dot(kc_ref, vc_ref, valid_ref, o_ref, m_ref, l_ref, qs, k1c, k2c, v_new, bi=bi, ki=ki, si=si,
                    head0=head0, d=d, block=block, index=index, lo=lo, hi=hi, scale=scale, partials=partials,
                    newest=newest)
        return

    def body(i, carry):
        rows = pl.ds(i * block, block)
        slot = i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        new = (slot == index)[:, None]
        kb1 = jnp.where(new, k1c[None, :], kc_ref[bi, rows, ki, pl.ds(0, half)]).astype(F32)
        kb2 = jnp.where(new, k2c[None, :], kc_ref[bi, rows, ki, pl.ds(half, half)]).astype(F32)
        vb = jnp.where(new, v_new[None, :], vc_ref[bi, rows, ki, :]).astype(F32)
        ok = (valid_ref[bi, rows] != 0) & (slot <= index)
        out = []
        for j in range(hp):
            m, l, acc = carry[3 * j: 3 * j + 3]
            q1, q2 = qs[j]
            sc = (jnp.sum(kb1 * q1[None, :], axis=1) + jnp.sum(kb2 * q2[None, :], axis=1)) * scale
            sc = jnp.where(ok, sc, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(sc))
            corr = jnp.exp(m - m_new)
            p = jnp.where(ok, jnp.exp(sc - m_new), 0.0)  # masked slots add nothing even while m is NEG_INF
            out += [m_new, l * corr + jnp.sum(p), acc * corr + jnp.sum(p[:, None] * vb, axis=0)]
        return tuple(out)

    init = []
    for _ in range(hp):
        init += [jnp.full((), NEG_INF, F32), jnp.zeros((), F32), jnp.zeros((d,), F32)]
    res = jax.lax.fori_loop(lo, hi, body, tuple(init))
    for j in range(hp):
        m, l, acc = res[3 * j: 3 * j + 3]
        head = head0 + j
        if not partials:
            o_ref[bi, pl.ds(head * d, d)] = (acc / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)
        else:
            o_ref[bi, si, pl.ds(head * d, d)] = acc
            m_ref[bi, si, pl.ds(head, 1)] = jnp.full((1,), m, F32)
            l_ref[bi, si, pl.ds(head, 1)] = jnp.full((1,), l, F32)


def _projection(qkv_ref: Any, rows_ref: Any, bi: Any, parts: int, eps: float, dtype: Any,
                segments: list[tuple[Any, int]]) -> list[jax.Array]:
    """Row bi's q·k·v values [off, off + n) for each (off, n) segment, fp32 holding `dtype` values: read
    from the projection, or (parts > 0) summed over its split-K partials and scaled by RMSNorm's factor of the
    row, computed here from the rows — `ops.partials.project_partials` in the same order of operations. Every
    load is issued before the arithmetic that waits on them (the row's factor last): one memory latency."""
    if not parts:
        return [qkv_ref[bi, pl.ds(off, n)].astype(F32) for off, n in segments]
    loads = [[qkv_ref[i, bi, pl.ds(off, n)] for i in range(parts)] for off, n in segments]
    width = rows_ref.shape[1]
    chunk = pick_block(width)
    xs = [rows_ref[bi, pl.ds(c0, chunk)].astype(F32) for c0 in range(0, width, chunk)]
    sums = []
    for ps in loads:
        acc = ps[0]
        for p in ps[1:]:
            acc = acc + p
        sums.append(acc)
    ss = jnp.sum(xs[0] * xs[0])
    for v in xs[1:]:
        ss = ss + jnp.sum(v * v)
    rs = jax.lax.rsqrt(ss / width + eps)
    return [(acc * rs).astype(dtype).astype(F32) for acc in sums]


def dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (M, K) · b (N, K)ᵀ -> (M, N) fp32; fp32 operands at full precision (not TF32)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=F32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (M, K) · b (K, N) -> (M, N) fp32; fp32 operands at full precision (not TF32)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=F32)


def online_update(carry: tuple[jax.Array, jax.Array, jax.Array], sc: jax.Array, ok: jax.Array,
                  vals: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block of an online softmax per row, in dots: carry (m (R,), l (R,), acc (R, d)) fp32, scores sc (R, N)
    fp32, ok (R, N) or (1, N) the keys that count, vals (N, d) in the cache's dtype. p enters p·V as two rounded
    parts of that dtype (~16 bits), fp32 as it is."""
    m, l, acc = carry
    sc = jnp.where(ok, sc, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(ok, jnp.exp(sc - m_new[:, None]), 0.0)
    if vals.dtype == F32:
        pv = dot_nn(p, vals)
    else:
        p_hi = p.astype(vals.dtype)
        pv = dot_nn(p_hi, vals) + dot_nn((p - p_hi.astype(F32)).astype(vals.dtype), vals)
    return m_new, l * corr + jnp.sum(p, axis=1), acc * corr[:, None] + pv


def pick_row(tile: jax.Array, r: int) -> jax.Array:
    """Row r of a register tile (R,) or (R, d): Triton has no slicing of register tiles, a masked sum picks one."""
    row = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 0)
    return jnp.sum(jnp.where(row == r, tile, 0.0), axis=0)


def _cache_block(kc_ref: Any, vc_ref: Any, valid_ref: Any, bi: Any, ki: Any, i: Any,
                 block: int) -> tuple[jax.Array, ...]:
    """Block i of KV head ki of row bi as loaded: (k's first half, k's second half, v, the padding mask)."""
    rows = pl.ds(i * block, block)
    half = kc_ref.shape[-1] // 2
    return (kc_ref[bi, rows, ki, pl.ds(0, half)], kc_ref[bi, rows, ki, pl.ds(half, half)], vc_ref[bi, rows, ki, :],
            valid_ref[bi, rows])


def _attend_dot(kc_ref, vc_ref, valid_ref, o_ref, m_ref, l_ref, qs, k1c, k2c, v_new, *, bi, ki, si, head0, d: int,
                block: int, index, lo, hi, scale: float, partials: bool, newest: str) -> None:
    """The block loop of `_kernel` with tensor-core dots (module docstring): the program's g roped query heads
    (heads head0.., of KV head ki) as rows 0..g-1 of a (G, d/2) pair of tiles, an online softmax per row
    (`online_update`), each row's results extracted at the end (`pick_row`). The new token (slot `index`)
    substituted into its block (`newest` "block") or left out of the loop and added after it from registers
    ("after")."""
    half, g = d // 2, len(qs)
    cdt = kc_ref.dtype
    rows_g = pow2_at_least(g, DOT_ROWS)
    row = jax.lax.broadcasted_iota(jnp.int32, (rows_g, half), 0)
    q1 = jnp.zeros((rows_g, half), F32)
    q2 = jnp.zeros((rows_g, half), F32)
    for j, (a1, a2) in enumerate(qs):
        q1 = jnp.where(row == j, a1[None, :], q1)
        q2 = jnp.where(row == j, a2[None, :], q2)
    q1f, q2f = q1, q2
    q1, q2 = q1.astype(cdt), q2.astype(cdt)  # qs are rounded to the compute dtype already: exact for bf16 caches

    def attend(i, carry):
        k1b, k2b, vb, valid = _cache_block(kc_ref, vc_ref, valid_ref, bi, ki, i, block)
        slot = i * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        if newest == "after":  # the loaded tiles go straight into the dots
            ok = ((valid != 0) & (slot < index))[None, :]
            return online_update(carry, (dot_t(q1, k1b) + dot_t(q2, k2b)) * scale, ok, vb)
        new = (slot == index)[:, None]
        kb1 = jnp.where(new, k1c[None, :], k1b)
        kb2 = jnp.where(new, k2c[None, :], k2b)
        vb = jnp.where(new, v_new[None, :], vb)
        ok = ((valid != 0) & (slot <= index))[None, :]
        return online_update(carry, (dot_t(q1, kb1) + dot_t(q2, kb2)) * scale, ok, vb)  # scores (G, block)

    init = (jnp.full((rows_g,), NEG_INF, F32), jnp.zeros((rows_g,), F32), jnp.zeros((rows_g, d), F32))
    m, l, acc = jax.lax.fori_loop(lo, hi, attend, init)
    if newest == "after":  # the split whose blocks hold slot `index` adds the new token, if it is valid
        nb = index // block
        mine = (lo <= nb) & (nb < hi) & (valid_ref[bi, index] != 0)
        sc = (jnp.sum(q1f * k1c.astype(F32)[None, :], axis=1) + jnp.sum(q2f * k2c.astype(F32)[None, :], axis=1))
        sc = jnp.where(mine, sc * scale, NEG_INF)
        m_new = jnp.maximum(m, sc)
        corr = jnp.exp(m - m_new)
        p = jnp.where(mine, jnp.exp(sc - m_new), 0.0)
        m, l, acc = m_new, l * corr + p, acc * corr[:, None] + p[:, None] * v_new.astype(F32)[None, :]
    for j in range(g):
        acc_j, l_j = pick_row(acc, j), pick_row(l, j)
        head = head0 + j
        if not partials:
            o_ref[bi, pl.ds(head * d, d)] = (acc_j / jnp.maximum(l_j, 1e-30)).astype(o_ref.dtype)
        else:
            m_j = pick_row(m, j)
            o_ref[bi, si, pl.ds(head * d, d)] = acc_j
            m_ref[bi, si, pl.ds(head, 1)] = jnp.full((1,), m_j, F32)
            l_ref[bi, si, pl.ds(head, 1)] = jnp.full((1,), l_j, F32)


def merge_partials(o_part: jax.Array, m: jax.Array, l: jax.Array, dtype: Any) -> jax.Array:
    """Merges per-split softmax partials: o_part (b, S, H·d) unnormalised, m / l (b, S, H) running max / sum ->
    (b, H·d) in `dtype`. Splits that saw no valid slot have m = NEG_INF, l = 0 and add nothing.

    (The same sums written split by split, without a reduction, were measured in the H100's decode loop at batch 64
    and removed: 0.998 ms a step against 1.007 with 2 splits, no launch fewer, and the unsplit kernel's 0.882 beats
    both; decode_profile_s24_b64.md, variant `amu`.)"""
    b, splits, hd = o_part.shape
    h = m.shape[2]
    mx = jnp.max(m, axis=1, keepdims=True)
    w = jnp.exp(m - mx)  # (b, S, H)
    den = jnp.sum(w * l, axis=1)  # (b, H)
    num = jnp.sum(w[..., None] * o_part.reshape(b, splits, h, hd // h), axis=1)
    return (num / jnp.maximum(den, 1e-30)[..., None]).reshape(b, hd).astype(dtype)


def _merge_kernel(op_ref, m_ref, l_ref, o_ref, *, d: int, splits: int):
    bi, hh = pl.program_id(0), pl.program_id(1)
    sl = pl.ds(0, splits)
    mh = m_ref[bi, sl, hh]
    w = jnp.exp(mh - jnp.max(mh))
    den = jnp.sum(w * l_ref[bi, sl, hh])
    num = jnp.sum(w[:, None] * op_ref[bi, sl, pl.ds(hh * d, d)], axis=0)
    o_ref[bi, pl.ds(hh * d, d)] = (num / jnp.maximum(den, 1e-30)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("dtype", "interpret"))
def merge_partials_pallas(o_part: jax.Array, m: jax.Array, l: jax.Array, dtype: Any, *,
                          interpret: bool = False) -> jax.Array:
    """`merge_partials` as one launch, one program per (row, head): for a consumer that is not the fused
    o-projection (whose own prologue merges, `fused_decode.attn_combine_residual`)."""
    b, splits, hd = o_part.shape
    h = m.shape[2]
    d = hd // h
    if not (is_pow2(splits) and is_pow2(d) and d >= 16) or m.shape != (b, splits, h) or l.shape != m.shape:
        raise KernelError(f"decode_attention: merge_partials_pallas needs o_part (b, S, H·d) and m, l (b, S, H) "
                          f"with S and d powers of two (d >= 16), got {o_part.shape}, {m.shape}, {l.shape}")
    return triton_call(
        functools.partial(_merge_kernel, d=d, splits=splits), grid=(b, h),
        out_shape=jax.ShapeDtypeStruct((b, hd), dtype), interpret=interpret, num_warps=1, num_stages=1,
        name="decode_attention_merge",
    )(o_part.astype(F32), m.astype(F32), l.astype(F32))


def _launch(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array, sin: jax.Array,
            index: jax.Array, valid: jax.Array, *, num_heads: int, window: int, block: int, splits: int,
            partials: bool, interpret: bool, num_warps: int, dot: bool | None, rows: jax.Array | None,
            eps: float) -> tuple[jax.Array, ...]:
    b, slots, kv, d = k_cache.shape
    h = num_heads
    nblocks = window // block
    splits = max(1, min(splits, nblocks))
    use_dot = uses_dot(b, d, dot)
    dtype = qkv.dtype if rows is None else rows.dtype
    hp = planned_heads(h // kv, b)
    kern = functools.partial(_kernel, h=h, kv=kv, d=d, block=block, nblocks=nblocks, splits=splits,
                             partials=partials, dtype=dtype, dot=use_dot, parts=0 if rows is None else qkv.shape[0],
                             eps=float(eps), fill=planned_shares() == "fill", newest=planned_newest(b), hp=hp)
    if not partials:
        o_shape = jax.ShapeDtypeStruct((b, h * d), dtype)
        ml_shape = jax.ShapeDtypeStruct((1, 1, 1), F32)  # unused
    else:
        o_shape = jax.ShapeDtypeStruct((b, splits, h * d), F32)
        ml_shape = jax.ShapeDtypeStruct((b, splits, h), F32)
    return triton_call(
        kern,
        grid=(b, kv * (h // kv // hp), splits),
        out_shape=(o_shape, ml_shape, ml_shape, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={1: 3, 2: 4},
        interpret=interpret, num_warps=planned_warps(num_warps, block), num_stages=planned_stages(b),
        name="decode_attention",
    )(qkv, k_cache, v_cache, cos.astype(F32), sin.astype(F32), jnp.reshape(index, (1,)).astype(jnp.int32),
      valid.astype(jnp.int32), jnp.zeros((1, 1), F32) if rows is None else rows)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "window", "block", "splits",
                                             "interpret", "num_warps", "dot", "eps"))
def decode_attention_pallas(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array,
                            sin: jax.Array, index: jax.Array, valid: jax.Array, *, num_heads: int,
                            num_kv_heads: int, window: int = 0, block: int = 0, splits: int = 0,
                            interpret: bool = False, num_warps: int = 0, dot: bool | None = None,
                            rows: jax.Array | None = None, eps: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel (see the module docstring); `block`/`splits` 0 = chosen by `plan`, `dot` None = `planned_dot`.
    With splits > 1 the partials are merged by `merge_partials` in XLA (or `merge_partials_pallas`:
    `override_plan(merge="kernel")`). `rows` given: qkv holds the projection as split-K partials (S, b, N) fp32
    of RMSNorm(rows) without its row scale, which the prologue sums and scales (`ops.partials.project_partials`;
    `inference.split_k` says why)."""
    check_args(qkv, k_cache, v_cache, cos, sin, valid, num_heads=num_heads, num_kv_heads=num_kv_heads,
               window=window, kernel=True, rows=rows)
    b, slots, kv, d = k_cache.shape
    window = window or slots
    p_block, p_splits = plan(b, kv, window, dot=uses_dot(b, d, dot))
    block = block or p_block
    splits = max(1, min(splits or p_splits, window // block))
    o, m, l, kc, vc = _launch(qkv, k_cache, v_cache, cos, sin, index, valid, num_heads=num_heads, window=window,
                              block=block, splits=splits, partials=splits > 1, interpret=interpret,
                              num_warps=num_warps, dot=dot, rows=rows, eps=eps)
    dt = qkv.dtype if rows is None else rows.dtype
    if splits > 1 and _PLAN_OVERRIDE["merge"] == "kernel":
        o = merge_partials_pallas(o, m, l, dt, interpret=interpret)
    elif splits > 1:
        o = merge_partials(o, m, l, dt)
    return o, kc, vc


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "window", "block", "splits",
                                             "interpret", "num_warps", "dot", "eps"))
def decode_attention_partials_pallas(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array,
                                     sin: jax.Array, index: jax.Array, valid: jax.Array, *, num_heads: int,
                                     num_kv_heads: int, window: int = 0, block: int, splits: int,
                                     interpret: bool = False, num_warps: int = 0, dot: bool | None = None,
                                     rows: jax.Array | None = None, eps: float = 0.0) -> tuple[jax.Array, ...]:
    """The kernel's unmerged output: (o_part (b, S, h·d) fp32, m (b, S, h), l (b, S, h), k_cache, v_cache) over
    S = `splits` slices of the filled blocks (`split_of_slots`); same as `decode_attention_partials_reference`.
    `rows`, `eps`: as `decode_attention_pallas`."""
    check_args(qkv, k_cache, v_cache, cos, sin, valid, num_heads=num_heads, num_kv_heads=num_kv_heads,
               window=window, kernel=True, rows=rows)
    check_split_args(k_cache, window, block, splits)
    return _launch(qkv, k_cache, v_cache, cos, sin, index, valid, num_heads=num_heads,
                   window=window or k_cache.shape[1], block=block, splits=splits, partials=True,
                   interpret=interpret, num_warps=num_warps, dot=dot, rows=rows, eps=eps)


def decode_attention_partials_reference(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array,
                                        sin: jax.Array, index: jax.Array, valid: jax.Array, *, num_heads: int,
                                        num_kv_heads: int, window: int = 0, block: int, splits: int,
                                        rows: jax.Array | None = None, eps: float = 0.0) -> tuple[jax.Array, ...]:
    """Pure-JAX partials: RoPE and the cache write as `decode_attention_reference`, then per slice of the filled
    blocks (`split_of_slots`) the running max m, the sum l of exp(score - m) and the unnormalised output over the
    valid slots. `merge_partials` of the result is the reference's output.
    `rows` given: qkv is `project_partials(qkv, rows, eps)`'s partials (see `decode_attention_pallas`)."""
    check_args(qkv, k_cache, v_cache, cos, sin, valid, num_heads=num_heads, num_kv_heads=num_kv_heads,
               window=window, kernel=False, rows=rows)
    check_split_args(k_cache, window, block, splits)
    if rows is not None:
        qkv = project_partials(qkv, rows, eps)
    b, slots, kv, d = k_cache.shape
    h = num_heads
    g = h // kv
    window = window or slots
    q, k_cache, v_cache = rope_and_write(qkv, k_cache, v_cache, cos, sin, index, num_heads=h, num_kv_heads=kv)
    kc, vc = k_cache[:, :window].astype(F32), v_cache[:, :window].astype(F32)
    slot = jnp.arange(window, dtype=jnp.int32)
    ok = valid[:, :window] & (slot[None, :] <= index)  # (b, W)
    sel = ok[:, None, :] & (split_of_slots(index, slots, window, block, splits, planned_shares() == "fill")[None, :]
                            == jnp.arange(splits, dtype=jnp.int32)[:, None])[None]  # (b, S, W)
    qg = q.reshape(b, kv, g, d).astype(F32)
    sc = jnp.einsum("bkgd,bwkd->bkgw", qg, kc, precision="highest") / math.sqrt(d)
    sc = jnp.where(sel[:, None, None], sc[:, :, :, None, :], NEG_INF)  # (b, kv, g, S, W)
    m = jnp.max(sc, axis=-1)  # (b, kv, g, S)
    p = jnp.where(sel[:, None, None], jnp.exp(sc - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    acc = jnp.einsum("bkgxw,bwkd->bxkgd", p, vc, precision="highest")
    o_part = acc.reshape(b, splits, h * d)
    to_bsh = lambda a: jnp.moveaxis(a.reshape(b, h, splits), 2, 1)
    return o_part, to_bsh(m), to_bsh(l), k_cache, v_cache


def split_of_slots(index: jax.Array, slots: int, window: int, block: int, splits: int,
                   fill: bool = True) -> jax.Array:
    """The split each of the window's slots falls in (W,) int32: the filled blocks (up to the one holding the
    newest slot, `index` clamped to the cache as the write clamps it) in `splits` consecutive shares of
    ceil(filled / splits) blocks, the last shares possibly short or empty; slots past the fill get ids >= splits
    only where they are not valid anyway (they are after the newest slot). `fill` False: the window's blocks in
    shares of ceil(window / block / splits) (SHARES = "window")."""
    nblocks = window // block
    filled = filled_blocks(jnp.minimum(index, slots - 1), block, nblocks)
    per = blocks_per_split(filled, splits, None if fill else nblocks)
    return (jnp.arange(window, dtype=jnp.int32) // block) // per


def filled_blocks(index: Any, block: int, nblocks: int) -> Any:
    """The window's blocks up to the one holding the newest slot `index` (already clamped to the cache): the blocks
    a decode step's splits share (`split_of_slots`, the kernel)."""
    return jnp.minimum(index // block + 1, nblocks)


def blocks_per_split(filled: Any, splits: int, window_blocks: int | None = None) -> Any:
    """The blocks each of `splits` splits takes: ceil(filled / splits) of the `filled` blocks (a traced count: the
    share decided at run time), or, given `window_blocks`, ceil(window_blocks / splits) of the window's."""
    return (filled + splits - 1) // splits if window_blocks is None else -(-window_blocks // splits)


def split_range(si: Any, filled: Any, per: Any) -> tuple[Any, Any]:
    """Split si's blocks [lo, hi): its `per` consecutive blocks, clipped to the `filled` ones (possibly empty)."""
    lo = jnp.minimum(si * per, filled)
    return lo, jnp.minimum(lo + per, filled)


def check_split_args(k_cache: Any, window: int, block: int, splits: int) -> None:
    window = window or k_cache.shape[1]
    if not (is_pow2(block) and window % block == 0):
        raise KernelError(f"decode_attention: block must be a power of two dividing the window ({window}), "
                          f"got {block}")
    if not 1 <= splits <= window // block:
        raise KernelError(f"decode_attention: splits must be in [1, window/block = {window // block}], "
                          f"got {splits}")


def check_cache_args(k_cache: Any, v_cache: Any, valid: Any, *, num_heads: int, num_kv_heads: int,
                     op: str) -> tuple[int, int, int, int]:
    """The checks an attention step over a KV cache needs whatever its queries (this kernel's and
    `verify_attention`'s): raises KernelError (prefixed with `op`) naming the first bad argument; returns
    (batch, slots, kv_heads, head_dim)."""
    if getattr(k_cache, "ndim", None) != 4 or v_cache.shape != k_cache.shape:
        raise KernelError(f"{op}: k_cache and v_cache must both be (batch, slots, kv_heads, head_dim), got "
                          f"{getattr(k_cache, 'shape', None)} and {getattr(v_cache, 'shape', None)}")
    b, slots, kv, d = k_cache.shape
    if kv != num_kv_heads or num_heads % kv:
        raise KernelError(f"{op}: num_kv_heads ({num_kv_heads}) must equal the cache's {kv} and divide num_heads "
                          f"({num_heads})")
    if valid.shape != (b, slots):
        raise KernelError(f"{op}: valid must be (batch, slots) = {(b, slots)}, got {valid.shape}")
    return b, slots, kv, d


def check_args(qkv: Any, k_cache: Any, v_cache: Any, cos: Any, sin: Any, valid: Any, *, num_heads: int,
               num_kv_heads: int, window: int = 0, kernel: bool = True, rows: Any = None) -> None:
    """Raises KernelError naming the first bad argument (shapes only). `kernel=False`: what the reference needs.
    `rows` given: qkv must be the projection's split-K partials (S, batch, N) and rows (batch, width)."""
    def bad(msg: str) -> KernelError:
        return KernelError(f"decode_attention: {msg}")

    b, slots, kv, d = check_cache_args(k_cache, v_cache, valid, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                       op="decode_attention")
    h = num_heads
    n = (h + 2 * kv) * d
    if rows is None and qkv.shape != (b, n):
        raise bad(f"qkv must be (batch, (heads + 2·kv_heads)·head_dim) = {(b, n)}, got {qkv.shape}")
    if rows is not None:
        if getattr(rows, "ndim", None) != 2 or rows.shape[0] != b:
            raise bad(f"rows must be (batch = {b}, width), got {getattr(rows, 'shape', None)}")
        if getattr(qkv, "ndim", None) != 3 or qkv.shape[1:] != (b, n) or qkv.shape[0] < 1:
            raise bad(f"with rows, qkv must be the projection's split-K partials (S, batch, (heads + "
                      f"2·kv_heads)·head_dim) = (S, {b}, {n}), got {qkv.shape}")
    if cos.shape != (b, d // 2) or sin.shape != cos.shape:
        raise bad(f"cos and sin must be (batch, head_dim/2) = {(b, d // 2)}, got {cos.shape} and {sin.shape}")
    if window < 0 or window > slots:
        raise bad(f"window must be in [0, slots={slots}], got {window}")
    if not kernel:
        return
    if not (is_pow2(d) and d >= 16):
        raise bad(f"head_dim ({d}) must be a power of two >= 16 for the Pallas kernel; use "
                  "mamba_llama_jax.ops.attention.decode_attention_reference for other sizes")
    if pick_block(window or slots) < 16:
        raise bad(f"the attended slots ({window or slots}) must be a multiple of 16 for the Pallas kernel")
    if rows is not None and pick_block(rows.shape[1]) < 16:
        raise bad(f"the rows' width ({rows.shape[1]}) must be a multiple of 16 for the Pallas kernel")


# Its gpu tests (kernel == reference at real shapes) passed on an H100 (benchmarks/results/test-gpu-decode.xml),
# so it is the default on GPUs; MAMBA_LLAMA_FORCE_REFERENCE=1 still forces the XLA reference.
GPU_VERIFIED = True


def decode_attention_choice(qkv: Any, k_cache: Any, v_cache: Any, cos: Any, sin: Any, valid: Any, *,
                            num_heads: int, num_kv_heads: int, window: int = 0, rows: Any = None) -> str:
    """Which implementation `decode_attention` would use (raises KernelError for bad arguments)."""
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, window=window, rows=rows)
    check_args(qkv, k_cache, v_cache, cos, sin, valid, kernel=False, **kw)
    if not dispatch.kernel_allowed(GPU_VERIFIED):
        return REFERENCE
    try:
        check_args(qkv, k_cache, v_cache, cos, sin, valid, kernel=True, **kw)
    except KernelError:
        return REFERENCE
    return PALLAS_TRITON


def kernel_would_run(head_dim: int, slots_multiple: int) -> bool:
    """Whether the Generator's decode attention will be the kernel (for its phase plan): GPU (or interpret mode),
    not forced to the reference, a head size the kernel tiles, and caches whose slot count is a multiple of 16."""
    return (dispatch.kernel_allowed(GPU_VERIFIED) and is_pow2(head_dim) and head_dim >= 16
            and slots_multiple % 16 == 0)


def decode_attention(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array, sin: jax.Array,
                     index: jax.Array, valid: jax.Array, *, num_heads: int, num_kv_heads: int,
                     window: int = 0, rows: jax.Array | None = None,
                     eps: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Kernel on GPU (see GPU_VERIFIED), the XLA reference elsewhere or with MAMBA_LLAMA_FORCE_REFERENCE=1; records
    the choice (`pallas_kernels.dispatch.last_choice("decode_attention")`). `rows`, `eps`: qkv as split-K
    partials (`decode_attention_pallas`)."""
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, window=window)
    choice = decode_attention_choice(qkv, k_cache, v_cache, cos, sin, valid, rows=rows, **kw)
    dispatch.record_choice("decode_attention", choice)
    if choice == PALLAS_TRITON:
        return decode_attention_pallas(qkv, k_cache, v_cache, cos, sin, index, valid, interpret=_interpret(),
                                       rows=rows, eps=eps, **kw)
    if rows is not None:
        qkv = project_partials(qkv, rows, eps)
    return decode_attention_reference(qkv, k_cache, v_cache, cos, sin, index, valid, **kw)


def decode_attention_partials(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array,
                              sin: jax.Array, index: jax.Array, valid: jax.Array, *, num_heads: int,
                              num_kv_heads: int, window: int = 0, block: int, splits: int,
                              rows: jax.Array | None = None, eps: float = 0.0) -> tuple[jax.Array, ...]:
    """Unmerged partials (see `decode_attention_partials_pallas`) for a consumer that merges them itself:
    the kernel where `decode_attention` would use it, the pure-JAX partials elsewhere. Records the choice."""
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, window=window)
    choice = decode_attention_choice(qkv, k_cache, v_cache, cos, sin, valid, rows=rows, **kw)
    dispatch.record_choice("decode_attention", choice)
    f = decode_attention_partials_reference
    if choice == PALLAS_TRITON:
        f = functools.partial(decode_attention_partials_pallas, interpret=_interpret())
    return f(qkv, k_cache, v_cache, cos, sin, index, valid, block=block, splits=splits, rows=rows, eps=eps, **kw)


def merge_splits(o_part: jax.Array, m: jax.Array, l: jax.Array, dtype: Any) -> jax.Array:
    """`merge_partials_pallas` where the attention kernel runs (GPU, or interpret mode in tests), `merge_partials`
    elsewhere; records the choice under "decode_attention_merge"."""
    choice = PALLAS_TRITON if dispatch.kernel_allowed(GPU_VERIFIED) else REFERENCE
    dispatch.record_choice("decode_attention_merge", choice)
    if choice == PALLAS_TRITON:
        return merge_partials_pallas(o_part, m, l, dtype, interpret=_interpret())
    return merge_partials(o_part, m, l, dtype)


def _interpret() -> bool:
    return not dispatch._on_gpu()
