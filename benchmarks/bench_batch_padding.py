"""Batch padding in `Generator.run` (`generate.PAD_BATCH_BY_BATCH`), end to end: the same prompts decoded with the
padding on and off (MAMBA_LLAMA_DECODE_PAD_BATCH), side by side in one process.

For each batch: random prompts of `--prompt-len` tokens, greedy, `--new-tokens` new tokens with EOS ignored (fixed
work on both sides), the SmolLM2-135M shape with random bf16 weights (speed only) or `--teacher`. A side's figure is
the median over `--runs` timed calls (one warm-up call first, which compiles) of `GenerationOutput.decode_s / steps`
(the decode loop alone, blocked until ready) and of `prefill_s`. The rows each side decoded (`Generator.decode_batch`)
are recorded, and so is whether the two sides' tokens agree (bf16: the padded step runs other kernels, so rounding
may legitimately differ; the fp32 equality is a test). XLA_FLAGS get the decode commands' flags
(`xla_flags.use_decode_flags`), as the CLI's.

    PYTHONPATH=$PWD python3 benchmarks/bench_batch_padding.py --batches 5,8,12,24,48 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import device, now, versions  # noqa: E402
from mamba_llama_jax.inference.xla_flags import use_decode_flags  # noqa: E402


def measure(gen: Any, prompts: list[list[int]], sampling: Any, runs: int) -> dict[str, Any]:
    """Median decode ms a step and prefill ms of `gen.run(prompts)` over `runs` calls after a warm-up."""
    first = gen.run(prompts, sampling)
    dec, pre = [], []
    for _ in range(runs):
        out = gen.run(prompts, sampling)
        dec.append(out.decode_s / max(1, out.steps))
        pre.append(out.prefill_s)
    return {"rows": gen.decode_batch(len(prompts), sampling.max_new_tokens),
            "decode_ms_per_step": statistics.median(dec) * 1e3, "prefill_ms": statistics.median(pre) * 1e3,
            "runs": runs, "tokens": first.tokens}


def parse_batches(ap: argparse.ArgumentParser, value: str) -> list[int]:
    """--batches as positive integers, or the parser's usage error."""
    try:
        batches = [int(b) for b in value.split(",")]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {value!r}")
    if not batches or min(batches) < 1:
        ap.error("--batches must be positive")
    return batches


def render_md(res: dict[str, Any]) -> str:
    lines = [f"# Batch padding in Generator.run ({res['device']}, {res['date']})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
             + f". XLA_FLAGS `{res['xla_flags']}`. Command: `{res['command']}`.", "",
             f"{res['model']}; prompt {res['prompt_len']}, {res['new_tokens']} new tokens (greedy, EOS ignored); "
             "median of the timed calls. `rows` = the rows `Generator.decode_batch` decoded; `same` = whether the "
             "two sides' tokens agree.", "",
             "| batch | rows off | rows on | decode ms/step off | on | tokens/s off | on | on / off speed | "
             "prefill ms off | on | same |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        off, on = r["off"], r["on"]
        tps = lambda side: r["batch"] / side["decode_ms_per_step"] * 1e3  # noqa: E731
        lines.append(f"| {r['batch']} | {off['rows']} | {on['rows']} | {off['decode_ms_per_step']:.3f} | "
                     f"{on['decode_ms_per_step']:.3f} | {tps(off):,.0f} | {tps(on):,.0f} | "
                     f"{off['decode_ms_per_step'] / on['decode_ms_per_step']:.2f}x | {off['prefill_ms']:.2f} | "
                     f"{on['prefill_ms']:.2f} | {r['same']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="5,8,12,24,48")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--teacher", default=None, help="a GGUF file or HF directory instead of random weights")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, few tokens and runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="batch_padding")
    args = ap.parse_args(argv)
    batches = parse_batches(ap, args.batches)
    if args.tiny:  # new tokens: as few as the padding takes (generate.PAD_MIN_NEW_TOKENS)
        args.prompt_len, args.new_tokens, args.runs = 16, 32, 2
    flags = use_decode_flags()

    import numpy as np

    from bench_generate import _jax_model
    from mamba_llama_jax.inference import generate as G

    model = _jax_model(args.teacher, args.tiny)
    gen = G.Generator(model)
    sampling = G.SamplingConfig(max_new_tokens=args.new_tokens)
    rng = np.random.default_rng(0)
    res: dict[str, Any] = dict(date=now(), device=device(), versions=versions(), xla_flags=os.environ.get(
        "XLA_FLAGS", ""), decode_flags=flags, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        model=args.teacher or ("tiny random Llama" if args.tiny else "SmolLM2-135M shape, random bf16 weights"),
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, rows=[])
    args.out.mkdir(parents=True, exist_ok=True)
    for b in batches:
        prompts = rng.integers(0, gen.cfg.vocab_size, (b, args.prompt_len)).tolist()
        row: dict[str, Any] = {"batch": b}
        for side, env in (("off", "0"), ("on", "1")):
            os.environ[G.PAD_BATCH_ENV] = env
            row[side] = measure(gen, prompts, sampling, args.runs)
        os.environ.pop(G.PAD_BATCH_ENV)
        row["same"] = bool((row["off"].pop("tokens") == row["on"].pop("tokens")).all())
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        (args.out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
        (args.out / f"{args.stem}.md").write_text(render_md(res))
    print(render_md(res))


if __name__ == "__main__":
    main()
