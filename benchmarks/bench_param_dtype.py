"""Decode speed of checkpoints as the CLI loads them: parameters stored in fp32, computing in bf16.

`load_teacher` and `import_mambainllama` give fp32 parameters (exact widenings of the stored tensors); the
`Generator`'s inference copy (`generate.prepare_for_inference`) casts every weight matrix the model casts on each call
to the compute dtype, so a decode step reads bf16 weights. Until 513cdcc that cast matched no parameter (flax's state
paths end in the Variable's `.value`), and every loaded checkpoint decoded with fp32 weights. Sides, one process:

- `cast`: fp32 parameters through today's `Generator` (what `run.py generate / speculate` run);
- `uncast`: the same model with the inference copy's cast skipped (the behaviour before 513cdcc: what it cost);
- `bf16`: parameters created in bf16 (the form every other decode benchmark times).

Models (random weights, speed only): `teacher` (SmolLM2-135M shape), `hybrid50` (its 50 % Mamba2 hybrid) and
`draft6` (a 6-layer pure-Mamba2 student of that shape, the speculative draft's). Random prompts of `--prompt-len`
tokens, greedy, `--new-tokens` with EOS ignored; a side's figure is the median over `--runs` timed calls (after one
warm-up call, which compiles) of `GenerationOutput.decode_s / steps`. `same`: whether a side's tokens equal `cast`'s
(`uncast` casts the same bf16 values inside the step, but XLA may fuse that convert into another GEMM kernel with
other rounding; `bf16` starts from other random weights).

    PYTHONPATH=$PWD python3 benchmarks/bench_param_dtype.py --batches 1,64 --out benchmarks/results
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

from bench_batch_padding import measure, parse_batches  # noqa: E402
from bench_env import device, now, versions  # noqa: E402
from mamba_llama_jax.inference.xla_flags import use_decode_flags  # noqa: E402

SIDES = ("cast", "uncast", "bf16")
MODELS = ("teacher", "hybrid50", "draft6")
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
               head_dim=64, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
            max_position_embeddings=1024)


def build(name: str, param_dtype: str, tiny: bool) -> Any:
    """A random-init model of the named kind, computing in bf16 with parameters in `param_dtype`."""
    from flax import nnx

    from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.models.llama import LlamaLM

    shape = dict(TINY if tiny else SMOLLM2)
    if name == "draft6":
        shape["num_layers"] = 2 if tiny else 6
    cfg = LlamaConfig(**shape, dtype="bfloat16", param_dtype=param_dtype)
    llama = LlamaLM(cfg, rngs=nnx.Rngs(0))
    if name == "teacher":
        return llama
    fraction = 0.5 if name == "hybrid50" else 0.0
    return build_hybrid(llama, HybridConfig(attn_fraction=fraction, mamba=MambaConfig(variant="mamba2")),
                        rngs=nnx.Rngs(1))


@contextlib.contextmanager
def cast_skipped() -> Iterator[None]:
    """`prepare_for_inference` with its cast matching no parameter, as before 513cdcc."""
    from mamba_llama_jax.inference import generate as G

    keep = G._param_name
    G._param_name = lambda path: None
    try:
        yield
    finally:
        G._param_name = keep


def weight_bytes(gen: Any) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(gen.state) if hasattr(x, "dtype")))


def render_md(res: dict[str, Any]) -> str:
    sides = res["sides"]
    lines = [f"# Decode with checkpoint-loaded (fp32) parameters ({res['device']}, {res['date']})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
             + f". XLA_FLAGS `{res['xla_flags']}`. Command: `{res['command']}`. Wall {res.get('wall_s', 0):.0f} s.",
             "", f"{res['model_note']}; prompt {res['prompt_len']}, {res['new_tokens']} new tokens (greedy, EOS "
             "ignored); decode ms a step = median of the timed calls. `MB` = the inference copy's parameter bytes. "
             "`x cast` = a side's step time over `cast`'s; `same` = its tokens equal `cast`'s.", "",
             "| model | batch | " + " | ".join(f"{s} ms/step | {s} MB | {s} x cast | {s} same" for s in sides) + " |",
             "|---|---|" + "---|---|---|---|" * len(sides)]
    for r in res["rows"]:
        base = r.get("cast", {}).get("decode_ms_per_step")
        cells = []
        for s in sides:
            v = r.get(s)
            if v is None:
                cells.append("- | - | - | -")
                continue
            ratio = f"{v['decode_ms_per_step'] / base:.2f}" if base else "-"
            cells.append(f"{v['decode_ms_per_step']:.3f} | {v['param_mb']:.1f} | {ratio} | {v.get('same', '-')}")
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + " |")
    if res.get("skipped"):
        lines += ["", "Skipped (deadline): " + ", ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


def _csv(ap: argparse.ArgumentParser, value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [x for x in value.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if not items or bad:
        ap.error(f"{flag} takes a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return items


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--deadline-s", type=float, default=540, help="rows not started by then are skipped")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, few tokens and runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="param_dtype")
    args = ap.parse_args(argv)
    models = _csv(ap, args.models, MODELS, "--models")
    sides = _csv(ap, args.sides, SIDES, "--sides")
    batches = parse_batches(ap, args.batches)
    if args.tiny:
        args.prompt_len, args.new_tokens, args.runs = 16, 8, 2
    t0 = time.perf_counter()
    flags = use_decode_flags()

    import numpy as np

    from mamba_llama_jax.inference import generate as G

    sampling = G.SamplingConfig(max_new_tokens=args.new_tokens)
    res: dict[str, Any] = dict(
        date=now(), device=device(), versions=versions(), xla_flags=os.environ.get("XLA_FLAGS", ""),
        decode_flags=flags, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), sides=sides,
        model_note="tiny random models" if args.tiny else "SmolLM2-135M shape, random weights, bf16 compute",
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, rows=[], skipped=[])
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        res["wall_s"] = time.perf_counter() - t0
        (args.out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
        (args.out / f"{args.stem}.md").write_text(render_md(res))

    for name in models:
        fp32 = build(name, "float32", args.tiny)

        def generator(side: str) -> Any:
            if side == "bf16":
                return G.Generator(build(name, "bfloat16", args.tiny))
            with cast_skipped() if side == "uncast" else contextlib.nullcontext():
                return G.Generator(fp32)

        gens = {s: generator(s) for s in sides}
        rng = np.random.default_rng(0)
        for b in batches:
            if time.perf_counter() - t0 > args.deadline_s:
                res["skipped"].append(f"{name} b={b}")
                continue
            prompts = rng.integers(0, fp32.cfg.vocab_size, (b, args.prompt_len)).tolist()
            row: dict[str, Any] = {"model": name, "batch": b}
            for s, gen in gens.items():
                row[s] = dict(measure(gen, prompts, sampling, args.runs), param_mb=weight_bytes(gen) / 1e6)
            ref = row.get("cast", {}).get("tokens")
            for s in gens:
                toks = row[s].pop("tokens")
                if ref is not None and s != "cast":
                    row[s]["same"] = bool((toks == ref).all())
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()  # a run cut short keeps every finished row
    save()
    print(render_md(res))


if __name__ == "__main__":
    main()
