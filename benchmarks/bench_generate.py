"""Decode throughput of the JAX teacher and its hybrids; the teacher vs HF eager `generate` on the same weights.

    PYTHONPATH=$PWD python3 benchmarks/bench_generate.py [--suite teacher|device] [--out DIR] [--tiny]

Default model: random weights of the SmolLM2-135M shape in bf16; EOS ignored (fixed decode length). The
orchestrator (this process, which never imports jax) runs workers in subprocesses, because XLA flags are read
once per process and JAX and torch would fight over GPU memory.

`--suite teacher` (issue 3's table, prompt 128, 256 new tokens): `explore` each JAX variant at batch 1 and 64;
`final`: the best at every batch with the step-time facts (copy bandwidth, LM head alone, kernels per step from
the optimised HLO); `hf`: transformers' eager `generate`. Writes generate.json / generate.md.

`--suite device` (one device call, a hard overall deadline, results written after every row so a kill still
leaves tables):
  1. the gpu-marked tests of the decode kernels (compiled Triton vs the pure-JAX references);
  2. the hybrid table (issue 4): decode tokens/s and cache bytes per sequence for the teacher and the 50 / 25 /
     12.5 / 0 % attention hybrids at contexts 128 and 4096 and batches 1, 64, 256 — one model and shape compiled
     at a time, in one worker watched by the orchestrator (a worker that stops reporting is killed and restarted
     past the stuck row), runs per row bounded by time; writes generate_hybrid.json / .md;
  3. decode-path variants of the teacher (prompt 128, 256 new tokens, >= 20 runs, batch 1 and 64): the old XLA
     path, decode attention alone, + the fused GEMVs, and XLA flag variants; launching ops per step from the
     optimised HLO; writes generate_variants.json / .md.
`--tiny` runs either suite on a tiny model (a CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import device, now, versions  # noqa: E402

from mamba_llama_jax.inference.xla_flags import DECODE_FLAGS as CMDBUF  # noqa: E402 (what run.py decodes with)
FORCE_REF = "MAMBA_LLAMA_FORCE_REFERENCE"  # pallas_kernels.dispatch.FORCE_REFERENCE_ENV (no jax import here)
FUSED_ENV = "MAMBA_LLAMA_FUSED_DECODE"  # pallas_kernels.fused_decode.FUSED_DECODE_ENV
DECODE_GEMM_ENV = "MAMBA_LLAMA_DECODE_GEMM"  # inference.generate.DECODE_GEMM_ENV
SPLITK1 = " --xla_gpu_experimental_force_split_k=1"  # the live split-K flag in jax 0.11's DebugOptions
NO_TRITON_GEMM = " --xla_gpu_enable_triton_gemm=false"
# Hopper's programmatic dependent launch between XLA's own kernels (each waits for its producer in its prologue;
# the project's Pallas kernels keep plain dependencies), on and off: jax 0.11's default is not documented
PDL = " --xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true"
NO_PDL = " --xla_gpu_enable_pdl=false"
EXHAUSTIVE = " --xla_gpu_exhaustive_tiling_search=true"  # the GEMM autotuner tries every tiling, not a short list
WARP_SPEC = " --xla_gpu_experimental_enable_triton_warp_specialization=true"
# name: (XLA_FLAGS, fused projections, window block, environment). Kernels are chosen at trace time from the
# environment, so variants with the same flags share one worker process.
VARIANTS: dict[str, tuple[str, bool, int, dict[str, str]]] = {
    "fused": (CMDBUF, True, 128, {}),  # decode attention kernel + fused GEMVs: the default decode path
    "attn": (CMDBUF, True, 128, {FUSED_ENV: "0"}),  # decode attention kernel, XLA GEMMs (the previous path)
    "ref": (CMDBUF, True, 128, {FORCE_REF: "1"}),  # every kernel off: XLA attention and GEMMs (the old path)
    "attn+splitk1": (CMDBUF + SPLITK1, True, 128, {FUSED_ENV: "0"}),
    "attn+no_triton_gemm": (CMDBUF + NO_TRITON_GEMM, True, 128, {FUSED_ENV: "0"}),
    "fused+no_triton_gemm": (CMDBUF + NO_TRITON_GEMM, True, 128, {}),
    "fused+decode_cublas": (CMDBUF, True, 128, {DECODE_GEMM_ENV: "cublas"}),  # the same, decode programs alone
    "fused_nocmdbuf": ("", True, 128, {}),
    "fused+pdl": (CMDBUF + PDL, True, 128, {}),
    "fused+nopdl": (CMDBUF + NO_PDL, True, 128, {}),
    "fused+exhaustive": (CMDBUF + EXHAUSTIVE, True, 128, {}),
    "fused+warpspec": (CMDBUF + WARP_SPEC, True, 128, {}),
    # today's path with XLA's decode GEMMs (q·k·v past its own partials, o, down at 16-256 rows) left unsplit over K:
    # their split-K sums are the step's XLA fusions at batch 64 (2 a layer). Measured slower on the H100: 1.003 ms a
    # step at 64 against the default's 0.874-0.876 (benchmarks/results/generate_s25.md)
    "fused+splitk1": (CMDBUF + SPLITK1, True, 128, {}),
    "plain+cmdbuf_while": (CMDBUF, False, 0, {FUSED_ENV: "0"}),
}
DEVICE_VARIANTS = ("fused", "attn", "ref", "attn+splitk1", "attn+no_triton_gemm")

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _write_json(path: str | Path, obj: Any) -> None:
    """Atomic (temp file + rename): the orchestrator may read it at any moment, and a kill must not tear it."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ JAX worker


def _jax_model(teacher: str | None, tiny: bool = False) -> Any:
    from flax import nnx

    from mamba_llama_jax.config import LlamaConfig
    from mamba_llama_jax.models.llama import LlamaLM

    if teacher:
        from mamba_llama_jax.convert import load_teacher

        return load_teacher(teacher, dtype="bfloat16", param_dtype="bfloat16").model
    shape = dict(SMOLLM2_135M)
    if tiny:  # a smoke test of this script on a CPU
        shape.update(TINY)
    cfg = LlamaConfig(**shape, dtype="bfloat16", param_dtype="bfloat16")
    return LlamaLM(cfg, rngs=nnx.Rngs(0))


def _hlo_facts(hlo: str) -> dict[str, Any]:
    """Kernels launched per decode step, read off the optimised HLO: the instructions of the while bodies that
    become a thunk (fusions, library calls, copies), not the free ones (tuples, bitcasts, parameters)."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)  # headers start in column 0
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None and line.startswith(" ") and "=" in line:
            comps[cur].append(line)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    free = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all")
    per_body = {}
    for b in bodies:
        ops: dict[str, int] = {}
        for line in comps.get(b, []):
            m = re.search(r"=\s*[^ ]+(?:\s*\{[^}]*\})?\s+([\w\-]+)\(", line)
            if not m:
                m = re.search(r"\s([a-z][\w\-]*)\(", line)
            op = m.group(1) if m else "?"
            if op in free:
                continue
            if op == "custom-call":
                tgt = re.search(r'custom_call_target="([^"]+)"', line)
                op = f"custom-call:{tgt.group(1) if tgt else '?'}"
            ops[op] = ops.get(op, 0) + 1
        per_body[b] = {"launching_ops": sum(ops.values()), "by_op": dict(sorted(ops.items(), key=lambda x: -x[1]))}
    return per_body


class _Env:
    """Sets environment variables for a block (the kernel dispatchers read them at trace time)."""

    def __init__(self, env: dict[str, str]):
        self.env, self.saved = env, {}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def split_variant(name: str) -> tuple[str, str]:
    """`NAME` or `NAME@SETTINGS` -> (a VARIANTS key, bench_decode_profile settings such as `adot+cublas`, or ''):
    issue 3's table with a decode profile's variant settings; checked here, before any worker starts."""
    base, _, settings = name.partition("@")
    if base not in VARIANTS:
        raise SystemExit(f"bench_generate: unknown variant {base!r} in {name!r} (one of {', '.join(VARIANTS)}, "
                         "optionally @SETTINGS)")
    if "@" in name:
        if not settings:
            raise SystemExit(f"bench_generate: {name!r} names no settings after '@'")
        from bench_decode_profile import parse_variant

        parse_variant(settings)  # an unknown setting exits with the list of known ones
        if "hw" in settings.split("+"):  # parse_variant accepts it for the profile, which alone applies it
            raise SystemExit(f"bench_generate: {name!r}: `hw` is bench_decode_profile's diagnostic (layers sharing "
                             "layer 0's weights); issue 3's table runs every layer's own weights")
    return base, settings


def worker_jax(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant named in --variant (all with this process's XLA flags) at every batch: prefill and the
    on-device decode loop compiled ahead of time (the compile is timed, and its optimised HLO gives the launch
    count), then `args.runs` timed runs. Results are written after every batch."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(tempfile.gettempdir()) / "bench_generate_jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    model = _jax_model(args.teacher, args.tiny)
    res: dict[str, Any] = {"variants": {}}
    gen = None
    from bench_decode_profile import applied

    for name in args.variant.split(","):
        base, settings = split_variant(name)
        _, fuse, block, env = VARIANTS[base]
        # a name given again (the explore's baseline, last) is measured under its own key, then kept as the first
        # run's "again": a kill during the second run leaves the first one in the file
        key = f"{name} (again)" if name in res["variants"] else name
        with _Env(env), applied(settings or "default"):
            jax.clear_caches()  # kernel choices are made at trace time: nothing traced for another variant
            try:
                gen, out = _measure_variant(name, model, args, fuse, block, res, key=key)
            except Exception as e:  # noqa: BLE001  (one variant failing must not lose the others)
                out = {"variant": name, "error": repr(e)[:3000], "batches": {}}
                print(f"[{name}] failed: {e!r}"[:3000], flush=True)
        res["variants"][key] = out
        if key != name:
            res["variants"][name]["again"] = res["variants"].pop(key)["batches"]
        _write_json(args.result, res)
    if args.facts and gen is not None:
        res["facts"] = _facts(gen, gen.cfg, args)
    if args.save_weights and gen is not None:
        _save_weights(gen, gen.cfg, args.save_weights)
    _write_json(args.result, res)
    return res


@dataclasses.dataclass
class CompiledGenerate:
    """A generator's prefill and whole decode loop compiled for one (b, plen) prompt batch, greedy, no EOS (always
    `n_new` tokens)."""

    prefill_fn: Any
    decode_fn: Any  # the compiled decode loop (its HLO: `.as_text()`)
    args: tuple[Any, ...]  # state, tokens, mask, key, temp, top_p
    n_new: int

    def prefill(self) -> tuple[Any, Any]:
        import jax

        return jax.block_until_ready(self.prefill_fn(*self.args))

    def decode(self, first: Any, cache: Any) -> Any:
        import jax

        state, _, _, key, temp, top_p = self.args
        toks, steps, cache = jax.block_until_ready(self.decode_fn(state, cache, first, key, temp, top_p))
        assert int(steps) == self.n_new, int(steps)
        return toks

    def once(self) -> tuple[float, float, Any]:
        """(prefill s, decode s, tokens) of one generation."""
        t0 = time.perf_counter()
        first, cache = self.prefill()
        t1 = time.perf_counter()
        toks = self.decode(first, cache)
        return t1 - t0, time.perf_counter() - t1, toks


# The dispatchers a decode loop's trace records (`dispatch.last_choices`): forgotten just before each decode loop is
# traced (`dispatch.forget_choices`), so an op that trace does not reach reads "none", not an earlier trace's choice.
DECODE_CHOICE_OPS = ("decode_attention", "fused_decode", "mamba2_decode", "qkv_projection", "gate_up", "o_weigh",
                     "lm_head_argmax")


def decode_choices(*ops: str) -> dict[str, str]:
    """What the last decode trace chose for `ops` (default DECODE_CHOICE_OPS), "none" for an op it did not reach."""
    from pallas_kernels import dispatch

    return {op: c or "none" for op, c in dispatch.last_choices(*(ops or DECODE_CHOICE_OPS)).items()}


def compile_generate(gen: Any, tokens: Any, n_new: int) -> CompiledGenerate:
    import jax.numpy as jnp

    from mamba_llama_jax.inference import generate as G
    from pallas_kernels import dispatch

    b, plen = tokens.shape
    sampling = G.SamplingConfig(max_new_tokens=n_new)
    spec = G._spec(sampling, gen.cfg.vocab_size)
    key, temp, top_p = gen._dyn(sampling)
    mask = jnp.ones((b, plen), bool)
    slots = gen._slots(plen, n_new)
    phases = gen.phases(plen, n_new, slots)
    pcomp = G._prefill.lower(gen.graphdef, gen.state, tokens, mask, key, temp, top_p, slots=slots,
                             spec=spec).compile()
    first, cache = pcomp(gen.state, tokens, mask, key, temp, top_p)
    dispatch.forget_choices(*DECODE_CHOICE_OPS)
    dcomp = G._decode_loop.lower(gen.graphdef, gen.state, cache, first, key, temp, top_p, spec=spec,
                                 n_new=n_new, eos=(), pad_id=0, phases=phases).compile()
    return CompiledGenerate(pcomp, dcomp, (gen.state, tokens, mask, key, temp, top_p), n_new)


def _measure_variant(name: str, model: Any, args: argparse.Namespace, fuse: bool, block: int,
                     res: dict[str, Any], key: str | None = None) -> tuple[Any, dict[str, Any]]:
    import jax.numpy as jnp
    import numpy as np

    from mamba_llama_jax.inference import generate as G

    gen = G.Generator(model, fuse=fuse, window_block=block)
    cfg = gen.cfg
    n_new, plen = args.new_tokens, args.prompt_len
    base, settings = split_variant(name)
    out: dict[str, Any] = {"variant": name, "xla_flags": os.environ.get("XLA_FLAGS", ""), "fused": gen.fused,
                           "window_block": gen.window_block, "batches": {}, "env": dict(VARIANTS[base][3]),
                           "settings": settings,
                           "decode_attention": gen.decode_attention_impl()}
    res["variants"][key or name] = out
    rng = np.random.default_rng(0)
    for b in args.batches:
        if time.time() > args.deadline_at - 10:
            out.setdefault("skipped", []).append(f"batch {b}: deadline")
            continue
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, plen)), jnp.int32)
        tc = time.perf_counter()
        compiled = compile_generate(gen, tokens, n_new)
        once, dcomp = compiled.once, compiled.decode_fn
        compile_s = time.perf_counter() - tc
        traced = decode_choices()
        _, _, toks = once()  # warm-up
        pre, dec = [], []
        for r in range(args.runs):
            p, d, _ = once()
            pre.append(p)
            dec.append(d)
            if r + 1 >= 5 and time.time() > args.deadline_at - 5:
                break
        steps = n_new - 1
        row = {
            "runs": len(dec), "compile_s": compile_s,
            "prefill_ms": median(pre) * 1e3, "prefill_tokens_per_s": b * plen / median(pre),
            "decode_ms_per_step": median(dec) / steps * 1e3, "decode_tokens_per_s": b * steps / median(dec),
            "decode_ms_per_step_min": min(dec) / steps * 1e3,
            "first_tokens_row0": np.asarray(toks[0, :16]).tolist(),
            "decode_attention_traced": traced["decode_attention"], "fused_decode_traced": traced["fused_decode"],
            "qkv_projection_traced": traced["qkv_projection"], "gate_up_traced": traced["gate_up"],
            "fused_decode": gen.fused_decode_impl(b),
        }
        if args.hlo:
            hlo = dcomp.as_text()
            row["hlo_while_bodies"] = _hlo_facts(hlo)
            # one dump a run (few files come back from the device): the table's variant or the variants stage's fused
            if args.dump_dir and b == args.dump_batch and (args.facts or name == "fused"):
                Path(args.dump_dir, hlo_dump_name(b, name)).write_text(hlo)
        out["batches"][str(b)] = row
        _write_json(args.result, res)
        print(f"[{name}] b={b}: prefill {row['prefill_tokens_per_s']:,.0f} tok/s; decode "
              f"{row['decode_ms_per_step']:.3f} ms/step = {row['decode_tokens_per_s']:,.0f} tok/s ({len(dec)} runs; "
              f"compile {compile_s:.1f} s; attention {traced['decode_attention']}, GEMVs {row['fused_decode']})",
              flush=True)
    return gen, out


def _facts(gen: Any, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Measured copy bandwidth and the LM head's time alone, for the roofline and the step-time breakdown."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def times(f: Any, *a: Any, n: int = 20) -> list[float]:
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t)
        return ts

    def timeit(f: Any, *a: Any, n: int = 20) -> float:
        return median(times(f, *a, n=n))

    # The roofline's bandwidth is the best of 40 copies, not their median: the median swung 1,978-2,608 GB/s across
    # H100 runs whose decode steps agreed within ~1 % (session 22), and a roofline is what the memory can do.
    x = jnp.ones((1 << (20 if args.tiny else 28),), jnp.float32)  # 1 GiB
    ts = times(jax.jit(lambda a: a * 1.0001), x, n=40)
    nbytes = 2 * x.nbytes  # read + write
    del x
    facts: dict[str, Any] = {"copy_bandwidth_GBps": nbytes / min(ts) / 1e9,
                             "copy_bandwidth_median_GBps": nbytes / median(ts) / 1e9}
    model = nnx.merge(gen.graphdef, gen.state)
    w_bytes = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(gen.state))
    facts["weight_bytes"] = w_bytes
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # k and v, bf16, all layers
    facts["kv_bytes_per_token"] = kv_per_token
    n_steps_loop = 100
    for b in (1, 64):
        h = jax.random.normal(jax.random.key(0), (b, cfg.hidden_size), jnp.bfloat16)

        @jax.jit
        def head(state: Any, h: Any) -> Any:
            m = nnx.merge(gen.graphdef, state)

            def body(i: Any, c: Any) -> Any:
                return c + jnp.argmax(m.logits(h + c.astype(h.dtype)[:, None] * 1e-3), -1)
            return jax.lax.fori_loop(0, n_steps_loop, body, jnp.zeros((b,), jnp.int32))
        facts[f"lm_head_plus_argmax_ms_b{b}"] = timeit(head, gen.state, h, n=10) / n_steps_loop * 1e3
    del model
    return facts



def _save_weights(gen: Any, cfg: Any, path: str) -> None:
    """HF-named fp32 arrays of the model's weights (unfused names: read back from the fused matrices)."""
    import dataclasses

    import numpy as np
    from flax import nnx

    m = nnx.merge(gen.graphdef, gen.state)
    f = lambda a: np.asarray(a[...], dtype=np.float32)
    h, kv, hd, inter = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    t = {"model.embed_tokens.weight": f(m.embed_tokens.embedding), "model.norm.weight": f(m.norm.weight)}
    if m.lm_head is not None:
        t["lm_head.weight"] = f(m.lm_head.kernel).T
    for i, layer in enumerate(m.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = f(layer.input_layernorm.weight)
        t[p + "post_attention_layernorm.weight"] = f(layer.post_attention_layernorm.weight)
        a, mlp = layer.mixer, layer.mlp
        if gen.fused:
            qkv, gu = f(a.qkv), f(mlp.gate_up)  # output-major (N, K): HF's (out, in) already
            t[p + "self_attn.q_proj.weight"] = qkv[: h * hd]
            t[p + "self_attn.k_proj.weight"] = qkv[h * hd: (h + kv) * hd]
            t[p + "self_attn.v_proj.weight"] = qkv[(h + kv) * hd:]
            t[p + "self_attn.o_proj.weight"] = f(a.o)
            t[p + "mlp.gate_proj.weight"] = gu[:inter]
            t[p + "mlp.up_proj.weight"] = gu[inter:]
            t[p + "mlp.down_proj.weight"] = f(mlp.down)
        else:
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                t[p + f"self_attn.{n}.weight"] = f(getattr(a, n).kernel).T
            for n in ("gate_proj", "up_proj", "down_proj"):
                t[p + f"mlp.{n}.weight"] = f(getattr(mlp, n).kernel).T
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in t.items()})
    cfgd = dataclasses.asdict(cfg)
    Path(path + ".json").write_text(json.dumps(cfgd, default=str))



# ------------------------------------------------------------------------------------------------- HF worker


def worker_hf(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    c = json.loads(Path(args.save_weights + ".json").read_text())
    rs = c.get("rope_scaling")
    hf_cfg = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
        head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=c["tie_word_embeddings"],
        rope_scaling=None if rs is None else {**rs, "rope_type": rs["rope_type"]},
        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="eager", dtype=torch.bfloat16)
    w = np.load(args.save_weights)
    sd = {k: torch.from_numpy(w[k]).to(torch.bfloat16) for k in w.files}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (hf_cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match: missing {missing}, unexpected {unexpected}")
    if hf_cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    out: dict[str, Any] = {"batches": {}, "attn_implementation": "eager", "device": dev, "torch": torch.__version__,
                           "transformers": transformers.__version__}
    n_new, plen = args.new_tokens, args.prompt_len
    rng = np.random.default_rng(0)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def timed(fn: Any) -> tuple[float, Any]:
        sync()
        t = time.perf_counter()
        r = fn()
        sync()
        return time.perf_counter() - t, r

    with torch.inference_mode():
        for b in args.batches:
            ids = torch.from_numpy(rng.integers(0, hf_cfg.vocab_size, (b, plen))).to(dev)
            am = torch.ones_like(ids)
            gen = lambda n: model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n,
                                           do_sample=False, pad_token_id=0, use_cache=True)
            gen(4)  # warm-up
            pre = [timed(lambda: model(input_ids=ids, attention_mask=am, use_cache=True))[0] for _ in range(5)]
            full, toks = [], None
            end = time.perf_counter() + args.max_seconds_per_batch
            for r in range(args.hf_runs):
                t, toks = timed(lambda: gen(n_new))
                full.append(t)
                if time.perf_counter() > end:
                    break
            assert toks.shape[1] == plen + n_new
            p = median(pre)
            step = (median(full) - p) / (n_new - 1)
            row = {"runs": len(full), "prefill_ms": p * 1e3, "prefill_tokens_per_s": b * plen / p,
                   "generate_s": median(full), "decode_ms_per_step": step * 1e3,
                   "decode_tokens_per_s": b / step, "first_tokens_row0": toks[0, plen: plen + 16].tolist()}
            out["batches"][str(b)] = row
            Path(args.result).write_text(json.dumps(out))
            print(f"[hf eager] b={b}: prefill {row['prefill_tokens_per_s']:,.0f} tok/s; decode "
                  f"{row['decode_ms_per_step']:.2f} ms/step = {row['decode_tokens_per_s']:,.0f} tok/s "
                  f"({len(full)} runs)", flush=True)
    return out

# ----------------------------------------------------------------------------------------------- orchestrator


def _worker_env(xla_flags: str = "", env_extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["MAMBA_LLAMA_UNVERIFIED_KERNELS"] = "1"  # the benchmark measures the kernels whether or not test-gpu passed
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the workers run this file as a script: let them import the project from this checkout
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.update(env_extra or {})
    return env


def hlo_dump_name(batch: int, variant: str) -> str:
    """The file a worker writes a decode loop's optimised HLO to (`--dump-dir`): plain characters only, as the device
    returns no other names."""
    return f"decode_b{batch}_{re.sub(r'[^A-Za-z0-9_.-]', '_', variant)}.hlo.txt"


def _spawn(mode: str, args: argparse.Namespace, extra: list[str], xla_flags: str = "",
           timeout: float = 600, env_extra: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Runs a worker to completion (or its timeout / the deadline); returns whatever it had written."""
    timeout = max(10.0, min(timeout, args.deadline_at - time.time()))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        res = f.name
    cmd = [sys.executable, __file__, "--worker", mode, "--result", res, "--new-tokens", str(args.new_tokens),
           "--prompt-len", str(args.prompt_len), "--deadline-at", str(time.time() + timeout)]
    cmd += (["--tiny"] if args.tiny else []) + (["--teacher", args.teacher] if args.teacher else [])
    cmd += ["--dump-batch", str(args.dump_batch)] + extra
    t = time.perf_counter()
    try:
        rc = subprocess.run(cmd, env=_worker_env(xla_flags, env_extra), timeout=timeout + 15).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    print(f"worker {mode} {' '.join(extra)} finished rc={rc} in {time.perf_counter() - t:.0f} s", flush=True)
    text = Path(res).read_text() if Path(res).exists() else ""
    if not text:
        return None
    out = json.loads(text)
    if rc != 0:
        out["incomplete"] = f"worker ended with {rc}: only the rows listed were measured"
    return out


def _variant_result(r: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    v = ((r or {}).get("variants") or {}).get(name)
    if v is not None and r.get("incomplete"):
        v = {**v, "incomplete": r["incomplete"]}
    return v


# The share of --deadline-s that the variants tried first leave to the final run (session 17: a run whose variants
# used the whole deadline printed an empty table).
FINAL_SHARE = 0.4
MIN_EXPLORE_S = 30.0  # a variant is not started with less than this before the final run's share


def orchestrate(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    args.deadline_at = time.time() + args.deadline_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    explore: dict[str, Any] = {}
    not_tried: list[str] = []
    explore_mode = "a process each"
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    flags = {name: VARIANTS[split_variant(name)[0]][0] for name in names}
    if len(names) > 1:
        # The first variant (the baseline) runs again last, kept as its "again", and a challenger has to beat the
        # baseline's better run. Variants that share their XLA flags run in one process, one after the other,
        # as bench_decode_profile's comparisons do: in a process each, the elementwise decode attention measured
        # ~1.14 ms a step at b=64 four times out of four on H100s, 1.04-1.06 in one process with the others
        # (session 17, generate_s17a.md / decode_profile_s17_b64.md), and its second process as slow as its first;
        # --explore-processes asks for a process each anyway.
        explore_until = args.deadline_at - FINAL_SHARE * args.deadline_s
        order = names + names[:1]
        if len(set(flags.values())) == 1 and not args.explore_processes:
            explore_mode = "one process"
            r = _spawn("jax", args, ["--variant", ",".join(order), "--batches", "1,64", "--runs", "5"],
                       flags[names[0]], timeout=max(MIN_EXPLORE_S, explore_until - time.time()))
            for name in names:
                if res := _variant_result(r, name):
                    explore[name] = res
                else:
                    not_tried.append(name)
        else:
            for name in order:
                left = explore_until - time.time()
                if left < MIN_EXPLORE_S:
                    not_tried.append(f"{name} (again)" if name in explore else name)
                    continue
                r = _spawn("jax", args, ["--variant", name, "--batches", "1,64", "--runs", "5"], flags[name],
                           timeout=min(240.0, left))
                res = _variant_result(r, name)
                if res and name in explore:
                    explore[name]["again"] = res["batches"]
                elif res:
                    explore[name] = res

        def score(batches: dict[str, Any]) -> float:  # distance to the two goals (0.5 ms at b=1, 0.85 at b=64)
            if set(batches) != {"1", "64"}:
                return float("inf")
            return batches["1"]["decode_ms_per_step"] / 0.5 + batches["64"]["decode_ms_per_step"] / 0.85

        def best_score(e: dict[str, Any]) -> float:
            return min(score(e["batches"]), score(e["again"]) if "again" in e else float("inf"))
        best = min(explore, key=lambda k: best_score(explore[k])) if explore else names[0]
    else:
        best = names[0]
    print(f"best variant: {best}", flush=True)
    weights = str(Path(tempfile.gettempdir()) / "bench_generate_weights.npz")
    r = _spawn("jax", args, ["--variant", best, "--batches", ",".join(map(str, args.batches)), "--runs",
                             str(args.runs), "--hlo", "--facts", "--dump-dir", str(out_dir)]
               + (["--save-weights", weights] if not args.no_hf else []), flags[best])
    final = _variant_result(r, best)
    if final is not None and (r or {}).get("facts"):
        final["facts"] = r["facts"]
    hf = None
    _report(args, out_dir, explore, best, final, None, started, not_tried, explore_mode)
    if not args.no_hf and final is not None:
        hf = _spawn("hf", args, ["--batches", ",".join(map(str, args.batches)), "--hf-runs", str(args.hf_runs),
                                 "--max-seconds-per-batch", "40", "--save-weights", weights], timeout=420)
    _report(args, out_dir, explore, best, final, hf, started, not_tried, explore_mode)


def _report(args: argparse.Namespace, out_dir: Path, explore: dict[str, Any], best: str, final: Any, hf: Any,
            started: float, not_tried: list[str] | None = None, explore_mode: str = "a process each") -> None:
    report = {
        "date": now(),
        "device": device(), "versions": versions(),
        "config": {"model": args.teacher or "random weights, SmolLM2-135M shape", "shape": SMOLLM2_135M,
                   "dtype": "bfloat16", "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "eos": "ignored (fixed decode length)", "batches": args.batches, "jax_runs": args.runs,
                   "hf_runs": args.hf_runs},
        "explore": explore, "explore_mode": explore_mode, "explore_not_tried": not_tried or [], "best_variant": best,
        "jax": final, "hf": hf,
        "command": "PYTHONPATH=$PWD python3 benchmarks/bench_generate.py " + " ".join(sys.argv[1:]),
        "wall_s": time.perf_counter() - started,
    }
    if final and hf:
        fb, hb = final["batches"], hf["batches"]
        report["ratio_decode"] = {b: fb[b]["decode_tokens_per_s"] / hb[b]["decode_tokens_per_s"] for b in fb if b in hb}
        report["ratio_prefill"] = {b: fb[b]["prefill_tokens_per_s"] / hb[b]["prefill_tokens_per_s"]
                                   for b in fb if b in hb}
    if final and final.get("facts"):
        f = final["facts"]
        roof = {}
        avg_filled = args.prompt_len + args.new_tokens / 2
        for b in final["batches"]:
            byts = f["weight_bytes"] + int(b) * avg_filled * f["kv_bytes_per_token"]
            t = byts / (f["copy_bandwidth_GBps"] * 1e9) * 1e3
            roof[b] = {"bytes_per_step": byts, "roofline_ms": t,
                       "measured_over_roofline": final["batches"][b]["decode_ms_per_step"] / t}
        report["roofline"] = roof
    (out_dir / "generate.json").write_text(json.dumps(report, indent=1))
    (out_dir / "generate.md").write_text(render_md(report))
    print(render_md(report))


def render_md(r: dict[str, Any]) -> str:
    L = [f"# Generation benchmark ({r['date']})", "",
         f"Device: {r['device']}. Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
         f"Model: {r['config']['model']}, bf16; prompt {r['config']['prompt_len']}, {r['config']['new_tokens']} new "
         f"tokens, EOS ignored. Command: `{r['command']}`.", ""]
    j, hf = r.get("jax"), r.get("hf")
    for name, part in (("JAX", j), ("HF", hf)):
        if part and part.get("incomplete"):
            L += [f"**{name} run incomplete**: {part['incomplete']}.", ""]
    if j:
        L += [f"JAX variant: **{r['best_variant']}** (XLA_FLAGS `{j['xla_flags']}`, fused={j['fused']}, "
              f"window block {j['window_block']}); medians of {r['config']['jax_runs']} runs (fewer where stated).", "",
              "| batch | JAX prefill tok/s | JAX decode ms/step | JAX decode tok/s | HF prefill tok/s | "
              "HF decode ms/step | HF decode tok/s | decode ratio | roofline ms/step | measured / roofline |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for b, row in j["batches"].items():
            h = (hf or {}).get("batches", {}).get(b)
            ro = r.get("roofline", {}).get(b)
            L.append(f"| {b} | {row['prefill_tokens_per_s']:,.0f} | {row['decode_ms_per_step']:.3f} | "
                     f"{row['decode_tokens_per_s']:,.0f} | "
                     + (f"{h['prefill_tokens_per_s']:,.0f} | {h['decode_ms_per_step']:.2f} | "
                        f"{h['decode_tokens_per_s']:,.0f} | {r['ratio_decode'][b]:.0f}x | "
                        if h else "- | - | - | - | ")
                     + (f"{ro['roofline_ms']:.3f} | {ro['measured_over_roofline']:.1f}x |" if ro else "- | - |"))
        L.append("")
        if j.get("skipped"):
            L += [f"**Not in the final run**: {'; '.join(j['skipped'])} (the variants tried below used the time; a "
                  "longer --deadline-s measures them).", ""]
        if r.get("explore"):
            L += [f"Variants tried (5 runs each, in this order, {r.get('explore_mode', 'a process each')}, decode "
                  "ms/step; the first again last):", ""]
            for name, e in r["explore"].items():
                L.append(f"- {name} (XLA_FLAGS `{e['xla_flags']}`): " + ", ".join(
                    f"b={b} {row['decode_ms_per_step']:.3f}" for b, row in e["batches"].items())
                    + ("; again last: " + ", ".join(f"b={b} {row['decode_ms_per_step']:.3f}"
                                                    for b, row in e["again"].items()) if "again" in e else ""))
            L.append("")
        if r.get("explore_not_tried"):
            L += [f"Not tried (the time left to the final run, {FINAL_SHARE:.0%} of --deadline-s): "
                  + ", ".join(r["explore_not_tried"]) + ".", ""]
        f = j.get("facts")
        if f:
            med = f.get("copy_bandwidth_median_GBps")
            L += [f"Measured copy bandwidth {f['copy_bandwidth_GBps']:,.0f} GB/s (read + write, best of 40"
                  + (f"; median {med:,.0f}" if med else "") + "); weights "
                  f"{f['weight_bytes'] / 1e6:.0f} MB; KV {f['kv_bytes_per_token'] / 1e3:.1f} kB per token; "
                  f"LM head + argmax alone {f['lm_head_plus_argmax_ms_b1']:.3f} ms at b=1, "
                  f"{f['lm_head_plus_argmax_ms_b64']:.3f} ms at b=64.", ""]
        for b, row in j["batches"].items():
            for body, facts in (row.get("hlo_while_bodies") or {}).items():
                top = ", ".join(f"{k} {v}" for k, v in list(facts["by_op"].items())[:6])
                L.append(f"- b={b}, while body `{body}`: {facts['launching_ops']} launching ops per step ({top})")
        L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------------------------- hybrid decode worker

HYBRID_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0)  # attention fraction; 1.0 = the teacher itself


def _model_name(f: float) -> str:
    return "teacher" if f == 1.0 else f"attn{f * 100:g}%"


def _hybrid_models(args: argparse.Namespace) -> dict[str, Any]:
    from flax import nnx

    from mamba_llama_jax.config import HybridConfig
    from mamba_llama_jax.convert.from_attention import build_hybrid

    teacher = _jax_model(args.teacher, args.tiny)
    return {_model_name(f): teacher if f == 1.0 else build_hybrid(teacher, HybridConfig(attn_fraction=f),
                                                                   rngs=nnx.Rngs(1))
            for f in args.fractions}


def _filled_cache(abstract: Any, plen: int, seed: int) -> Any:
    """A DecodeState as if a `plen`-token prompt had been prefilled: every K/V and Mamba state entry a
    deterministic pseudo-random value (never zeros: they can time faster than real data), slots [0, plen)
    valid, the next write at slot plen. Built in one jit from shapes, elementwise: no temporaries beyond the
    cache itself (256 x 4352 slots of K/V is 26 GB)."""
    import jax
    import jax.numpy as jnp

    from mamba_llama_jax.models.cache import DecodeState

    leaves, tree = jax.tree.flatten(abstract.layers)
    b, slots = abstract.valid.shape

    @jax.jit
    def make() -> Any:
        new = []
        for i, a in enumerate(leaves):
            ang = jnp.full(a.shape, 0.1 * (seed + i), jnp.float32)
            for dim, c in enumerate((0.7548, 0.5698, 0.3247, 0.1735, 0.0934)[: len(a.shape)]):
                ang = ang + jax.lax.broadcasted_iota(jnp.float32, a.shape, dim) * c
            scale = 0.1 if a.dtype == jnp.float32 else 1.0  # fp32 = Mamba ssm states: keep them moderate
            new.append((jnp.sin(ang * 12.9898) * scale).astype(a.dtype))
        valid = jnp.broadcast_to(jnp.arange(slots)[None] < plen, (b, slots))
        return DecodeState(jax.tree.unflatten(tree, new), jnp.int32(plen), valid, jnp.full((b,), plen, jnp.int32))
    return make()


def _load_result(path: str) -> dict[str, Any] | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return json.loads(text) if text.strip() else None


def worker_hybrid(args: argparse.Namespace) -> dict[str, Any]:
    """Decode tokens/s at a given context for the teacher and the hybrids, timing the on-device decode loop
    alone from a cache filled as if a prompt of `plen` tokens had been prefilled (prefill at 256 x 4096 would
    not fit as one XLA attention call, and it is not what this table measures). One model and shape at a time:
    compile (ahead of time), fill the cache, time; the result file is rewritten before each compile (a
    heartbeat the orchestrator watches) and after each row. Resumes from an existing result file, skipping rows
    done or marked skipped there (the orchestrator restarts a killed worker this way)."""
    import gc

    import jax
    from flax import nnx

    from mamba_llama_jax.inference import generate as G
    from pallas_kernels import dispatch

    deadline = args.stage_deadline_at
    out = _load_result(args.result) or {
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "new_tokens": args.new_tokens, "models": {}, "rows": [],
        "skipped": [], "workers": 0, "method": "decode loop only, from a cache filled with pseudo-random K/V and "
                                               "Mamba states at the given context (prompt) length"}
    out["workers"] += 1
    out["current"] = None
    done = {tuple(r["key"]) for r in out["rows"]} | {tuple(s["key"]) for s in out["skipped"]}
    save = lambda: _write_json(args.result, out)
    save()
    gens = {n: G.Generator(m, window_block=128) for n, m in _hybrid_models(args).items()}
    n_new = args.new_tokens
    for n, g in gens.items():
        m = nnx.merge(g.graphdef, g.state)
        out["models"][n] = {"attn_layers": [i for i, l in enumerate(m.layers) if isinstance(l.mixer, G.FusedAttention)],
                            "num_layers": len(m.layers),
                            "weight_bytes": sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(g.state))}
        del m
    save()
    dev = jax.devices()[0]

    def mem() -> int:
        try:
            return int((dev.memory_stats() or {}).get("bytes_in_use", 0))
        except Exception:  # noqa: BLE001  (not every backend reports memory)
            return 0

    sampling = G.SamplingConfig(max_new_tokens=n_new)
    for plen, b in args.grid:
        for name, g in gens.items():
            key = (name, plen, b)
            if key in done:
                continue
            if time.time() > deadline - 8:
                out["skipped"].append({"key": list(key), "why": "stage deadline"})
                save()
                continue
            out["current"] = {"key": list(key), "since": time.time()}
            save()
            if os.environ.get("BENCH_GENERATE_STALL_ON") == f"{name},{plen},{b}":  # smoke test of the watchdog
                time.sleep(3600)
            try:
                row = _hybrid_row(g, name, plen, b, n_new, sampling, args, deadline, mem)
                out["rows"].append(row)
                print(f"[hybrid] {name:>10} ctx {plen:5d} b {b:3d}: {row['decode_ms_per_step']:.3f} ms/step = "
                      f"{row['decode_tokens_per_s']:,.0f} tok/s; cache {row['cache_bytes_per_row'] / 1e6:.2f} "
                      f"MB/row ({row['runs']} runs, compile {row['compile_s']:.1f} s, attention "
                      f"{row['decode_attention']}, GEMVs {row['fused_decode']}, ops/step "
                      f"{row['launching_ops_per_step']})", flush=True)
            except Exception as e:  # noqa: BLE001  (one row failing, e.g. out of memory, must not lose the rest)
                out["skipped"].append({"key": list(key), "why": f"failed: {e!r}"[:1500]})
                print(f"[hybrid] {name} ctx {plen} b {b}: failed: {e!r}"[:1500], flush=True)
            out["current"] = None
            save()
            gc.collect()
    out["decode_attention_traced"] = dispatch.last_choice("decode_attention")
    save()
    return out


_FALLBACKS = ({FUSED_ENV: "0"}, {FORCE_REF: "1"})


def _hybrid_row(g: Any, name: str, plen: int, b: int, n_new: int, sampling: Any, args: argparse.Namespace,
                deadline: float, mem: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mamba_llama_jax.inference import generate as G
    from mamba_llama_jax.models.cache import DecodeState
    from pallas_kernels import dispatch

    slots = G._round_up(plen + n_new, 128)
    spec = G._spec(sampling, g.cfg.vocab_size)
    key, temp, top_p = g._dyn(sampling)
    first = jnp.zeros((b,), jnp.int32) + 7
    abstract = jax.eval_shape(lambda: nnx.merge(g.graphdef, g.state).init_cache(b, slots))

    def compile_loop() -> tuple[Any, float]:
        dispatch.forget_choices(*DECODE_CHOICE_OPS)
        t0 = time.perf_counter()
        comp = G._decode_loop.lower(g.graphdef, g.state, abstract, first, key, temp, top_p, spec=spec, n_new=n_new,
                                    eos=(), pad_id=0, phases=g.phases(plen, n_new, slots)).compile()
        return comp, time.perf_counter() - t0

    # A kernel that does not compile: the fused GEMVs off, then every kernel off; the step that worked stays
    # in force for the rest of the worker (set in os.environ), and the row says so.
    fallback = None
    while True:
        try:
            comp, ctime = compile_loop()
            break
        except Exception as e:  # noqa: BLE001
            nxt = next((env for env in _FALLBACKS if any(os.environ.get(k) != v for k, v in env.items())), None)
            if nxt is None:
                raise
            fallback = f"{nxt} after: {e!r}"[:1000]
            print(f"[hybrid] {name} ctx {plen} b {b}: compile failed, retrying with {nxt}: {e!r}"[:1500], flush=True)
            os.environ.update(nxt)
            jax.clear_caches()
    # what the trace chose; a trace reused from jit's cache records nothing: then what the Generator predicts
    impl = decode_choices("decode_attention", "fused_decode")
    if impl["decode_attention"] == "none" and g.has_attention:
        impl["decode_attention"] = g.decode_attention_impl()
    if impl["fused_decode"] == "none":
        impl["fused_decode"] = g.fused_decode_impl(b)
    ops = {k: v["launching_ops"] for k, v in _hlo_facts(comp.as_text()).items()}
    m0 = mem()
    cache = _filled_cache(abstract, plen, seed=b + plen)
    jax.block_until_ready(cache)
    m1 = mem()
    layer_bytes = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(cache.layers))
    valid0 = cache.valid
    times: list[float] = []
    row_end = time.time() + args.max_seconds_per_row
    for r in range(args.runs + 1):  # the first call warms up
        c_in = DecodeState(cache.layers, jnp.int32(plen), jnp.array(valid0), jnp.full((b,), plen, jnp.int32))
        t0 = time.perf_counter()
        toks, steps, cache = comp(g.state, c_in, first, key, temp, top_p)
        jax.block_until_ready((toks, cache))
        dt = time.perf_counter() - t0
        if r:
            times.append(dt)
        if r >= args.min_runs and time.time() > row_end:  # long rows stop early; the table says how many
            break
        if r >= 2 and time.time() > deadline - 3:
            break
    assert int(steps) == n_new, int(steps)
    steps_run = n_new - 1
    row = {"key": [name, plen, b], "model": name, "prompt_len": plen, "batch": b, "slots": slots,
           "runs": len(times), "decode_ms_per_step": median(times) / steps_run * 1e3,
           "decode_ms_per_step_min": min(times) / steps_run * 1e3,
           "decode_tokens_per_s": b * steps_run / median(times), "cache_bytes_per_row": layer_bytes / b,
           "measured_device_bytes_per_row": (m1 - m0) / b if m1 > m0 else None, "compile_s": ctime,
           **impl, "launching_ops_per_step": ops}
    if fallback:
        row["fallback"] = fallback
    del cache, c_in, valid0, comp
    return row


# ------------------------------------------------------------------------------------------- device suite

GPU_TESTS = ("tests/pallas/test_decode_attention.py", "tests/pallas/test_fused_decode.py")


def _report_head(args: argparse.Namespace, what: str) -> dict[str, Any]:
    return {"what": what, "date": now(),
            "device": device(), "versions": versions(),
            "command": "PYTHONPATH=$PWD python3 benchmarks/bench_generate.py " + " ".join(sys.argv[1:]),
            "config": {"model": "random weights, SmolLM2-135M shape" + (" (tiny)" if args.tiny else ""),
                       "dtype": "bfloat16", "eos": "ignored (fixed decode length)"},
            "stages": {}}


def _gpu_tests(args: argparse.Namespace, out_dir: Path, t_end: float) -> dict[str, Any]:
    """The kernels' compiled tests. tests/conftest.py defaults JAX_PLATFORMS to cpu: without JAX_PLATFORMS=cuda
    every gpu test would skip (seen 2026-11-23), and all-skipped is not a pass."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           f"--junitxml={out_dir / 'test-gpu.xml'}", *GPU_TESTS]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(20, min(args.test_timeout_s,
                                                                                   t_end - time.time())),
                           env={**os.environ, "JAX_PLATFORMS": "cuda"})
        tail = (r.stdout + r.stderr)[-4000:]
        rc: Any = r.returncode
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-4000:]
        rc = "timeout"
    failed = sorted({f for f in GPU_TESTS if re.search(rf"(FAILED|ERROR) {re.escape(f)}", tail)})
    summary = (tail.strip().splitlines() or [""])[-1]
    ok = rc == 0 and " passed" in summary and not failed
    return {"rc": rc, "passed": ok, "failed_files": failed, "summary": summary, "tail": tail,
            "s": time.perf_counter() - t}


def _kernel_env_after_tests(tests: dict[str, Any] | None) -> tuple[dict[str, str], str]:
    """Which kernels the measurements may use: a kernel whose compiled test failed is turned off (measured on
    its reference rather than not at all); no test result (tiny run, timeout) changes nothing."""
    if not tests or tests.get("rc") in ("timeout", None):
        return {}, "kernels as dispatched (no test verdict)"
    failed = tests.get("failed_files") or []
    if any("decode_attention" in f for f in failed):
        return {FORCE_REF: "1"}, "every kernel off: test_decode_attention failed on the GPU"
    if any("fused_decode" in f for f in failed):
        return {FUSED_ENV: "0"}, "fused GEMVs off: test_fused_decode failed on the GPU"
    return {}, "kernels as dispatched"


def _hybrid_stage(args: argparse.Namespace, deadline: float, env_extra: dict[str, str],
                  progress: Any) -> dict[str, Any] | None:
    """Runs the hybrid worker under a watchdog: a worker that rewrites nothing for `stall_s` is killed, its
    current row marked stalled, and a new worker resumes after it; a worker that dies is restarted the same way;
    at the deadline the worker is killed and what it wrote is the table."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        res = f.name
    cmd = [sys.executable, __file__, "--worker", "hybrid", "--result", res, "--new-tokens", str(args.table_new_tokens),
           "--grid", ";".join(f"{p},{b}" for p, b in args.grid), "--runs", str(args.table_runs), "--min-runs",
           str(args.table_min_runs), "--stage-deadline-at", str(deadline), "--max-seconds-per-row",
           str(args.max_seconds_per_row), "--fractions", ",".join(map(str, args.fractions))]
    cmd += (["--tiny"] if args.tiny else []) + (["--teacher", args.teacher] if args.teacher else [])
    events = []
    for attempt in range(args.max_restarts + 1):
        if time.time() > deadline - 15:
            break
        proc = subprocess.Popen(cmd, env=_worker_env(CMDBUF, env_extra))
        last = time.time()
        why = None
        while proc.poll() is None:
            time.sleep(1.0)
            try:
                last = max(last, os.path.getmtime(res))
            except OSError:
                pass
            if time.time() - last > args.stall_s:
                why = f"stalled: nothing reported for {args.stall_s:.0f} s, worker killed"
            elif time.time() > deadline + 10:
                why = "stage deadline: worker killed"
            if why:
                proc.kill()
                proc.wait()
                break
            progress(_load_result(res))
        out = _load_result(res) or {}
        rc = proc.returncode
        events.append({"attempt": attempt, "rc": rc, "why": why})
        print(f"hybrid worker attempt {attempt}: rc={rc} {why or ''}", flush=True)
        if rc == 0 or (why or "").startswith("stage deadline"):
            break
        cur = out.get("current")
        if cur:  # the row it was on: stalled or crashed there; the next worker starts after it
            out["skipped"].append({"key": cur["key"], "why": why or f"worker died (rc {rc}) on this row"})
            out["current"] = None
            _write_json(res, out)
        elif not out:
            break  # died before writing anything: a restart would do the same
    out = _load_result(res)
    if out is not None:
        out["watchdog"] = events
    return out


def orchestrate_device(args: argparse.Namespace) -> None:
    """The one device call: (1) gpu tests of the decode kernels, (2) the hybrid table, (3) decode-path
    variants of the teacher. Stage deadlines come from one overall deadline; both result files are rewritten
    whenever something new is known."""
    started = time.perf_counter()
    t_end = time.time() + args.deadline_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    hyb = _report_head(args, "hybrid table")
    hyb["config"].update(new_tokens=args.table_new_tokens, grid=args.grid, runs=args.table_runs,
                         min_runs=args.table_min_runs, max_seconds_per_row=args.max_seconds_per_row)
    var = _report_head(args, "decode-path variants")
    var["config"].update(prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs,
                         batches=args.variant_batches)

    def write() -> None:
        for rep, stem, render in ((hyb, "generate_hybrid", render_hybrid_md), (var, "generate_variants",
                                                                               render_variants_md)):
            rep["wall_s"] = time.perf_counter() - started
            _write_json(out_dir / f"{stem}.json", rep)
            (out_dir / f"{stem}.md").write_text(render(rep))

    # 1. compiled kernel tests
    tests = None
    if not args.tiny and not args.skip_tests:
        tests = _gpu_tests(args, out_dir, t_end)
        hyb["stages"]["gpu_tests"] = var["stages"]["gpu_tests"] = tests
        print(f"gpu tests: rc {tests['rc']}, {tests['summary']}; failed files {tests['failed_files']}", flush=True)
        write()
    env_extra, kernels_note = _kernel_env_after_tests(tests)
    hyb["config"]["kernels"] = kernels_note
    var["config"]["kernels"] = "as each variant names them" + (f" (while for the hybrid table: {kernels_note})"
                                                                 if env_extra else "")
    # 2. hybrid table
    hyb_deadline = min(time.time() + args.hybrid_budget_s, t_end - args.variants_reserve_s)

    def progress(partial: dict[str, Any] | None) -> None:
        if partial and len(partial.get("rows", [])) != len((hyb["stages"].get("hybrid") or {}).get("rows", [])):
            hyb["stages"]["hybrid"] = partial
            write()

    t = time.perf_counter()
    hyb["stages"]["hybrid"] = _hybrid_stage(args, hyb_deadline, env_extra, progress)
    hyb["stages"]["hybrid_s"] = time.perf_counter() - t
    write()
    # 3. variants: those sharing XLA flags share a worker (kernel choices are per trace, flags per process)
    groups: dict[str, list[str]] = {}
    names = list(args.device_variants)
    if env_extra and "fused" in names:  # its kernels failed their test: last in its worker, so a crash loses less
        names = [n for n in names if n != "fused"] + ["fused"]
    for name in names:
        groups.setdefault(VARIANTS[split_variant(name)[0]][0], []).append(name)
    args.deadline_at = t_end
    var["stages"]["variants"] = {}
    for flags, names in groups.items():
        left = t_end - time.time()
        if left < 25:
            for n in names:
                var["stages"]["variants"][n] = {"skipped": f"only {left:.0f} s left"}
            continue
        # no env_extra: each variant names its own kernels (a failed test shows in the table's header)
        r = _spawn("jax", args, ["--variant", ",".join(names), "--batches", ",".join(map(str, args.variant_batches)),
                                 "--runs", str(args.runs), "--hlo", "--dump-dir", str(out_dir)], flags,
                   timeout=left - 5)
        for n in names:
            var["stages"]["variants"][n] = _variant_result(r, n) or {"skipped": "worker wrote nothing"}
        write()
    write()
    print(render_hybrid_md(hyb), flush=True)
    print(render_variants_md(var), flush=True)


def _fmt_ops(d: dict[str, int] | None) -> str:
    return "/".join(str(v) for v in (d or {}).values()) or "-"


def _header_md(r: dict[str, Any], title: str) -> list[str]:
    L = [f"# {title} ({r['date']})", "",
         f"Device: {r['device']}. Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
         f"Model: {r['config']['model']}, bf16. Command: `{r['command']}`. Wall {r.get('wall_s', 0):.0f} s. "
         f"Kernels: {r['config'].get('kernels', '-')}.", ""]
    g = r["stages"].get("gpu_tests")
    if g:
        verdict = "passed" if g["passed"] else f"NOT passed (failed: {', '.join(g['failed_files']) or '-'})"
        L += [f"**Kernel tests on the GPU** (`pytest -m gpu {' '.join(GPU_TESTS)}`, compiled Triton vs the "
              f"pure-JAX references): {verdict}; rc {g['rc']}, `{g['summary']}`.", ""]
    return L


def render_hybrid_md(r: dict[str, Any]) -> str:
    L = _header_md(r, "Decode: teacher vs hybrids")
    h = r["stages"].get("hybrid")
    if not h:
        return "\n".join(L + ["Hybrid table: no rows (the stage has not run or its worker wrote nothing).", ""])
    c = r["config"]
    L += [f"Method: {h['method']}; {c['new_tokens']} new tokens per run, median over the runs in the table (up to "
          f"{c['runs']}, at least {c['min_runs']}, fewer where a row would pass {c['max_seconds_per_row']} s). "
          "Cache MB per sequence: the allocated decode state per row (attention layers' K/V for every slot, Mamba "
          "layers' conv + fp32 ssm state); 'measured' is the device allocator's bytes_in_use delta after "
          "allocating and filling it. Ops/step: launching ops per decode step in the optimised HLO's while body. "
          "Attention / GEMVs: the implementations traced (pallas_triton = the Pallas kernels).", ""]
    L += ["| model | attention layers | context | batch | decode ms/step | decode tok/s | x teacher | "
          "cache MB/seq | measured MB/seq | attention / GEMVs | ops/step | runs |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(x["prompt_len"], x["batch"]): x for x in h["rows"] if x["model"] == "teacher"}
    order = list(h["models"])
    for x in sorted(h["rows"], key=lambda x: (x["prompt_len"], x["batch"], order.index(x["model"]))):
        mdl = h["models"][x["model"]]
        t = base.get((x["prompt_len"], x["batch"]))
        ratio = f"{x['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}" if t else "-"
        meas = x.get("measured_device_bytes_per_row")
        impl = f"{x.get('decode_attention')} / {x.get('fused_decode')}" + (" (fallback)" if x.get("fallback") else "")
        L.append(f"| {x['model']} | {len(mdl['attn_layers'])}/{mdl['num_layers']} | {x['prompt_len']} | "
                 f"{x['batch']} | {x['decode_ms_per_step']:.3f} | {x['decode_tokens_per_s']:,.0f} | {ratio} | "
                 f"{x['cache_bytes_per_row'] / 1e6:.2f} | {meas / 1e6 if meas else float('nan'):.2f} | {impl} | "
                 f"{_fmt_ops(x['launching_ops_per_step'])} | {x['runs']} |")
    L.append("")
    for s in h.get("skipped", []):
        L.append(f"- not measured: {s['key'][0]} ctx {s['key'][1]} batch {s['key'][2]}: {s['why']}")
    for e in h.get("watchdog", []):
        if e.get("why") or e.get("rc") not in (0, None):
            L.append(f"- worker attempt {e['attempt']}: rc {e['rc']}, {e.get('why') or 'ended'}")
    missing = [(p, b) for p, b in c["grid"] if not any(x["prompt_len"] == p and x["batch"] == b for x in h["rows"])]
    if missing:
        L.append(f"- cells with no row at all: {missing}")
    L.append("")
    return "\n".join(L)


def render_variants_md(r: dict[str, Any]) -> str:
    L = _header_md(r, "Decode-path variants of the teacher")
    v = r["stages"].get("variants")
    if not v:
        return "\n".join(L + ["Variants: not run yet.", ""])
    c = r["config"]
    L += [f"Prompt {c['prompt_len']}, {c['new_tokens']} new tokens, EOS ignored; medians of {c['runs']} runs (fewer "
          "where stated). Variants: `ref` = XLA attention and GEMMs (the old path), `attn` = the Pallas decode "
          "attention with XLA's GEMMs, `fused` = decode attention + the fused GEMVs (norm + q·k·v, o + residual, "
          "norm + gate·up + SiLU·mul, down + residual); `+flag` = an XLA flag on top. Every variant runs with "
          f"`{CMDBUF}`. Ops/step: launching ops per decode step in the optimised HLO's while body; tokens: the "
          "first 16 greedy tokens of row 0 compared with `ref`'s.", "",
          "| variant | XLA flags beyond cmdbuf | attention | GEMVs | batch | prefill tok/s | decode ms/step | "
          "decode tok/s | runs | compile s | ops/step | tokens = ref |", "|---" * 12 + "|"]
    ref = (v.get("ref") or {}).get("batches", {})
    for name, x in v.items():
        if "batches" not in x or not x["batches"]:
            why = x.get('skipped') or x.get('error', 'failed')[:200]
            L.append(f"| {name} | - | - | - | - | - | - | - | - | - | - | {why} |")
            continue
        flags = x["xla_flags"].replace(CMDBUF, "").strip() or "-"
        for b, row in x["batches"].items():
            ops = {k: y["launching_ops"] for k, y in (row.get("hlo_while_bodies") or {}).items()}
            rt = ref.get(b, {}).get("first_tokens_row0")
            first_diff = next((i for i, (p, q) in enumerate(zip(rt or [], row["first_tokens_row0"])) if p != q), 16)
            same = "-" if rt is None or name == "ref" else (
                "yes" if rt == row["first_tokens_row0"] else f"first {first_diff}")
            gemv = row.get("fused_decode_traced")
            if row.get("qkv_projection_traced"):  # the q·k·v form (`generate.QKV_OP`), where recorded
                gemv = f"{gemv} (q·k·v {row['qkv_projection_traced']})"
            L.append(f"| {name} | {flags} | {row.get('decode_attention_traced')} | {gemv} | "
                     f"{b} | {row['prefill_tokens_per_s']:,.0f} | {row['decode_ms_per_step']:.3f} | "
                     f"{row['decode_tokens_per_s']:,.0f} | {row['runs']} | {row['compile_s']:.1f} | {_fmt_ops(ops)} | "
                     f"{same} |")
        if x.get("incomplete") or x.get("skipped"):
            L.append(f"| {name} | | | | | | | | | | | {x.get('incomplete') or ''} {x.get('skipped') or ''} |")
    L.append("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="a GGUF file or HF directory instead of random weights")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--suite", choices=("teacher", "device"), default="teacher",
                    help="teacher: the issue-3 table (+HF); device: kernel tests, hybrid table, decode-path variants")
    ap.add_argument("--tiny", action="store_true", help="a tiny model: smoke-tests this script on a CPU")
    ap.add_argument("--batches", default="1,16,64,256", help="teacher suite: batches of the final table")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=21, help="timed runs per JAX row (the median is reported)")
    ap.add_argument("--hf-runs", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=560, help="whole-run budget; later stages get what is left")
    ap.add_argument("--explore-processes", action="store_true",
                    help="teacher suite: each explored variant in a process of its own (what variants with different "
                    "XLA flags always get; otherwise they share one)")
    ap.add_argument("--variants", default="", help="teacher suite: comma-separated subset of " + ",".join(VARIANTS)
                    + "; NAME@SETTINGS adds bench_decode_profile's variant settings (e.g. fused@adot+cublas)")
    # device suite
    ap.add_argument("--device-variants", default=",".join(DEVICE_VARIANTS))
    ap.add_argument("--variant-batches", default="1,64")
    ap.add_argument("--grid", default="128,1;4096,1;128,64;4096,64;128,256;4096,256",
                    help="hybrid table: 'context,batch' pairs, in the order they are run")
    ap.add_argument("--fractions", default=",".join(map(str, HYBRID_FRACTIONS)))
    ap.add_argument("--table-new-tokens", type=int, default=128, help="hybrid table: decode steps per run")
    ap.add_argument("--table-runs", type=int, default=10)
    ap.add_argument("--table-min-runs", type=int, default=3)
    ap.add_argument("--max-seconds-per-row", type=float, default=3.0, help="hybrid table: timed runs stop after")
    ap.add_argument("--hybrid-budget-s", type=float, default=270)
    ap.add_argument("--variants-reserve-s", type=float, default=150, help="device suite: kept for the variants")
    ap.add_argument("--test-timeout-s", type=float, default=150)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--stall-s", type=float, default=90, help="hybrid worker silent this long: killed, row skipped")
    ap.add_argument("--max-restarts", type=int, default=3)
    # worker options
    ap.add_argument("--worker", choices=("jax", "hf", "hybrid"), default=None)
    ap.add_argument("--result", default=None)
    ap.add_argument("--variant", default="fused")
    ap.add_argument("--deadline-at", type=float, default=float("inf"))
    ap.add_argument("--stage-deadline-at", type=float, default=float("inf"))
    ap.add_argument("--min-runs", type=int, default=3)
    ap.add_argument("--max-seconds-per-batch", type=float, default=40, help="HF worker: runs stop after")
    ap.add_argument("--hlo", action="store_true")
    ap.add_argument("--facts", action="store_true")
    ap.add_argument("--dump-dir", default=None)
    ap.add_argument("--dump-batch", type=int, default=1,
                    help="the batch whose decode loop's optimised HLO (the table's variant) goes to the results folder")
    ap.add_argument("--save-weights", default=None)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variant_batches = [int(b) for b in args.variant_batches.split(",")]
    args.device_variants = [v for v in args.device_variants.split(",") if v]
    args.grid = [tuple(int(v) for v in pb.split(",")) for pb in args.grid.split(";") if pb]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    if args.tiny and args.worker is None:  # a CPU smoke test: short contexts, small batches, few runs
        args.grid = list(dict.fromkeys((64 if p > 128 else 16, min(b, 4)) for p, b in args.grid))
        args.prompt_len = min(args.prompt_len, 16)
        args.new_tokens = min(args.new_tokens, 16)
        args.table_new_tokens = min(args.table_new_tokens, 16)
        args.variant_batches = [min(b, 4) for b in args.variant_batches]
        args.runs = min(args.runs, 3)
    if args.worker == "hybrid":
        worker_hybrid(args)
    elif args.worker == "jax":
        worker_jax(args)
    elif args.worker == "hf":
        _write_json(args.result, worker_hf(args))
    elif args.suite == "device":
        orchestrate_device(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
