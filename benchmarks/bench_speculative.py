"""Speculative vs plain greedy decoding of a hybrid target, side by side in one run (issue 7), with the Mamba
layers' multistep verify on the Pallas kernel and on its pure-JAX reference, also side by side.

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 benchmarks/bench_speculative.py --out benchmarks/results
    PYTHONPATH=$PWD python3 benchmarks/bench_speculative.py --tiny --out /tmp/spec        # CPU smoke run
    # real checkpoints (each a saved hybrid directory, a GGUF file or an HF directory; one tokenizer):
    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 benchmarks/bench_speculative.py --target DIR --draft DIR \\
        --prompt "Explain speculative decoding." --prompt "Write a haiku about rain." --out benchmarks/results

Without --target/--draft the models are random-init and shaped like the real ones:
- `llama1b`: a Llama-3.2-1B-shaped hybrid target (50 % attention, Mamba2) with a 4-layer pure-Mamba draft of the
  same vocabulary (hidden 512);
- `smollm2`: a SmolLM2-135M-shaped hybrid target (50 % attention) with a 2-layer pure-Mamba draft.
Random weights make acceptance meaningless (an unrelated draft accepts ~0 tokens), so the script reports two
things, per batch size, k and verify implementation (`--impls`: kernel = `pallas_kernels/multistep_verify.py`,
reference = `ops.ssd.ssd_verify`; everything else keeps the dispatcher's choice):
1. measured end to end: tokens/s of plain greedy (`generate.Generator`) and of `SpeculativeDecoder` (with a random
   draft acceptance is ~0, the worst case: every round costs a draft pass and a verify for one token), plus the
   share of rows whose tokens equal plain greedy, where the others first differ, and the target's top-1 minus
   top-2 logit there (near-ties that bf16 rounding may flip, or not);
2. component times, all at the same cache fill: one plain target decode step, one target verify of k+1 tokens
   with its commit (keeping half: the second multistep-verify call), one draft step (a 1-token verify, as the
   draft round runs it) and one draft 2-token verify + commit; and the speedup they imply at fixed acceptance
   rates alpha, with tokens/round = (1 - alpha^(k+1)) / (1 - alpha) (i.i.d. acceptance, Leviathan et al. 2023):
   speedup = tokens/round * t_plain / (t_draft2 + (k-1) * t_draft + t_verify).
With real checkpoints (1) is the real measurement, over every prompt (--prompt, --heldout-prompts N) in batches of
b (the last filled up cyclically): acceptance and `same` over all of them, tokens/s from the sum of each batch's
median time. Median of --reps timed runs after one warm-up. Stops starting
new measurements once --deadline-s has passed (the default leaves a 10-minute device call room for the last one
and the write-up) and lists what it skipped. Writes <out>/speculative.json and <out>/speculative.md.
`--profile`: one more run per row traced, a round and a plain step broken down by kind of kernel.
`--slot-multiple N [N ...]`: the loop's KV caches rounded to each multiple in turn (`SpeculativeDecoder`'s
`slot_multiple`; default the attention kernels' 128-slot block), one row each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import device, now, versions  # noqa: E402
from bench_verify import CMDBUF, Deadline, device_flags, touch, verify_impl  # noqa: E402

from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig  # noqa: E402
from mamba_llama_jax.convert.from_attention import build_hybrid  # noqa: E402
from mamba_llama_jax.inference import speculative as spec_mod  # noqa: E402
from mamba_llama_jax.inference.generate import (Generator, SamplingConfig, _round_up, decode_gemm,  # noqa: E402
                                                prepare_for_inference, verify_rows_fused)
from mamba_llama_jax.inference.speculative import (SpeculativeDecoder, _latest, draft_logits,  # noqa: E402
                                                    draft_vocabulary, verify)
from mamba_llama_jax.models.llama import DecoderLM, LlamaLM  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.decode_attention import MAX_BLOCK  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama1b": dict(
        target=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                    max_position_embeddings=8192),
        draft=dict(vocab_size=128256, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                   num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                   max_position_embeddings=8192)),
    "smollm2": dict(
        target=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                    max_position_embeddings=8192),
        draft=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9,
                   num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                   max_position_embeddings=8192)),
    "tiny": dict(  # CPU smoke test of the script itself (head_dim 16: the kernel's smallest tile)
        target=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                    max_position_embeddings=1024),
        draft=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                   max_position_embeddings=1024)),
}
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
LOOP_ALPHAS = (0.5, 0.7, 0.9, 1.0)


def make_models(shape: str, dtype: str) -> tuple[DecoderLM, DecoderLM]:
    """Random-init hybrid target (50 % attention) and pure-Mamba draft, parameters in the compute dtype."""
    s = SHAPES[shape]
    tcfg = LlamaConfig(**s["target"], dtype=dtype, param_dtype=dtype)
    dcfg = LlamaConfig(**s["draft"], dtype=dtype, param_dtype=dtype)
    mamba = MambaConfig(variant="mamba2")
    target = build_hybrid(LlamaLM(tcfg, rngs=nnx.Rngs(0)), HybridConfig(attn_fraction=0.5, mamba=mamba),
                          rngs=nnx.Rngs(1))
    draft = build_hybrid(LlamaLM(dcfg, rngs=nnx.Rngs(2)), HybridConfig(attn_fraction=0.0, mamba=mamba),
                         rngs=nnx.Rngs(3))
    return target, draft


def load_model(path: str, dtype: str) -> tuple[DecoderLM, Any]:
    """(model, tokenizer or None) from a saved hybrid (MambaInLlama directory), a GGUF file or an HF directory."""
    from mamba_llama_jax.convert import load_teacher
    from mamba_llama_jax.convert.mambainllama import import_mambainllama

    p = Path(path)
    if (p / "mamba_config.json").is_file():
        _, _, model, tok = import_mambainllama(p, dtype=dtype)
        return model, tok
    teacher = load_teacher(p, dtype=dtype)
    return teacher.model, teacher.tokenizer


def timed(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() (which must block), after `warmup` calls (the first compiles)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def component_times(model: DecoderLM, batch: int, prompt_len: int, kinds: tuple[tuple[str, int], ...],
                    reps: int, head: Any = None) -> dict[tuple[str, int], float]:
    """Seconds of one forward from a cache holding `prompt_len` tokens, per (kind, t): ("decode", 1) a plain decode
    step; ("step", 1) a 1-token verify (a draft step of `draft_round`, scoring `head`'s reduced vocabulary when
    given); ("verify", t) a t-token verify + commit of t // 2 tokens. Each timed call runs 16 forwards in a
    fori_loop so the host call's launch overhead is amortised, restarting from the same cache each time (the fill
    stays fixed). Traced here: call inside `verify_impl`."""
    graphdef, state, _ = prepare_for_inference(model)
    slots = _round_up(prompt_len + 64, MAX_BLOCK)  # whole attention blocks, as the loop's caches

    @jax.jit
    def prefill(state: Any, tok: jax.Array) -> Any:
        m = nnx.merge(graphdef, state)
        return m.hidden(tok, cache=m.init_cache(batch, slots), prefill=True)[1]

    cache = prefill(state, jnp.ones((batch, prompt_len), jnp.int32))
    out = {}
    for kind, t in kinds:
        @jax.jit
        def run(state: Any, cache: Any, t: int = t, kind: str = kind) -> jax.Array:
            m = nnx.merge(graphdef, state)

            def body(i: jax.Array, acc: jax.Array) -> jax.Array:
                tok = jnp.full((batch, t), i % 7, jnp.int32)
                # `touch` keeps the new Mamba states live, as the real loop does by carrying them
                if kind == "decode":
                    h, c = m.hidden(tok, cache=cache)
                    return acc + jnp.argmax(m.logits(h)[:, -1], axis=-1) + touch(c)
                if kind == "step":
                    h, st = m.hidden(tok, cache=cache, verify=True)
                    return acc + jnp.argmax(draft_logits(m, h[:, -1], head), axis=-1) + touch(_latest(st))
                logits, pend = verify(m, tok, cache)
                acc = acc + jnp.argmax(logits[:, -1], axis=-1)
                keep = jnp.full((batch,), t // 2, jnp.int32) + (acc < 0).astype(jnp.int32)  # data-dependent
                return acc + touch(pend.commit(keep))
            return jax.lax.fori_loop(0, 16, body, jnp.zeros((batch,), jnp.int32))

        out[(kind, t)] = timed(lambda: jax.block_until_ready(run(state, cache)), reps, warmup=2) / 16
    return out


_PROFILER_WARM: list[bool] = []


def profile_run(fn: Callable[[], Any], units: Callable[[Any], int]) -> dict[str, Any]:
    """One profiled call of `fn` (already compiled), summarised per unit (a speculative round, a plain decode
    step) as `bench_decode_profile.summarize` does: wall and busy ms, gaps, kernels, busy ms and count by kind."""
    from bench_decode_profile import summarize, traced_kernel_events

    if not _PROFILER_WARM:  # the first trace of a process pays the profiler's own start-up inside it
        traced_kernel_events(lambda: jax.block_until_ready(jnp.zeros(8) + 1))
        _PROFILER_WARM.append(True)

    def timed_call() -> tuple[Any, float]:
        t = time.perf_counter()
        res = fn()
        return res, time.perf_counter() - t

    (res, wall), events = traced_kernel_events(timed_call)
    if events is None:
        return {"error": "the profiler wrote no .xplane.pb"}
    n = max(1, units(res))
    out = summarize(events, n, 1e3 * wall / n)
    out["units"] = n
    return out


def tokens_per_round(k: int, alpha: float) -> float:
    """Expected tokens a round yields at i.i.d. acceptance alpha: 1 + alpha + ... + alpha^k (k + 1 at alpha 1)."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def projected(t_plain: float, t_draft: float, t_draft2: float, t_verify: float, k: int, alpha: float) -> float:
    return tokens_per_round(k, alpha) * t_plain / (t_draft2 + (k - 1) * t_draft + t_verify)


def loop_projected(row: dict[str, Any], alpha: float) -> float:
    """The speedup over plain decoding at acceptance alpha implied by the end-to-end loops alone: a round's measured
    time (tokens per round / speculative tokens/s) against the plain loop's step, assuming a round costs the same
    whatever it accepts (k draft steps, one verify and one commit run every round). Unlike `projected` it needs
    no separately compiled component (whose single steps can differ from the loop's: see the 1B reading in
    results/speculative_llama1b_xla.md); alpha 1 gives the ceiling, a draft that is always right."""
    return tokens_per_round(row["k"], alpha) / row["tokens_per_round"] * row["spec_tok_s"] / row["plain_tok_s"]


def prompt_groups(args: argparse.Namespace, tok: Any, vocab: int, b: int,
                  rng: np.random.Generator) -> list[list[list[int]]]:
    """Batches of b prompts: every --prompt text (chat template, the target's tokenizer) in order, the last batch
    filled up cyclically, so acceptance is measured on all of them at every batch size; else one batch of random
    ids."""
    if args.prompt and tok is not None:
        ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in args.prompt]
        n = -(-len(ids) // b) * b
        rows = [ids[r % len(ids)] for r in range(n)]
        return [rows[i:i + b] for i in range(0, n, b)]
    return [rng.integers(0, vocab, (b, args.prompt_len)).tolist()]


def divergence_margins(model: DecoderLM, cases: list[tuple[list[int], Any, int]]) -> list[float]:
    """For each (prompt ids, plain greedy tokens, first divergence p): the target's top-1 minus top-2 logit for the
    token at p after the common prefix (prompt + plain[:p]), by one full forward in the model's dtype. A small
    margin says the two decodings parted at a near-tie, where bf16 rounding of a (k+1)-token verify and a 1-token
    step may legitimately choose differently; a large one would point at a bug. One batch, right-padded (causal:
    padding after a position does not change it)."""
    if not cases:
        return []
    seqs = [list(map(int, prompt)) + [int(t) for t in np.asarray(plain)[:pos]] for prompt, plain, pos in cases]
    n = max(len(q) for q in seqs)
    toks = np.zeros((len(seqs), n), np.int32)
    mask = np.zeros((len(seqs), n), bool)
    for i, q in enumerate(seqs):
        toks[i, :len(q)], mask[i, :len(q)] = q, True
    top2 = _top2_at(model, jnp.asarray(toks), jnp.asarray(mask), jnp.asarray([len(q) - 1 for q in seqs]))
    return [float(m) for m in np.asarray(top2[:, 0] - top2[:, 1])]


@nnx.jit
def _top2_at(model: DecoderLM, toks: jax.Array, mask: jax.Array, last: jax.Array) -> jax.Array:
    h, _ = model.hidden(toks, token_mask=mask)
    logits = model.logits(h[jnp.arange(toks.shape[0]), last])  # (cases, vocab) fp32
    return jax.lax.top_k(logits, 2)[0]


def first_divergence(out: Any, plain: Any) -> int | None:
    """The first position where two token rows differ (a shorter row differs where it ends); None if equal."""
    out, plain = np.asarray(out), np.asarray(plain)
    n = min(len(out), len(plain))
    diff = np.flatnonzero(out[:n] != plain[:n])
    if diff.size:
        return int(diff[0])
    return None if len(out) == len(plain) else n


def _median_or_dash(xs: list[int] | None) -> str:
    return f"{statistics.median(xs):.0f}" if xs else "—"


def timed_groups(fn: Callable[[Any], Any], groups: list[Any], reps: int) -> float:
    """Seconds to run every group once: the sum of each group's median over ceil(reps / groups) timed runs (at
    least `reps` runs in all), after one warm-up run per group."""
    per = -(-reps // len(groups))
    return sum(timed(lambda g=g: fn(g), per) for g in groups)


def run_pair(name: str, target: DecoderLM, draft: DecoderLM, tok: Any, args: argparse.Namespace,
             deadline: Deadline, results: dict[str, Any], flush: Callable[[], None]) -> None:
    vocab = target.cfg.vocab_size
    gen = Generator(target)
    subset = (draft_vocabulary(vocab, args.draft_vocab, keep=tok.eos_token_ids if tok is not None else ())
              if args.draft_vocab else None)
    decoders = {m: SpeculativeDecoder(target, draft, draft_vocab=subset, slot_multiple=m)
                for m in args.slot_multiple}
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    rng = np.random.default_rng(0)
    for b in args.batch:
        if deadline.over():
            results["skipped"].append(f"{name} b={b}")
            continue
        groups = prompt_groups(args, tok, vocab, b, rng)
        plen = max(len(p) for g in groups for p in g)
        plain_out = [gen.run(g, sampling).tokens for g in groups]
        t_plain_e2e = timed_groups(lambda g: gen.run(g, sampling), groups, args.reps)
        for impl in args.impls:
            clear_spec_cache()  # traced under the other implementation otherwise
            with verify_impl(impl):
                if deadline.over():
                    results["skipped"].append(f"{name} b={b} {impl}")
                    continue
                kinds = (("decode", 1),) + tuple(("verify", k + 1) for k in args.k)
                # Each component compiles its own program (~10-20 s apiece for a 30-layer target on the H100):
                # real checkpoints can skip them and spend the call on the end-to-end runs.
                nan = float("nan")
                tc = (component_times(target, b, plen, kinds, args.reps) if args.components
                      else {kk: nan for kk in kinds})
                head = next(iter(decoders.values())).draft_head
                dcomp = (component_times(draft, b, plen, (("step", 1), ("verify", 2)), args.reps, head)
                         if args.components
                         else {("step", 1): nan, ("verify", 2): nan})
                for k, (mult, dec) in itertools.product(args.k, decoders.items()):
                    if deadline.over():
                        results["skipped"].append(f"{name} b={b} {impl} k={k} slots×{mult}")
                        continue
                    spec = lambda g, k=k, dec=dec: dec.run(g, k=k, max_new_tokens=args.new_tokens, stop=args.stop)
                    runs = [spec(g) for g in groups]
                    t_spec = timed_groups(spec, groups, args.reps)
                    pairs = [(out[r], plain[r]) for (out, _, _), plain in zip(runs, plain_out) for r in range(b)]
                    same = float(np.mean([(o == p).all() for o, p in pairs]))
                    firsts = [first_divergence(o, p) for o, p in pairs]
                    diverged = sorted(d for d in firsts if d is not None)
                    prompts = [g[r] for g in groups for r in range(b)]
                    margins = divergence_margins(target, [(q, p, d) for q, (_, p), d in zip(prompts, pairs, firsts)
                                                          if d is not None and d < len(p)])
                    stats = [st for _, _, st in runs]
                    t_plain, t_verify = tc[("decode", 1)], tc[("verify", k + 1)]
                    t_draft, t_draft2 = dcomp[("step", 1)], dcomp[("verify", 2)]
                    row = dict(shape=name, batch=b, k=k, impl=impl, slot_multiple=mult,
                               verify_choice=dispatch.last_choice("verify"),
                               kernel_choices=kernel_choices(),
                               prompts=len(groups) * b, plain_tok_s=len(groups) * b * args.new_tokens / t_plain_e2e,
                               spec_tok_s=len(groups) * b * args.new_tokens / t_spec,
                               measured_acceptance=float(np.mean([st.acceptance_rate for st in stats])),
                               tokens_per_round=float(np.mean([st.tokens_per_round for st in stats])),
                               drafts_per_round=float(np.mean([st.drafts_per_round for st in stats])),
                               rounds=int(sum(st.rounds for st in stats)),
                               compactions=int(sum(st.compactions for st in stats)), identical_share=same,
                               first_divergence=diverged, divergence_margins=sorted(margins),
                               t_plain_step=t_plain, t_verify=t_verify, t_draft_step=t_draft, t_draft_2tok=t_draft2,
                               projected_speedup={str(a): projected(t_plain, t_draft, t_draft2, t_verify, k, a)
                                                  for a in ALPHAS})
                    if args.profile:  # one more run of the first group, traced (compiled already)
                        g0 = groups[0]
                        row["profile"] = dict(
                            round=profile_run(lambda: spec(g0), lambda res: res[2].rounds),
                            plain_step=profile_run(lambda: gen.run(g0, sampling), lambda res: res.steps))
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    flush()  # a call cut short by its time limit still brings back every finished row
        clear_spec_cache()


def clear_spec_cache() -> None:
    """Drops the speculative loop's compiled programs, so the next run traces the verify op anew."""
    clear = getattr(spec_mod._speculate, "clear_cache", None)
    clear() if clear else jax.clear_caches()


def _margin(margins: list[float] | None) -> str:
    """Median (largest) of the divergence margins, "—" when none were recorded."""
    if not margins:
        return "—"
    return f"{float(np.median(margins)):.2f} ({max(margins):.2f})"


# the dispatchers a speculative run (and its plain baseline) goes through; `verify` is in `verify_choice`
CHOICE_OPS = ("decode_attention", "fused_decode", "mamba2_decode", "verify_attention", "mamba2_chunk")


def kernel_choices() -> dict[str, str | None]:
    """What each dispatcher picked at its latest trace in this process (None: never traced), and whether verify
    chunks may take the decode step's fused kernels here (`generate.verify_rows_fused`: the GPU flag and the
    environment; the models' fused modules decide where they apply)."""
    return {**dispatch.last_choices(*CHOICE_OPS), "verify_rows_fused": str(verify_rows_fused())}


def _slot_multiple(row: dict[str, Any]) -> int:
    """The row's cache rounding; rows saved before it was recorded ran the decoder's old one, the prompt multiple."""
    return int(row.get("slot_multiple", 16))


def render_md(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"# Speculative decoding ({results['device']}, {args.dtype}, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens, {results['date']})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
             + f". XLA_FLAGS `{results['xla_flags']}`. Command: `{results['command']}`. Wall "
             f"{results['wall_s']:.0f} s." + (f" Decode GEMMs: {results['decode_gemm']}; kernels not yet verified on a "
                                           f"GPU {'allowed' if results['unverified_kernels'] else 'off'}."
                                           if "decode_gemm" in results else ""), "",
             ("Real checkpoints: measured acceptance is the real one. " if results["real_models"] else
              "Random-init targets and drafts: measured acceptance is ~0 (worst case). ")
             + "`impl` = the Mamba multistep verify (kernel: the Pallas kernel, reference: `ops.ssd.ssd_verify`); "
             "`proj@a` is the speedup the measured component times give at acceptance rate a. `same` = share of rows "
             "whose speculative output equals plain greedy (bf16 rounding may legitimately differ); `diverge` = the "
             "median position (of the new tokens) where the rows that differ first differ, `margin` the median (and "
             "largest) top-1 minus top-2 logit of the target there (`divergence_margins`: small = a near-tie that "
             "rounding may flip). t_verify "
             "includes the commit (the second verify call that rebuilds the kept state). `loop@a` is the speedup at "
             "acceptance a implied by the end-to-end loops alone (`loop_projected`: a round's measured time against "
             "the plain loop's step; loop@1.0 = the ceiling, a draft that is always right). `drafts` = drafts "
             "proposed per round and row."
             + (f" The draft scores a reduced vocabulary (`--draft-vocab {args.draft_vocab}`: the first "
                f"{args.draft_vocab} ids and the end-of-turn ids, `speculative.draft_vocabulary`)."
                if args.draft_vocab else "")
             + (f" Rows stop drafting once the draft's top probability is below {args.stop} (`--stop`): `acc` is "
                "per proposed draft, and loop@a (which assumes every round drafts k) does not apply."
                if args.stop else ""),
             "",
             "| shape | batch | prompts | k | impl | slots× | plain tok/s | spec tok/s | acc | drafts | same | "
             "diverge | margin | t_step ms | t_verify ms | t_draft ms | " + " | ".join(f"proj@{a}" for a in ALPHAS)
             + " | " + " | ".join(f"loop@{a}" for a in LOOP_ALPHAS) + " |",
             "|" + "---|" * (16 + len(ALPHAS) + len(LOOP_ALPHAS))]
    for r in results["runs"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r.get('prompts', r['batch'])} | {r['k']} | {r['impl']} | "
                     f"{_slot_multiple(r)} | "
                     f"{r['plain_tok_s']:.0f} | "
                     f"{r['spec_tok_s']:.0f} | {r['measured_acceptance']:.2f} | "
                     f"{r.get('drafts_per_round', r['k']):.2f} | {r['identical_share']:.2f} | "
                     f"{_median_or_dash(r.get('first_divergence'))} | {_margin(r.get('divergence_margins'))} | "
                     f"{1e3 * r['t_plain_step']:.2f} | "
                     f"{1e3 * r['t_verify']:.2f} | {1e3 * r['t_draft_step']:.2f} | "
                     + " | ".join(f"{r['projected_speedup'][str(a)]:.2f}" for a in ALPHAS) + " | "
                     + " | ".join(f"{loop_projected(r, a):.2f}" for a in LOOP_ALPHAS) + " |")
    chosen = [r for r in results["runs"] if r.get("kernel_choices")]
    if chosen:
        lines += ["", "Kernels the dispatchers chose (latest trace before the row was written; "
                  "`pallas_kernels.dispatch.last_choice`):", ""]
        lines += [f"- {r['shape']} b={r['batch']} k={r['k']} {r['impl']} slots×{_slot_multiple(r)}: verify "
                  f"{r['verify_choice']}, "
                  + ", ".join(f"{op} {c}" for op, c in r["kernel_choices"].items()) for r in chosen]
    profiled = [r for r in results["runs"] if "profile" in r]
    if profiled:
        lines += ["", "Where a round and a plain step go (one profiled run of the first prompt group; ms per round / "
                  "per plain step, each run's prefills included, amortised; busy = union of the kernels' intervals; by "
                  "kind: ms (kernels)):", "",
                  "| shape | batch | k | impl | slots× | what | wall ms | busy ms | kernels | busy by kind |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in profiled:
            for what, pr in (("round", r["profile"]["round"]), ("plain step", r["profile"]["plain_step"])):
                head = f"| {r['shape']} | {r['batch']} | {r['k']} | {r['impl']} | {_slot_multiple(r)} | {what} | "
                if "error" in pr:
                    lines.append(head + f"{pr['error']} | | | |")
                    continue
                kinds = "; ".join(f"{kk} {v['ms']:.3f} ({v['count']:.0f})" for kk, v in pr["by_kind"].items())
                lines.append(head + f"{pr['wall_ms']:.3f} | {pr['busy_ms']:.3f} | {pr['kernels']:.0f} | {kinds} |")
    if results["skipped"]:
        lines += ["", f"**Deadline reached** (--deadline-s {args.deadline_s:.0f}): skipped "
                  + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke run: --shapes tiny --batch 1 2 --k 2 3 --prompt-len 16 --new-tokens 16 --reps 2")
    ap.add_argument("--shapes", nargs="+", default=["smollm2"], choices=sorted(SHAPES))
    ap.add_argument("--target", metavar="PATH", help="a real target (with --draft) instead of the random shapes")
    ap.add_argument("--draft", metavar="PATH", help="a real draft sharing the target's tokenizer")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text for real checkpoints (repeatable)")
    ap.add_argument("--heldout-prompts", type=int, default=0, metavar="N",
                    help="add N prompts of the held-out families (data.sources.heldout_prompts: never in training)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--k", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--impls", nargs="+", default=["kernel", "reference"], choices=["kernel", "reference"])
    ap.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                    help="the draft scores only the first N ids and the end-of-turn ids "
                    "(speculative.draft_vocabulary); 0: every id")
    ap.add_argument("--slot-multiple", nargs="+", type=int, default=[MAX_BLOCK], metavar="N",
                    help="round the speculative loop's KV caches up to a multiple of N slots (SpeculativeDecoder's "
                    f"slot_multiple; default {MAX_BLOCK}); several values: one row each, side by side")
    ap.add_argument("--stop", type=float, default=0.0, metavar="P",
                    help="rows stop drafting once the draft's top probability is below P (draft_round's `stop`)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-components", dest="components", action="store_false",
                    help="skip the per-component times (and the projected speedups): end-to-end runs only")
    ap.add_argument("--deadline-s", type=float, default=420.0,
                    help="start nothing new after this many seconds (a measurement in flight finishes)")
    ap.add_argument("--no-cmdbuf", action="store_true", help=f"do not add {CMDBUF} to XLA_FLAGS")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one speculative run and one plain run per row: where a round and a plain "
                    "step go (kernels by kind); implies --no-cmdbuf")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite the markdown of a saved result (JSON.md beside it) with this version's columns")
    return ap


def render_saved(path: Path) -> Path:
    """Rewrites the markdown of a saved speculative.json from its figures (the report's derived columns change
    with the script; the measurements do not), with the arguments its recorded command had. A hand-written
    reading already in the markdown (from its first `## ` heading on) is kept after the new tables."""
    results = json.loads(path.read_text())
    args = build_parser().parse_args(shlex.split(results["command"])[1:])
    md = path.with_suffix(".md")
    text = render_md(results, args)
    old = md.read_text() if md.is_file() else ""
    at = old.find("\n## ")
    if at >= 0:
        text = text.rstrip("\n") + "\n" + old[at:]
    md.write_text(text)
    return md


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.render:
        try:
            md = render_saved(args.render)
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, unreadable or not a result of this script
            ap.error(f"--render {args.render}: not a saved speculative.json ({type(e).__name__}: {e})")
        print(md.read_text())
        return
    dispatch.forget_choices(*CHOICE_OPS, "verify")  # the rows report this run's traces only
    if args.tiny:
        args.shapes, args.batch, args.k = ["tiny"], [1, 2], [2, 3]
        args.prompt_len, args.new_tokens, args.reps = 16, 16, 2
    if bool(args.target) != bool(args.draft):
        ap.error("--target and --draft go together")
    if args.profile:
        from bench_decode_profile import require_traced_loops

        require_traced_loops("bench_speculative --profile")
    # --profile: no command buffers, whose kernels the profiler does not see (and under which this run's traced plain
    # step crashed with CUDA_ERROR_LAUNCH_FAILED on the H100: results/decode_profile_s32_cmdbuf.md)
    device_flags(not (args.tiny or args.no_cmdbuf or args.profile))
    deadline = Deadline(args.deadline_s)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = dict(
        date=now(), device=device(),
        backend=jax.default_backend(), versions=versions(), dtype=args.dtype, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        real_models=bool(args.target), xla_flags=os.environ.get("XLA_FLAGS", ""),
        decode_gemm=decode_gemm(), unverified_kernels=dispatch.unverified_allowed(), runs=[], skipped=[])
    if args.heldout_prompts:
        from mamba_llama_jax.data.sources import heldout_prompts

        args.prompt = list(args.prompt) + heldout_prompts(args.heldout_prompts, 0)
        results["prompts"] = args.prompt

    def flush() -> None:
        results["wall_s"] = deadline.elapsed()
        (args.out / "speculative.json").write_text(json.dumps(results, indent=1))
        (args.out / "speculative.md").write_text(render_md(results, args))

    if args.target:
        target, tok = load_model(args.target, args.dtype)
        draft, _ = load_model(args.draft, args.dtype)
        run_pair(Path(args.target).name, target, draft, tok, args, deadline, results, flush)
    else:
        for shape in args.shapes:
            if deadline.over():
                results["skipped"].append(shape)
                continue
            target, draft = make_models(shape, args.dtype)
            run_pair(shape, target, draft, None, args, deadline, results, flush)
    flush()
    print((args.out / "speculative.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
