"""Where a decode step's time goes (issue 3): the whole jitted decode loop of the SmolLM2-shaped teacher (random
weights) and of its 50 % hybrid, profiled, per step: host wall time, device busy time (the union of all kernels'
intervals), the idle gaps between kernels (wall − busy), the number of kernels, and busy time by kind of kernel
(the project's Pallas kernels by name; XLA fusions, cuBLAS calls and copies grouped).

The 164-kernel batch-1 step took 0.918 ms on the H100 while its four fused GEMVs per layer take ~11 µs of device
time (`results/fused_decode.md`), so the rest is decode attention, the other kernels, or the gaps between dependent
launches; this tells which, and so whether fewer kernels per layer (one per layer half) is the lever.

    python benchmarks/bench_decode_profile.py --out benchmarks/results            # device
    python benchmarks/bench_decode_profile.py --tiny --out /tmp/decode_profile    # CPU smoke test
    # decode-path variants side by side in one run (the teacher, batch 1):
    python benchmarks/bench_decode_profile.py --models teacher --batches 1 --variants default,bn1w1,c16,bn1w1+c16,xla

The loop runs without command buffers around the while loop (bench_generate's `fused_nocmdbuf`, not its `fused`, nor
`run.py`'s decoding commands, which add `--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL`: 2.3 % faster at
batch 64 on the H100, results/generate_s32.md): the profiler does not see the kernels of a loop recorded as a CUDA
graph (results/decode_profile_s32_cmdbuf.md), so XLA_FLAGS that record it stop this script before it compiles.
Its default decode is also shorter (128 new tokens against the table's 256, so a cache filled 192 slots deep on
average rather than 256): at batch 64 on the H100 its step read 0.802 ms where `fused_nocmdbuf` read 0.840 on the
same machine (decode_profile_s32.md, generate_s32.md): 64 more filled slots a row are ~94 MB more K/V a step, ~0.038
ms at that machine's 2,498 GB/s, the whole gap. `--new-tokens 256` measures the table's work.

A variant is `default` or `+`-joined settings, each traced anew: `bnNwM` = N outputs per program and M warps on the
fused GEMVs' 1-D path, `cN` = N outputs per program for the split-merging o-projection (`fused_decode.tiling`),
`xla` = fused GEMVs off (MAMBA_LLAMA_FUSED_DECODE=0), `uv` = kernels not yet verified on the GPU allowed
(MAMBA_LLAMA_UNVERIFIED_KERNELS=1: kernels whose file says GPU_VERIFIED = False), `cublas` = the decode program's
GEMMs on cuBLAS (MAMBA_LLAMA_DECODE_GEMM=cublas: `generate.decode_gemm`), `fdN` = fused GEMVs up to batch N, `sN` =
N attention splits, `abN` / `awN` / `asN` = N-slot attention blocks / N warps / N pipeline stages per attention
program, `ahN` = N query heads an attention program (of its KV head's group: `decode_attention.HEADS_BY_BATCH`),
`adot` / `aew` = the attention kernel's tensor-core / elementwise form (`decode_attention.planned_dot`),
`ana` / `anb` = its tensor-core form taking the new token after the block loop / substituted into its block
(`decode_attention.NEWEST_BY_BATCH`),
`amk` / `amx` = the splits of the unfused decode path (batches above the fused GEMVs') merged by the Pallas
merge kernel / by XLA (the default) (`decode_attention.override_plan`),
`sw` / `sf` = the attention splits share the window's blocks (as up to session 22) / the filled blocks (the default,
`decode_attention.SHARES`), `mk` / `mx` / `mc` = the splits merged by
`decode_attention.merge_partials_pallas` (the default) / by XLA before the o-projection, or in its prologue
(`fused_decode.tiling(merge=...)`), `gN` / `dbN` = N rows / outputs per program on the fused dot path
(`fused_decode.dot_group` / `fused_decode.pick_block_n`), `kqN` = past the fused GEMVs' batches, the q·k·v GEMM as N
split-K partials summed in the attention kernel's prologue, RMSNorm folded across (`inference.split_k`: N = 0 / 1 is
XLA's own GEMM and norm), `gu` / `gux` = past the fused GEMVs' batches, gate·up +
SiLU·mul in one kernel on XLA's normalised rows (the default at 16 and 32 rows until session 34) / XLA's GEMM and
fusion (`inference.gate_up_rows`), `guw` = the `weighed` MLP form: the o-projection + residual in one kernel writing
the rows times the MLP norm's weight, gate·up taking them and the norm's row scale after its dots (no norm launch; the
default at 16, 32 and 64 rows: `gate_up_rows.DEFAULT_FORM`), `sqg` / `sqo` = in that form, the rows' sums of squares
taken beside gate·up's dots / written by the o-projection kernel as partials (the default since session 28:
`fused_decode.tiling(squares=...)`),
`lmk` = greedy ids from `pallas_kernels.lm_head_argmax` (the LM head + argmax in one kernel, opt-in:
MAMBA_LLAMA_LM_HEAD_KERNEL=1) rather than XLA's GEMM and argmax,
`hw` = every layer reads layer 0's weight arrays, so they stay in L2 across the step (a diagnostic: the step with
its weights never read from HBM), `dsN` / `dkN` = N pipeline stages / at most N of K a step of the fused dot path's
K loop
(`fused_decode.tiling(dot_stages=, dot_k=)`; `gN`, `dbN`, `dsN` and `dkN` apply to the gate·up kernel too, whose
own default is row groups of 16, 32 outputs, 4 stages (8 at 16 rows), K steps of 64:
`fused_decode.GATE_UP_TILING`).
(Variants measured once and removed since: `u` / `dwN`, the dot path's K loop unrolled / its warps, in
results/decode_dot.md; `amu`, the attention splits merged split by split without a reduction, in
results/decode_profile_s24_b64.md; `apv1`, the attention's p·V with p in one rounded part, in
results/decode_profile_s26_b64.md; `apf` / `apn`, the attention kernel touching the layer's next weights so that
they wait in L2 (or not), in results/decode_profile_s27_prefetch.md; `vpN`, the attention loop reading the next block
ahead, in results/decode_profile_s20_vp_gu.md and decode_profile_s24_b64_stages.md; `guf`, the step's five-launch
`fold` form past the fused GEMVs' batches (norm weights folded into the next projections), in
results/decode_profile_s22_fold.md; `pdl`, every Pallas kernel executing `griddepcontrol.launch_dependents` and
`griddepcontrol.wait` first, and `wdk`, the `weighed` form's down projection + residual as one Pallas launch, in
results/generate_s29_lm_pdl.md and generate_s29_wdk.md; `afe`, the attention kernel's first block loaded at its start,
before the prologue, in results/generate_s32.md and decode_profile_s32.md; `pfo` / `pfoe` / `pfs` / `pfn` / `pfl`, the
`weighed` form's kernels pulling the next kernels' weights into L2 (`pallas_kernels/l2_prefetch.py`: Hopper's bulk
prefetch, or one `prefetch.global.L2` a line), in results/decode_profile_s30_prefetch.md and decode_profile_s32.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Kernel names as the GPU trace shows them: Pallas kernels carry their pallas_call name.
KINDS = (
    # a speculative verify chunk's attention is decode attention over k+1 rows (its "verify" is not the Mamba op's)
    ("decode attention", re.compile(r"decode_attention|verify_attention")),
    ("fused GEMVs", re.compile(r"norm_matmul|gate_up|matmul_residual|attn_combine")),
    ("LM head", re.compile(r"lm_head")),
    ("Mamba kernels", re.compile(r"multistep|ssd|selective|mamba2_decode|mamba2_chunk")),
    # nvjet_*: the names cuBLAS's GEMMs took on the H100 (decode_profile_s35_cublas.json)
    ("cuBLAS / GEMM", re.compile(r"gemm|gemv|cublas|cutlass|matmul|sm90_xmma|nvjet", re.I)),
    ("copies / memset", re.compile(r"copy|memset|memcpy", re.I)),
    ("XLA fusions", re.compile(r"fusion|triton|reduce|loop_|input_|wrapped", re.I)),
)
_SKIP_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Framework", "Source code", "python")


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if pat.search(name):
            return kind
    return "other"


def kernel_events(planes: Iterable[Any]) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of every kernel on the first GPU's streams; without a GPU (the CPU smoke test),
    the XLA executor events of the host plane."""
    planes = list(planes)
    gpus = [p for p in planes if p.name.startswith("/device:") and "CPU" not in p.name]
    if gpus:
        lines = [ln for ln in gpus[0].lines if ln.name.startswith("Stream")] or \
                [ln for ln in gpus[0].lines if not ln.name.startswith(_SKIP_LINES)]
    else:
        lines = [ln for p in planes for ln in p.lines if ln.name.startswith("tf_XLAExecute")]
    return [(e.name, int(e.start_ns), int(e.end_ns)) for ln in lines for e in ln.events]


def summarize(events: list[tuple[str, int, int]], steps: int, wall_ms_per_step: float) -> dict[str, Any]:
    """Per decode step: busy ms (union of intervals), gap ms (wall − busy), overlap ms (the kernels' summed
    durations − busy: kernels on the GPU at once, e.g. one launched early waiting for the one before it), kernels,
    busy ms and count by kind, and the ten kernels that took the most time."""
    from train_scaling import _length, _union

    busy = _length(_union((s, e) for _, s, e in events)) / 1e6 / steps
    by_kind: dict[str, list[float]] = {}
    by_name: dict[str, float] = {}
    for name, s, e in events:
        k = by_kind.setdefault(kind_of(name), [0.0, 0])
        k[0] += (e - s) / 1e6 / steps
        k[1] += 1 / steps
        by_name[name[:80]] = by_name.get(name[:80], 0.0) + (e - s) / 1e6 / steps
    summed = sum(e - s for _, s, e in events) / 1e6 / steps
    return {"wall_ms": wall_ms_per_step, "busy_ms": busy, "gap_ms": max(wall_ms_per_step - busy, 0.0),
            "overlap_ms": max(summed - busy, 0.0),
            "kernels": len(events) / steps,
            "by_kind": {k: {"ms": v[0], "count": v[1]} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
            "top_kernels_ms": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:10])}


def require_traced_loops(who: str) -> None:
    """Stops a profiling run before it compiles anything when XLA_FLAGS put while loops in command buffers: the
    profiler would see none of the decode loop's kernels (results/decode_profile_s32_cmdbuf.md)."""
    from mamba_llama_jax.inference.xla_flags import COMMAND_BUFFER, loops_in_command_buffers

    if loops_in_command_buffers(os.environ.get("XLA_FLAGS", "")):
        raise SystemExit(f"{who}: XLA_FLAGS record while loops as CUDA graphs ({os.environ['XLA_FLAGS']!r}), whose "
                         f"kernels the profiler does not see; profile without them (e.g. XLA_FLAGS={COMMAND_BUFFER}=)")


def traced_kernel_events(fn: Callable[[], Any]) -> tuple[Any, list[tuple[str, int, int]] | None]:
    """(fn's result, the kernel events of running it under the profiler (`kernel_events`)); events None if the
    profiler wrote no trace."""
    import jax
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="decode_profile_")
    try:
        with jax.profiler.trace(d):
            res = fn()
        files = list(Path(d).rglob("*.xplane.pb"))
        return res, kernel_events(ProfileData.from_file(str(files[0])).planes) if files else None
    finally:
        shutil.rmtree(d, ignore_errors=True)


def shared_layer_weights(state: Any) -> Any:
    """`state` with every layer's arrays replaced by layer 0's where shape and dtype match (the `hw` variant)."""
    import jax

    def key(path: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:  # (the path in layer 0, the layer or None)
        names = [getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))) for p in path]
        if "layers" not in names or names.index("layers") + 1 == len(names):
            return tuple(names), None
        at = names.index("layers") + 1
        return tuple(names[:at] + [0] + names[at + 1:]), names[at]

    first = {k: x for p, x in jax.tree_util.tree_flatten_with_path(state)[0] for k, i in [key(p)] if i == 0}

    def pick(path: tuple[Any, ...], x: Any) -> Any:
        y = first.get(key(path)[0])
        same = y is not None and getattr(y, "shape", None) == getattr(x, "shape", None) and \
            getattr(y, "dtype", None) == getattr(x, "dtype", None)
        return y if same else x

    return jax.tree_util.tree_map_with_path(pick, state)


def profile_decode(model: Any, batch: int, plen: int, n_new: int, runs: int, prof_runs: int,
                   hot_weights: bool = False) -> dict[str, Any]:
    """Median decode wall time per step over `runs` runs, then a profile of `prof_runs` more. `hot_weights`: every
    layer reads layer 0's weight arrays (`shared_layer_weights`), so a step's weights stay in L2 across layers — the
    step's time with weights that never come from HBM, an upper bound for prefetching them."""
    import jax.numpy as jnp
    import numpy as np

    from bench_generate import compile_generate, decode_choices
    from mamba_llama_jax.inference.generate import Generator

    gen = Generator(model)
    if hot_weights:
        gen.state = shared_layer_weights(gen.state)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, gen.cfg.vocab_size, (batch, plen)), jnp.int32)
    c = compile_generate(gen, tokens, n_new)  # clears the decode choices before tracing the loop
    chosen = decode_choices()
    c.once()  # warm-up
    steps = n_new - 1
    walls = [c.once()[1] for _ in range(runs)]
    prefilled = [c.prefill() for _ in range(prof_runs)]  # outside the trace: only decode loops are profiled

    def profiled() -> list[float]:
        prof_walls = []
        for first, cache in prefilled:
            t = time.perf_counter()
            c.decode(first, cache)
            prof_walls.append(time.perf_counter() - t)
        return prof_walls

    prof_walls, events = traced_kernel_events(profiled)
    if events is None:
        return {"error": "the profiler wrote no .xplane.pb"}
    out = summarize(events, steps * prof_runs, 1e3 * statistics.median(prof_walls) / steps)
    out.update(wall_ms_unprofiled=1e3 * statistics.median(walls) / steps, runs=runs, profiled_runs=prof_runs,
               chosen=chosen)
    return out


def parse_variant(name: str) -> tuple[dict[str, int], dict[str, str]]:
    """A variant's `fused_decode.tiling` keywords and environment (see the module docstring)."""
    tiling: dict[str, Any] = {}
    env: dict[str, str] = {}
    for tok in name.split("+"):
        if tok == "default":
            continue
        if tok == "xla":
            env["MAMBA_LLAMA_FUSED_DECODE"] = "0"
        elif tok == "uv":
            env["MAMBA_LLAMA_UNVERIFIED_KERNELS"] = "1"
        elif tok == "cublas":
            env["MAMBA_LLAMA_DECODE_GEMM"] = "cublas"
        elif m := re.fullmatch(r"fd(\d+)", tok):
            env["MAMBA_LLAMA_FUSED_DECODE"] = m.group(1)
        elif m := re.fullmatch(r"bn(\d+)(?:w(\d+))?", tok):
            tiling["row_block"] = int(m.group(1))
            if m.group(2):
                tiling["row_warps"] = int(m.group(2))
        elif m := re.fullmatch(r"c(\d+)", tok):
            tiling["combine_block"] = int(m.group(1))
        elif m := re.fullmatch(r"s(\d+)", tok):
            tiling["attn_splits"] = int(m.group(1))
        elif m := re.fullmatch(r"ab(\d+)", tok):
            tiling["attn_block"] = int(m.group(1))
        elif m := re.fullmatch(r"aw(\d+)", tok):
            tiling["attn_warps"] = int(m.group(1))
        elif m := re.fullmatch(r"as(\d+)", tok):
            tiling["attn_stages"] = int(m.group(1))
        elif m := re.fullmatch(r"ah(\d+)", tok):
            tiling["attn_heads"] = int(m.group(1))
        elif tok in ("gu", "gux", "guw"):
            env["MAMBA_LLAMA_DECODE_GATE_UP"] = {"gu": "kernel", "gux": "xla", "guw": "weighed"}[tok]
        elif m := re.fullmatch(r"ds(\d+)", tok):
            tiling["dot_stages"] = int(m.group(1))
        elif m := re.fullmatch(r"dk(\d+)", tok):
            tiling["dot_k"] = int(m.group(1))
        elif tok in ("adot", "aew"):
            tiling["attn_dot"] = tok == "adot"
        elif tok in ("ana", "anb"):
            tiling["attn_newest"] = {"ana": "after", "anb": "block"}[tok]
        elif tok in ("sw", "sf"):
            tiling["attn_shares"] = {"sw": "window", "sf": "fill"}[tok]
        elif tok in ("amk", "amx"):
            tiling["attn_merge"] = {"amk": "kernel", "amx": "xla"}[tok]
        elif tok in ("mx", "mk", "mc"):
            tiling["merge"] = {"mx": "xla", "mk": "kernel", "mc": "combine"}[tok]
        elif m := re.fullmatch(r"g(\d+)", tok):
            tiling["dot_rows"] = int(m.group(1))
        elif m := re.fullmatch(r"db(\d+)", tok):
            tiling["dot_block"] = int(m.group(1))
        elif m := re.fullmatch(r"kq(\d+)", tok):
            env["MAMBA_LLAMA_DECODE_SPLIT_K"] = m.group(1)
        elif tok in ("sqg", "sqo"):
            tiling["squares"] = {"sqg": "gate_up", "sqo": "o"}[tok]
        elif tok == "lmk":
            env["MAMBA_LLAMA_LM_HEAD_KERNEL"] = "1"
        elif tok == "hw":
            continue  # read by `profile_variant`: a diagnostic of the weights, not a setting of the code
        else:
            raise SystemExit(f"bench_decode_profile: unknown variant setting {tok!r} in {name!r} "
                             "(default, xla, uv, cublas, fdN, bnN, bnNwM, cN, sN, abN, awN, asN, ahN, adot, aew, ana, "
                             "anb, amk, amx, sw, sf, mx, mk, mc, gN, dbN, dsN, dkN, kqN, gu, gux, guw, sqg, sqo, lmk, "
                             "hw)")
    return tiling, env


@contextlib.contextmanager
def applied(variant: str) -> Iterator[None]:
    """The variant's settings in force for what is traced inside: its environment, `fused_decode.tiling` and
    `decode_attention.override_plan` (bench_generate's `NAME@VARIANT` variants use this too)."""
    from bench_generate import _Env
    from pallas_kernels import decode_attention as da
    from pallas_kernels import fused_decode as fd

    tiling, env = parse_variant(variant)
    attn = {k: tiling.pop(f"attn_{k}", d)
            for k, d in (("splits", 0), ("block", 0), ("warps", 0), ("merge", ""), ("dot", None), ("stages", 0),
                         ("shares", ""), ("newest", ""), ("heads", 0))}
    with _Env(env), fd.tiling(**tiling), da.override_plan(**attn):
        yield


def profile_variant(variant: str, model: Any, batch: int, *args: Any) -> dict[str, Any]:
    """`profile_decode` with the variant's settings, traced anew (caches cleared before and after)."""
    import jax

    jax.clear_caches()
    try:
        with applied(variant):
            return profile_decode(model, batch, *args, hot_weights="hw" in variant.split("+"))
    finally:
        jax.clear_caches()


def _models(tiny: bool) -> dict[str, Any]:
    from flax import nnx

    from bench_generate import _jax_model
    from mamba_llama_jax.config import HybridConfig
    from mamba_llama_jax.convert.from_attention import build_hybrid

    teacher = _jax_model(None, tiny)
    return {"teacher": teacher, "attn50%": build_hybrid(teacher, HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(1))}


def render_md(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [f"# Decode step profile ({m['device']}, {m['date']})", "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}. Command: `{m['command']}`."
             + (f" XLA_FLAGS `{m['xla_flags']}`." if m.get("xla_flags") else ""),
             "Random weights of the SmolLM2-135M shape (bf16), greedy, EOS ignored. Per decode step: wall = median"
             " host time of the whole loop / steps (profiled runs; unprofiled in brackets); busy = union of the"
             " kernels' intervals; gaps = wall − busy (the GPU idle between dependent kernels); overlap = the"
             " kernels' summed durations − busy (kernels on the GPU at once).", "",
             "| model | batch | variant | wall ms (unprofiled) | busy ms | gaps ms | overlap ms | kernels "
             "| busy by kind (ms, count) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        v = row.get("variant", "default")
        if "error" in row:
            lines.append(f"| {row['model']} | {row['batch']} | {v} | {row['error']} | | | | | |")
            continue
        kinds = "; ".join(f"{k} {x['ms']:.3f} ({x['count']:.0f})" for k, x in row["by_kind"].items())
        lines.append(f"| {row['model']} | {row['batch']} | {v} | {row['wall_ms']:.3f} "
                     f"({row['wall_ms_unprofiled']:.3f}) | {row['busy_ms']:.3f} | {row['gap_ms']:.3f} | "
                     f"{row.get('overlap_ms', 0.0):.3f} | "
                     f"{row['kernels']:.0f} | {kinds} |")
    lines += ["", "Top kernels per step (ms):", ""]
    for row in r["rows"]:
        if "top_kernels_ms" in row:
            top = ", ".join(f"`{k}` {x:.4f}" for k, x in list(row["top_kernels_ms"].items())[:6])
            lines.append(f"- {row['model']} b={row['batch']} {row.get('variant', 'default')}: {top}")
    if r.get("skipped"):
        lines += ["", "Skipped at the deadline: " + "; ".join(r["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny model, a few steps")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--profiled-runs", type=int, default=2)
    ap.add_argument("--models", default="teacher,attn50%", help="comma list of teacher, attn50%%")
    ap.add_argument("--variants", default="default", help="comma list (see the module docstring)")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="start no new row after this (0: none)")
    ap.add_argument("--stem", default="", help="result file name (default decode_profile)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    require_traced_loops("bench_decode_profile")
    from bench_env import device, now, versions

    variants = a.variants.split(",")
    for v in variants:
        parse_variant(v)  # a typo stops the run before anything is compiled

    if a.tiny:
        a.prompt_len, a.new_tokens, a.runs, a.profiled_runs = 8, 6, 2, 1
    r: dict[str, Any] = {"meta": {"date": now(), "device": device(), "versions": versions(),
                                  "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                                  "xla_flags": os.environ.get("XLA_FLAGS", "")},
                         "rows": [], "skipped": []}
    stem = (a.stem or "decode_profile") + ("_tiny" if a.tiny else "")  # a smoke run never replaces device figures

    def save() -> None:  # after every row: a run cut short by its caller's timeout keeps what it measured
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{stem}.json").write_text(json.dumps(r, indent=1))
        (a.out / f"{stem}.md").write_text(render_md(r))

    t0 = time.perf_counter()
    models = _models(a.tiny)
    for name in a.models.split(","):
        if name not in models:
            raise SystemExit(f"bench_decode_profile: unknown model {name!r} (teacher, attn50%)")
        for b in map(int, a.batches.split(",")):
            for v in variants:
                if a.deadline_s and time.perf_counter() - t0 > a.deadline_s:
                    r["skipped"].append(f"{name} b={b} {v}")
                    continue
                row = {"model": name, "batch": b, "variant": v,
                       **profile_variant(v, models[name], b, a.prompt_len, a.new_tokens, a.runs, a.profiled_runs)}
                r["rows"].append(row)
                print(f"{name} b={b} {v}: " + (row.get("error") or f"wall {row['wall_ms']:.3f} ms/step, busy "
                      f"{row['busy_ms']:.3f}, gaps {row['gap_ms']:.3f}, {row['kernels']:.0f} kernels"), flush=True)
                save()
    save()
    print(render_md(r))
    print(f"done in {time.perf_counter() - t0:.0f} s; {a.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
