"""Speculative vs plain greedy decoding of a hybrid target, side by side in one run (issue 7).

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 benchmarks/bench_speculative.py --out benchmarks/results
    PYTHONPATH=$PWD python3 benchmarks/bench_speculative.py --shapes tiny --out /tmp/spec   # CPU smoke run

No distilled draft exists yet, so the models are random-init and shaped like the real ones:
- `llama1b`: a Llama-3.2-1B-shaped hybrid target (50 % attention, Mamba2) with a 4-layer pure-Mamba draft of the
  same vocabulary (hidden 512);
- `smollm2`: a SmolLM2-135M-shaped hybrid target (50 % attention) with a 2-layer pure-Mamba draft.
Random weights make acceptance meaningless (an unrelated draft accepts ~0 tokens), so the script reports two
things, both per batch size and k:
1. measured end to end: tokens/s of plain greedy (`generate.Generator`) and of `SpeculativeDecoder` with the
   random draft (acceptance ~0, the worst case: every round costs a draft pass and a verify for one token), plus the
   check that both give identical tokens;
2. component times (one plain target decode step, one draft step, one draft 2-token step, one target verify of
   k+1 tokens, all at the same cache fill) and the speedup they imply at fixed acceptance rates alpha, with
   tokens/round = (1 - alpha^(k+1)) / (1 - alpha) (i.i.d. acceptance, Leviathan et al. 2023):
   speedup = tokens/round * t_plain / (t_draft2 + (k-1) * t_draft + t_verify).
With a distilled draft, pass it through `make_models` and (1) becomes the real measurement.
Writes <out>/speculative.json and <out>/speculative.md. Median of --reps timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig
from mamba_llama_jax.convert.from_attention import build_hybrid
from mamba_llama_jax.inference.generate import Generator, SamplingConfig, prepare_for_inference
from mamba_llama_jax.inference.speculative import SpeculativeDecoder, verify
from mamba_llama_jax.models.llama import DecoderLM, LlamaLM

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
    "tiny": dict(  # CPU smoke test of the script itself
        target=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                    max_position_embeddings=1024),
        draft=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                   max_position_embeddings=1024)),
}
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)


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


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median wall seconds of fn() (which must block), after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def component_times(model: DecoderLM, batch: int, prompt_len: int, chunks: tuple[int, ...], reps: int
                    ) -> dict[int, float]:
    """Seconds of one forward of `t` tokens (1 = a plain decode step, else a verify call) from a cache holding
    `prompt_len` tokens, for each t in chunks. Each timed call runs 16 forwards in a fori_loop so launch overhead
    of the host call is amortised, and restarts from the same cache each time (the fill stays fixed)."""
    graphdef, state, _ = prepare_for_inference(model)
    slots = prompt_len + 64

    @jax.jit
    def prefill(state: Any, tok: jax.Array) -> Any:
        m = nnx.merge(graphdef, state)
        return m.hidden(tok, cache=m.init_cache(batch, slots), prefill=True)[1]

    cache = prefill(state, jnp.ones((batch, prompt_len), jnp.int32))
    out = {}
    for t in chunks:
        @jax.jit
        def run(state: Any, cache: Any, t: int = t) -> jax.Array:
            m = nnx.merge(graphdef, state)

            def body(i: jax.Array, acc: jax.Array) -> jax.Array:
                tok = jnp.full((batch, t), i % 7, jnp.int32)
                if t == 1:
                    h, _ = m.hidden(tok, cache=cache)
                    logits = m.logits(h)
                else:
                    logits, _ = verify(m, tok, cache)
                return acc + jnp.argmax(logits[:, -1], axis=-1)
            return jax.lax.fori_loop(0, 16, body, jnp.zeros((batch,), jnp.int32))

        out[t] = timed(lambda: jax.block_until_ready(run(state, cache)), reps) / 16
    return out


def projected(t_plain: float, t_draft: float, t_draft2: float, t_verify: float, k: int, alpha: float) -> float:
    per_round = (1 - alpha ** (k + 1)) / (1 - alpha)
    return per_round * t_plain / (t_draft2 + (k - 1) * t_draft + t_verify)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama1b", "smollm2"], choices=sorted(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--k", nargs="+", type=int, default=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__,
        dtype=args.dtype, prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=[])
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        target, draft = make_models(shape, args.dtype)
        vocab = target.cfg.vocab_size
        gen = Generator(target)
        dec = SpeculativeDecoder(target, draft)
        sampling = SamplingConfig(max_new_tokens=args.new_tokens)
        for b in args.batch:
            prompts = rng.integers(0, vocab, (b, args.prompt_len)).tolist()
            plain_out = gen.run(prompts, sampling)
            t_plain_e2e = timed(lambda: gen.run(prompts, sampling), args.reps)
            tc = component_times(target, b, args.prompt_len, (1,) + tuple(k + 1 for k in args.k), args.reps)
            dcomp = component_times(draft, b, args.prompt_len, (1, 2), args.reps)
            for k in args.k:
                spec_out, _, st = dec.run(prompts, k=k, max_new_tokens=args.new_tokens)
                t_spec = timed(lambda: dec.run(prompts, k=k, max_new_tokens=args.new_tokens), args.reps)
                same = float(np.mean([(spec_out[r] == plain_out.tokens[r]).all() for r in range(b)]))
                row = dict(shape=shape, batch=b, k=k,
                           plain_tok_s=b * args.new_tokens / t_plain_e2e, spec_tok_s=b * args.new_tokens / t_spec,
                           measured_acceptance=st.acceptance_rate, rounds=st.rounds, compactions=st.compactions,
                           identical_share=same, t_plain_step=tc[1], t_verify=tc[k + 1], t_draft_step=dcomp[1],
                           t_draft_2tok=dcomp[2],
                           projected_speedup={str(a): projected(tc[1], dcomp[1], dcomp[2], tc[k + 1], k, a)
                                              for a in ALPHAS})
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    (args.out / "speculative.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Speculative decoding ({results['device']}, {args.dtype}, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens, {results['date']})", "",
             "Random-init targets and drafts: measured acceptance is ~0 (worst case); `proj@a` is the speedup the "
             "measured component times give at acceptance rate a. `same` = share of rows whose speculative "
             "output equals plain greedy (bf16 rounding may legitimately differ).", "",
             "| shape | batch | k | plain tok/s | spec tok/s | acc | same | t_step ms | t_verify ms | t_draft ms | "
             + " | ".join(f"proj@{a}" for a in ALPHAS) + " |",
             "|" + "---|" * (10 + len(ALPHAS))]
    for r in results["runs"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['k']} | {r['plain_tok_s']:.0f} | {r['spec_tok_s']:.0f} | "
                     f"{r['measured_acceptance']:.2f} | {r['identical_share']:.2f} | {1e3 * r['t_plain_step']:.2f} | "
                     f"{1e3 * r['t_verify']:.2f} | {1e3 * r['t_draft_step']:.2f} | "
                     + " | ".join(f"{r['projected_speedup'][str(a)]:.2f}" for a in ALPHAS) + " |")
    (args.out / "speculative.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
