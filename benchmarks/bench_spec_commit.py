"""What a speculative round costs with each Mamba layer committed by its own multistep-verify call and conv-window
gather (`perlayer`, as before) against all Mamba2 layers of a model in one call and one gather (`batched`, the
default: `models.cache.advance_all`), side by side in one process, with the plain loop of the same target for
scale (issue 7).

Models (random weights, speed only; `bench_param_dtype.build`): the SmolLM2-135M-shaped 50 % Mamba2 hybrid as the
target and the 6-layer pure-Mamba2 student of that shape as the draft (the depth of the real draft,
`configs/recipes/smollm2-135m-draft.yaml`), bf16. Random prompts of `--prompt-len` tokens, greedy, `--new-tokens` with
EOS ignored. An unrelated random draft accepts ~0 tokens, so every round costs one draft pass and one verify + commit
for one token: `round ms` is the call's time over its rounds (the prefill included, amortised as in
`bench_speculative`), `round / step` that over the plain loop's ms a token, and `loop@a` the speedup a draft with
i.i.d. acceptance a would give at this round cost (`bench_speculative.loop_projected`; loop@1.0: always right).
Figures are medians of `--runs` timed calls after a warm-up; `same` = the side's tokens equal `perlayer`'s.
`--profile` adds one traced call per side (kernels and busy ms a round; needs command buffers off:
`XLA_FLAGS=--xla_gpu_enable_command_buffer=`).

    PYTHONPATH=$PWD python3 benchmarks/bench_spec_commit.py --k 2 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import device, now, versions  # noqa: E402
from mamba_llama_jax.inference.xla_flags import use_decode_flags  # noqa: E402

SIDES = ("perlayer", "batched")
LOOP_ALPHAS = (0.5, 0.7, 0.9, 1.0)


@contextlib.contextmanager
def commit(side: str) -> Iterator[None]:
    """`Pending.commit` with its Mamba layers advanced one call each (`perlayer`) or batched (the default)."""
    from mamba_llama_jax.inference import speculative as S

    keep = S.advance_all
    if side == "perlayer":
        S.advance_all = lambda chunks, acc: [c.advance(acc) for c in chunks]
    S._speculate.clear_cache()  # a traced loop keeps the commit it was traced with
    try:
        yield
    finally:
        S.advance_all = keep
        S._speculate.clear_cache()


def render_md(res: dict[str, Any]) -> str:
    lines = [f"# Speculative round: per-layer vs batched Mamba commit ({res['device']}, {res['date']})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
             + f". XLA_FLAGS `{res['xla_flags']}`. Command: `{res['command']}`. Wall {res.get('wall_s', 0):.0f} s.",
             "", f"{res['model_note']}; batch 1, prompt {res['prompt_len']}, {res['new_tokens']} new tokens (greedy, "
             f"EOS ignored); medians of {res['runs']} calls. Plain loop: {res['plain_ms_per_token']:.3f} ms a token. "
             "`round / step`: a round's ms over the plain loop's ms a token; `loop@a`: the speedup at i.i.d. "
             "acceptance a at this round cost; `same`: tokens equal `perlayer`'s.", "",
             "| k | side | rounds | round ms | round / step | " + " | ".join(f"loop@{a}" for a in LOOP_ALPHAS)
             + " | same | kernels / round | busy ms / round |",
             "|---|---|---|---|---|" + "---|" * len(LOOP_ALPHAS) + "---|---|---|"]
    for r in res["rows"]:
        prof = r.get("profile") or {}
        lines.append(f"| {r['k']} | {r['side']} | {r['rounds']} | {r['round_ms']:.3f} | {r['round_over_step']:.2f} | "
                     + " | ".join(f"{r['loop'][str(a)]:.2f}" for a in LOOP_ALPHAS)
                     + f" | {r.get('same', '-')} | {prof.get('kernels', float('nan')):.0f} | "
                     f"{prof.get('busy_ms', float('nan')):.3f} |")
    if res.get("skipped"):
        lines += ["", "Skipped (deadline): " + ", ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--profile", action="store_true", help="one traced call per row: kernels and busy ms a round")
    ap.add_argument("--deadline-s", type=float, default=480, help="rows not started by then are skipped")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, few tokens and runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="spec_commit")
    args = ap.parse_args(argv)
    if min(args.k) < 1:
        ap.error("--k must be positive")
    if args.tiny:
        args.prompt_len, args.new_tokens, args.runs = 16, 8, 2
    t0 = time.perf_counter()
    if args.profile:
        from bench_decode_profile import require_traced_loops

        require_traced_loops("bench_spec_commit --profile")
    else:
        use_decode_flags()

    import numpy as np
    from bench_param_dtype import build
    from bench_speculative import loop_projected, profile_run, timed

    from mamba_llama_jax.inference.generate import Generator, SamplingConfig
    from mamba_llama_jax.inference.speculative import SpeculativeDecoder

    target, draft = build("hybrid50", "bfloat16", args.tiny), build("draft6", "bfloat16", args.tiny)
    dec, gen = SpeculativeDecoder(target, draft), Generator(target)
    prompt = np.random.default_rng(0).integers(0, target.cfg.vocab_size, args.prompt_len).tolist()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    t_plain = timed(lambda: gen.run([prompt], sampling), args.runs)
    res: dict[str, Any] = dict(
        date=now(), device=device(), versions=versions(), xla_flags=os.environ.get("XLA_FLAGS", ""),
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, runs=args.runs,
        model_note=("tiny random models" if args.tiny else "SmolLM2-135M-shaped 50 % Mamba2 hybrid target, 6-layer "
                    "pure-Mamba2 draft, random weights, bf16"),
        plain_ms_per_token=1e3 * t_plain / args.new_tokens, rows=[], skipped=[])
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        res["wall_s"] = time.perf_counter() - t0
        (args.out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
        (args.out / f"{args.stem}.md").write_text(render_md(res))

    for k in args.k:
        ref = None
        for side in args.sides:
            if time.perf_counter() - t0 > args.deadline_s:
                res["skipped"].append(f"k={k} {side}")
                continue
            with commit(side):
                run = lambda: dec.run([prompt], k=k, max_new_tokens=args.new_tokens)
                tokens, _, stats = run()  # compiles; timed() needs no warm-up of its own then
                t = timed(run, args.runs, warmup=0)
                row: dict[str, Any] = dict(k=k, side=side, rounds=stats.rounds, seconds=t,
                                           acceptance=stats.acceptance_rate, tokens_per_round=stats.tokens_per_round)
                row["round_ms"] = 1e3 * t / stats.rounds
                row["round_over_step"] = row["round_ms"] / res["plain_ms_per_token"]
                loop_row = dict(k=k, tokens_per_round=stats.tokens_per_round,
                                spec_tok_s=args.new_tokens / t, plain_tok_s=args.new_tokens / t_plain)
                row["loop"] = {str(a): loop_projected(loop_row, a) for a in LOOP_ALPHAS}
                if ref is None:
                    ref = tokens
                else:
                    row["same"] = bool((tokens == ref).all())
                if args.profile:
                    row["profile"] = profile_run(run, lambda out: out[2].rounds)
            res["rows"].append(row)
            print(json.dumps({x: v for x, v in row.items() if x != "profile"}), flush=True)
            save()  # a run cut short keeps every finished row
    save()
    print(render_md(res))


if __name__ == "__main__":
    main()
