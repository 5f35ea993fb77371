"""Multistep verify of Mamba2 (speculative decoding, issue 5 item 3): the Pallas kernel, its pure-JAX reference,
k single steps and verify + recompute, per draft length k; then a whole-model verify against one decode step.

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 benchmarks/bench_verify.py --out benchmarks/results   # ~2 min
    PYTHONPATH=$PWD python3 benchmarks/bench_verify.py --tiny --out /tmp/verify                      # CPU smoke

1. One layer at the SmolLM2-135M hybrid's Mamba2 shape (9 heads of head_dim 64, d_state 64, B/C per head after
   the GQA repeat, as `Mamba2.multistep` passes them; bf16 x/B/C, fp32 dt with softplus applied, fp32 state), at
   batch 1 and 16, k in 1, 2, 4, 8, 16. Seconds per call of:
   - kernel / kernel_states: `multistep_verify` with `accepted` (y + one state: the decoder's verify call) /
     with per-prefix states (y + k states);
   - reference / reference_states: the same through `ops.ssd.ssd_verify` (XLA);
   - steps: k calls of the lean single step `models.mamba.ssd_step` (what plain decoding pays per k tokens);
   - round_kernel / round_reference: what a speculative round costs a Mamba layer here: the verify call, then
     recomputing the state from the last committed one with the accepted count (k // 2 here).
   Calls are chained R times in one jit (state fed on, `optimization_barrier` between calls so XLA cannot fuse
   across them, as a model's other layers would not let it) and the per-call time is the slope between R = 1 and
   R = 6: dispatch overhead cancels. Goal: kernel at k = 8 below 2x `steps` at k = 1.
2. The whole SmolLM2-135M-shaped 50 % hybrid (random weights, bf16, cache holding a 128-token prompt): one
   decode step vs `speculative.verify` of k tokens + `Pending.commit` (what a round costs the target), with the
   verify op pinned to the kernel or to the reference (other ops keep the dispatcher's choice). 16 forwards per
   timed call (fori_loop).
Median of --reps (>= 20) timed runs after warm-up, block_until_ready. Part 1 gets half of --deadline-s (the
four main columns for every (batch, k) first), part 2 the rest (k = 8 first); past it the remaining figures are
skipped (listed) and what was measured is written:
<out>/verify.json and <out>/verify.md (date, device, versions, dispatcher choices).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import device, now, versions  # noqa: E402
from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig
from mamba_llama_jax.convert.from_attention import build_hybrid
from mamba_llama_jax.inference.generate import prepare_for_inference
from mamba_llama_jax.inference.speculative import verify
from mamba_llama_jax.inference.xla_flags import DECODE_FLAGS, use_decode_flags
from mamba_llama_jax.models.cache import DecodeState, MambaCache
from mamba_llama_jax.models.llama import LlamaLM
from mamba_llama_jax.models.mamba import ssd_step
from mamba_llama_jax.ops.ssd import ssd_verify
from pallas_kernels import dispatch
from pallas_kernels import multistep_verify as mv

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True)
TINY_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=1024)
F32 = jnp.float32


# ------------------------------------------------------------------------------------------------- plumbing


CMDBUF = DECODE_FLAGS


def device_flags(enable: bool) -> None:
    """The CLI's decoding flags (while loops as CUDA-graph conditionals), so that the figures are what
    `run.py speculate` gets; before anything touches a device."""
    if enable and use_decode_flags() == "late":
        print("warning: the JAX backend is already up; XLA_FLAGS unchanged", file=sys.stderr)


class Deadline:
    def __init__(self, seconds: float, end: float | None = None):
        self.t0 = time.monotonic()
        self.end = self.t0 + seconds if end is None else end

    def over(self) -> bool:
        return time.monotonic() > self.end

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def median_time(fn: Callable[[], Any], reps: int) -> float:
    """Median wall seconds of fn() + block_until_ready over `reps` runs, after two warm-up runs (compile, caches)."""
    for _ in range(2):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def touch(cache: DecodeState) -> jax.Array:
    """() int32 depending on every element of every Mamba state in `cache`: a timed forward drops its cache, and
    XLA would then skip the state updates that the real decode loop carries (a full-state read, < 1 % of a step).
    KV writes are left to dead-code elimination: a few slots."""
    out = jnp.int32(0)
    for c in cache.layers:
        if isinstance(c, MambaCache):
            out = out + (jnp.sum(c.ssm) > 0).astype(jnp.int32) + (jnp.sum(c.conv.astype(F32)) > 0).astype(jnp.int32)
    return out


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@contextlib.contextmanager
def verify_impl(name: str) -> Iterator[None]:
    """Pins `dispatch.verify` to the kernel ('kernel') or the reference ('reference') for everything traced inside
    (arguments are still checked; other ops keep their own choice). Off a GPU the dispatcher runs the kernel in
    interpret mode. Jitted functions traced outside keep what they traced: trace (first call) inside the block."""
    orig_choice = dispatch.verify_choice
    want = mv.PALLAS_TRITON if name == "kernel" else mv.REFERENCE

    def choice(*a: Any, **kw: Any) -> str:
        orig_choice(*a, **kw)
        return want

    dispatch.verify_choice = choice
    try:
        yield
    finally:
        dispatch.verify_choice = orig_choice




# -------------------------------------------------------------------------------------------------- 1. layer


def layer_inputs(b: int, k: int, h: int, p: int, n: int, seed: int = 0) -> dict[str, jax.Array]:
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    return dict(state=jnp.asarray(f(b, h, p, n) * 0.1), x=jnp.asarray(f(b, k, h, p), jnp.bfloat16),
                dt=jnp.asarray(np.log1p(np.exp(f(b, k, h) - 3.0))),  # softplus applied, as the layer passes it
                A=jnp.asarray(-np.exp(r.uniform(0.0, 2.7, h)), F32),
                B=jnp.asarray(f(b, k, h, n), jnp.bfloat16), C=jnp.asarray(f(b, k, h, n), jnp.bfloat16),
                D=jnp.ones((h,), F32))


def layer_methods(k: int) -> dict[str, Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]]:
    """name -> one(state, ins) -> (y, next state)."""
    interp = dict(interpret=not on_gpu())

    def args(state: jax.Array, i: dict[str, jax.Array]) -> tuple:
        return state, i["x"], i["dt"], i["A"], i["B"], i["C"]

    def full(i: dict[str, jax.Array]) -> jax.Array:
        return jnp.full((i["x"].shape[0],), k, jnp.int32)

    def kernel(s, i):
        return mv.multistep_verify(*args(s, i), D=i["D"], dt_softplus=False, accepted=full(i), **interp)

    def kernel_states(s, i):
        y, st = mv.multistep_verify(*args(s, i), D=i["D"], dt_softplus=False, **interp)
        return y, st[:, -1]

    def reference(s, i):
        return ssd_verify(*args(s, i), D=i["D"], dt_softplus=False, accepted=full(i))

    def reference_states(s, i):
        y, st = ssd_verify(*args(s, i), D=i["D"], dt_softplus=False)
        return y, st[:, -1]

    def steps(s, i):
        ys = []
        for j in range(k):
            y, s = ssd_step(s, i["x"][:, j:j + 1], i["dt"][:, j:j + 1], i["A"], i["B"][:, j:j + 1],
                            i["C"][:, j:j + 1], i["D"])
            if j < k - 1:  # separate decode steps: nothing fuses across them
                y, s = jax.lax.optimization_barrier((y, s))
            ys.append(y)
        return jnp.concatenate(ys, axis=1), s

    def round_with(fn: Callable) -> Callable:
        def one(s, i):
            y, _ = fn(*args(s, i), D=i["D"], dt_softplus=False, accepted=full(i))
            y = jax.lax.optimization_barrier(y)  # acceptance needs the logits first
            n = jnp.full((i["x"].shape[0],), k // 2, jnp.int32) + (y[:, 0, 0, 0] > 1e9).astype(jnp.int32)
            _, s = fn(*args(s, i), dt_softplus=False, accepted=n)
            return y, s
        return one

    kern = functools.partial(mv.multistep_verify, **interp)
    return dict(kernel=kernel, kernel_states=kernel_states, reference=reference, reference_states=reference_states,
                steps=steps, round_kernel=round_with(kern), round_reference=round_with(ssd_verify))


def chained(one: Callable, reps: int) -> Callable:
    @jax.jit
    def run(state: jax.Array, ins: dict[str, jax.Array]) -> Any:
        ys = []
        for _ in range(reps):
            y, state = one(state, ins)
            y, state = jax.lax.optimization_barrier((y, state))
            ys.append(y)
        return state, ys
    return run


def per_call(one: Callable, state: jax.Array, ins: dict[str, jax.Array], reps: int, hi: int = 6) -> float:
    """Seconds per call: slope of the chained time between 1 and `hi` calls."""
    t1 = median_time(functools.partial(chained(one, 1), state, ins), reps)
    th = median_time(functools.partial(chained(one, hi), state, ins), reps)
    return max(th - t1, 0.0) / (hi - 1)


PRIMARY = ("kernel", "steps", "reference", "round_kernel")  # measured for every (b, k) before the others


def bench_layer(args: argparse.Namespace, deadline: Deadline, res: dict[str, Any]) -> None:
    h, p, n = args.layer
    rows = {(b, k): dict(batch=b, k=k) for b in args.batch for k in args.k}
    res["layer"] = list(rows.values())
    for first in (True, False):
        for (b, k), row in rows.items():
            ins = layer_inputs(b, k, h, p, n)
            for name, one in layer_methods(k).items():
                if (name in PRIMARY) != first:
                    continue
                if deadline.over():
                    row[name] = None
                    res["skipped"].append(f"layer b={b} k={k} {name}")
                    continue
                row[name] = per_call(one, ins["state"], ins, args.reps)
            print(json.dumps(row), flush=True)
    step = {r["batch"]: r["steps"] for r in res["layer"] if r["k"] == 1 and r.get("steps")}
    for r in res["layer"]:
        base = step.get(r["batch"])
        for name in ("kernel", "round_kernel", "reference", "round_reference"):
            if base and r.get(name):
                r[f"{name}_x_step"] = r[name] / base


# -------------------------------------------------------------------------------------------------- 2. model


def make_model(tiny: bool, dtype: str) -> Any:
    cfg = LlamaConfig(**(TINY_MODEL if tiny else SMOLLM2_135M), dtype=dtype, param_dtype=dtype)
    return build_hybrid(LlamaLM(cfg, rngs=nnx.Rngs(0)), HybridConfig(attn_fraction=0.5, mamba=MambaConfig()),
                        rngs=nnx.Rngs(1))


def bench_model(args: argparse.Namespace, deadline: Deadline, res: dict[str, Any]) -> None:
    model = make_model(args.tiny, args.dtype)
    graphdef, state, _ = prepare_for_inference(model)
    loops = 16
    forwards: dict[int, Callable[[int, bool], tuple[float, dict[str, str | None]]]] = {}
    for b in args.batch:
        slots = args.prompt_len + 64

        @jax.jit
        def prefill(state: Any, tok: jax.Array) -> Any:
            m = nnx.merge(graphdef, state)
            return m.hidden(tok, cache=m.init_cache(b, slots), prefill=True)[1]

        cache = prefill(state, jnp.asarray(np.random.default_rng(b).integers(0, model.cfg.vocab_size,
                                                                             (b, args.prompt_len)), jnp.int32))

        def timed_forward(t: int, commit: bool, b: int = b, cache: Any = cache) -> tuple[float, dict[str, Any]]:
            @jax.jit
            def run(state: Any, cache: Any) -> Any:
                m = nnx.merge(graphdef, state)

                def body(i: jax.Array, acc: jax.Array) -> jax.Array:
                    tok = jnp.full((b, t), i % 7, jnp.int32)
                    if t == 1 and not commit:
                        h, c = m.hidden(tok, cache=cache)
                        return acc + jnp.argmax(m.logits(h)[:, -1], axis=-1) + touch(c)
                    logits, pend = verify(m, tok, cache)
                    out = acc + jnp.argmax(logits[:, -1], axis=-1)
                    if commit:  # keep half (data-dependent, as acceptance is)
                        keep = jnp.full((b,), t // 2, jnp.int32) + (out < 0).astype(jnp.int32)
                        out = out + touch(pend.commit(keep))
                    return out
                return jax.lax.fori_loop(0, loops, body, jnp.zeros((b,), jnp.int32))
            dispatch.record_choice("verify", "none")  # this run's pick, not an earlier one's (as bench_generate)
            secs = median_time(lambda: run(state, cache), args.reps) / loops
            return secs, dispatch.last_choices("verify", "decode_attention")

        forwards[b] = timed_forward
    decode: dict[int, float] = {}
    for b in args.batch:
        if deadline.over():
            res["skipped"].append(f"model b={b}")
            continue
        decode[b], ch = forwards[b](1, False)
        res["model"].append(dict(batch=b, what="decode step", tokens=1, impl="-", seconds=decode[b], choices=ch))
        print(json.dumps(res["model"][-1]), flush=True)
    for t in args.model_k:  # the first length for every batch before the next length
        for b in decode:
            for impl in ("kernel", "reference"):
                if deadline.over():
                    res["skipped"].append(f"model b={b} t={t} {impl}")
                    continue
                with verify_impl(impl):
                    secs, ch = forwards[b](t, True)
                res["model"].append(dict(batch=b, what="verify + commit", tokens=t, impl=impl, seconds=secs,
                                         x_decode=secs / decode[b], choices=ch))
                print(json.dumps(res["model"][-1]), flush=True)


# ------------------------------------------------------------------------------------------------- report


def render_md(r: dict[str, Any]) -> str:
    us = lambda v: "-" if v is None else f"{1e6 * v:.1f}"
    x = lambda v: "-" if v is None else f"{v:.2f}"
    L = [f"# Multistep verify ({r['date']})", "",
         f"Device: {r['device']}. Backend {r['backend']}. Versions: "
         + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + f". Command: `{r['command']}`. "
         f"Wall {r['wall_s']:.0f} s.", "",
         f"Dispatcher (`pallas_kernels.dispatch.verify`) at the layer shape with this environment: "
         f"**{r['dispatch_choice']}** (kernel GPU_VERIFIED={r['gpu_verified']}; the rows below pin each "
         "implementation explicitly)."
         + (" Off a GPU the kernel rows run in Pallas interpret mode: a smoke test, not a timing." if r["backend"]
            != "gpu" else ""), ""]
    h, p, n = r["layer_shape"]
    L += [f"## One Mamba2 layer (heads {h}, head_dim {p}, d_state {n}; bf16 x/B/C, fp32 state): µs per call", "",
          "`steps` = k lean single steps; `round_*` = verify + recompute the accepted (k // 2) state from the "
          "committed one, what a speculative round costs the layer; `x step` = over one single step (goal: "
          "kernel at k = 8 < 2).", "",
          "| batch | k | kernel | kernel_states | reference | reference_states | steps | round_kernel | "
          "round_reference | kernel x step | round_kernel x step | reference x step |",
          "|" + "---|" * 12]
    for row in r["layer"]:
        L.append(f"| {row['batch']} | {row['k']} | " + " | ".join(us(row.get(m)) for m in (
            "kernel", "kernel_states", "reference", "reference_states", "steps", "round_kernel",
            "round_reference")) + " | " + " | ".join(x(row.get(m)) for m in (
                "kernel_x_step", "round_kernel_x_step", "reference_x_step")) + " |")
    L += ["", f"## Whole model ({r['model_name']}, 50 % attention, random weights, {r['dtype']}, cache of "
          f"{r['prompt_len']} tokens): ms per call", "",
          "| batch | what | tokens | verify impl | ms | x decode step | dispatcher picked (verify / decode attn) |",
          "|---|---|---|---|---|---|---|"]
    for row in r["model"]:
        ch = row["choices"]
        L.append(f"| {row['batch']} | {row['what']} | {row['tokens']} | {row['impl']} | {1e3 * row['seconds']:.3f} "
                 f"| {x(row.get('x_decode'))} | {ch.get('verify') or '-'} / {ch.get('decode_attention') or '-'} |")
    if r["skipped"]:
        L += ["", f"**Deadline reached**: skipped {len(r['skipped'])}: " + "; ".join(r["skipped"][:20])]
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, kernel in interpret mode")
    ap.add_argument("--batch", nargs="+", type=int, default=None)
    ap.add_argument("--k", nargs="+", type=int, default=None, help="layer-level draft lengths")
    ap.add_argument("--model-k", nargs="+", type=int, default=None, help="whole-model verify lengths")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per figure (>= 20 unless --tiny)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop measuring after this many seconds (default 140; 900 with --tiny, on a busy CPU)")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--no-cmdbuf", action="store_true", help=f"do not add {CMDBUF} to XLA_FLAGS")
    args = ap.parse_args()
    tiny = args.tiny
    device_flags(not (tiny or args.no_cmdbuf))
    args.batch = args.batch or ([1, 2] if tiny else [1, 16])
    args.k = args.k or ([1, 2, 4] if tiny else [1, 2, 4, 8, 16])
    args.model_k = args.model_k or ([4, 2] if tiny else [8, 4])
    args.prompt_len = args.prompt_len or (16 if tiny else 128)
    args.reps = args.reps or (3 if tiny else 20)
    args.deadline_s = args.deadline_s or (900.0 if tiny else 140.0)
    if not tiny:
        args.reps = max(args.reps, 20)
    args.layer = (2, 16, 16) if tiny else (9, 64, 64)  # SmolLM2 hybrid: 9 heads, head_dim = d_state = 64
    deadline = Deadline(args.deadline_s)
    h, p, n = args.layer
    probe = layer_inputs(1, 2, h, p, n)
    res: dict[str, Any] = dict(
        date=now(), device=device(),
        backend=jax.default_backend(), versions=versions(), command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        xla_flags=os.environ.get("XLA_FLAGS", ""), dtype=args.dtype, layer_shape=list(args.layer),
        model_name="tiny" if tiny else "SmolLM2-135M", prompt_len=args.prompt_len, reps=args.reps,
        gpu_verified=mv.GPU_VERIFIED,
        dispatch_choice=dispatch.verify_choice(probe["state"], probe["x"], probe["dt"], probe["A"], probe["B"],
                                               probe["C"], accepted=jnp.zeros((1,), jnp.int32)),
        layer=[], model=[], skipped=[])
    bench_layer(args, Deadline(0, end=deadline.t0 + (0.5 if not args.skip_model else 1.0) * args.deadline_s), res)
    if not args.skip_model:
        bench_model(args, deadline, res)
    res["wall_s"] = deadline.elapsed()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify.json").write_text(json.dumps(res, indent=1))
    md_text = render_md(res)
    (args.out / "verify.md").write_text(md_text)
    print(md_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
