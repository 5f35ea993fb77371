"""Text generation: one jitted prefill, then the whole decode loop on device (`lax.while_loop` in one `jax.jit`).

Design (the reasons, not the steps):
- The model is split once (`nnx.split`) into a static graphdef and a state pytree; the jitted functions take both
  and `nnx.merge` inside, so the compiled executables are cached by jax on (graphdef, shapes, static sampling
  options) and a second call with the same shapes never recompiles.
- Weight matrices are cast to the compute dtype once, outside the loop: the model would otherwise cast its fp32
  master weights on every step, reading twice the bytes.
- In every attention layer of any `DecoderLM` (teacher or hybrid), q/k/v and gate/up are fused into one matmul
  each at load time (fewer, larger kernels: decode at small batch is launch-bound); Mamba layers keep their own
  single-step decode. A decode step's attention is one Pallas launch on GPU (RoPE + cache write + attention over
  the filled slots, `pallas_kernels/decode_attention.py`); the XLA reference elsewhere reads only the filled part
  of the cache by splitting the loop into phases of `window_block` slots, each a `while_loop` whose attention
  window is a static prefix. At small batch on GPU the rest of a layer's decode step is four more launches
  (`pallas_kernels/fused_decode.py`: RMSNorm + q·k·v; o-projection + residual, merging attention's sequence
  splits; RMSNorm + gate·up + SiLU·mul; down + residual): `Block` hands the norms and residuals to
  `FusedAttention.decode_residual` / `FusedMLP.norm_residual`, also in hybrids (their attention layers and MLPs).
  Past those batches (5-64 rows) XLA's q·k·v GEMM gives split-K partials that the decode attention kernel sums
  and norm-scales, so RMSNorm and the split-K reduction cost no launch (`inference/split_k.py`).
- Prompts are left-padded, so every row's last prompt token sits at the same position and prefill computes the
  LM head only there.
- Sampling keys are `fold_in(seed, step)`, so the streaming path (one jitted step per token) samples the same
  tokens as the on-device loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_llama_jax.errors import GenerationError
from mamba_llama_jax.inference import split_k
from mamba_llama_jax.inference.gate_up_rows import gate_up_form
from mamba_llama_jax.models.cache import DecodeState
from mamba_llama_jax.models.llama import (
    MLP, Attention, Context, DecoderLM, apply_rope, attend, chunk_mask,
)
from mamba_llama_jax.models.mamba import Mamba2
from mamba_llama_jax.ops.attention import attend_one
from mamba_llama_jax.ops.partials import matmul_t_partials, weigh
from pallas_kernels import dispatch
from pallas_kernels.decode_attention import (
    PALLAS_TRITON, by_batch, decode_attention, decode_attention_choice, decode_attention_partials, kernel_would_run,
    merge_partials, merge_splits, plan, uses_dot,
)
from pallas_kernels.lm_head_argmax import lm_head_argmax
from pallas_kernels.mamba_decode import kernel_would_run as mamba_decode_would_run
from pallas_kernels.mamba_chunk import mamba2_chunk
from pallas_kernels.mamba_decode import mamba2_decode
from pallas_kernels.verify_attention import verify_attention
from pallas_kernels.fused_decode import (
    DEFAULT_MAX_HIDDEN, attn_combine_residual, combine_max_splits, gate_up, gate_up_weighed, kernels_would_run,
    matmul_residual, matmul_residual_weigh, matmul_t, merge_mode, norm_gate_up, norm_matmul, rms_norm_reference,
    swiglu,
)

# `Generator.run` decodes a batch as this many rows, by batch (`by_batch`; 0 = as it is), where the decode step's
# kernels are tuned for the padded count and not for the batch's own: the fused GEMVs serve 1-4 rows and the dot-path
# forms (`gate_up_rows`, `split_k`, the attention plans) 16, 32 and 64, while other row counts run XLA's GEMMs and
# fusions (~340 launches a step at 8 rows against 253 at 16). Measured on the H100 in one run (SmolLM2-135M shape,
# prompt 128, 256 new tokens; benchmarks/results/generate_s33_batches.md), ms a step: 4 0.620; 5 0.784, 8 0.745,
# 12 0.767, 16 0.677; 24 0.783, 32 0.778; 48 0.904, 64 0.824. So 5-15 rows decode as 16 and 33-63 as 64 (the
# padded step is the shorter one although it carries more rows). With the `weighed` MLP form at 32 rows (session 34)
# a 32-row step is shorter than a 20-28-row one (batch_padding_s35_b32.md, through `run`): 1.01x at 20, 1.03x at 24,
# 1.05x at 28, for ~1 ms more prefill, which 20 prompts make up only after ~160 new tokens (24: ~30); 1.03x at 21
# and 22, 1.04x at 23 for 0-1.2 ms more prefill (batch_padding_s36_21_23.md). So 21-31 decode as 32, 17-20 stay.
# End to end through `run` (batch_padding_s33.md): 8-11 % faster decoding at 5, 8, 12 and 48 prompts, for up to
# 1.4 ms more prefill (the padding rows' prompts), made up after 15-20 new tokens: so only from PAD_MIN_NEW_TOKENS.
# The padding rows repeat the first prompt and count as finished from the start; the output is the batch's own rows.
# Only where this was measured: Llama models (no Mamba layers) up to the fused GEMVs' model size, with the decode
# kernels on (GPUs). `MAMBA_LLAMA_DECODE_PAD_BATCH=0` turns it off.
PAD_BATCH_BY_BATCH = ((5, 16), (17, 0), (21, 32), (33, 64), (65, 0))
PAD_MIN_NEW_TOKENS = 32
PAD_BATCH_ENV = "MAMBA_LLAMA_DECODE_PAD_BATCH"


def pad_batch_allowed() -> bool:
    """False where MAMBA_LLAMA_DECODE_PAD_BATCH turns batch padding off ("0"/"off"); unset or "1"/"on": on."""
    v = os.environ.get(PAD_BATCH_ENV, "").strip().lower()
    if v in ("", "1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise GenerationError(f"{PAD_BATCH_ENV} must be 0/off or 1/on, got {v!r}")


# Speculative verify chunks through the decode step's kernels (`verify_residual` below: the chunk's b·(k+1) tokens
# as rows of the fused GEMVs): its `-m gpu` test (the chunk through these kernels = the unfused verify) passed on an
# H100 in session 16, and the speculative loop ran with it (benchmarks/results/test-gpu.md).
VERIFY_ROWS_GPU_VERIFIED = True


# The form a decode step's RMSNorm + q·k·v took, recorded at trace time under this op (`dispatch.last_choice`):
# "split_k:N" (XLA's GEMM as N partials, summed in the attention kernel: `split_k`) or "norm_matmul" (its own
# choice then recorded under "fused_decode").
QKV_OP = "qkv_projection"


def verify_rows_fused() -> bool:
    """Whether verify chunks take the decode step's kernels (`VERIFY_ROWS_GPU_VERIFIED`)."""
    return dispatch.kernel_allowed(VERIFY_ROWS_GPU_VERIFIED)


# XLA's GEMMs inside the decode programs on GPUs (the plain loop, the streaming step, the speculative loop):
# "triton" = XLA's default, its autotuned Triton GEMM fusions; "cublas" = `xla_gpu_enable_triton_gemm` off for
# those programs alone (prefill and training keep XLA's choice). cuBLAS measured slower with session 35's step on the
# H100 (benchmarks/results/decode_profile_s35_cublas.md, one process): 0.862 vs 0.798 ms a step at 64, 0.823 vs
# 0.743 at 32, 0.762 vs 0.670 at 16 (and no faster at 64, slower at 1, in session 15), so the default stays XLA's.
DECODE_GEMM = "triton"
DECODE_GEMM_ENV = "MAMBA_LLAMA_DECODE_GEMM"
_GEMM_OPTIONS: dict[str, dict[str, Any]] = {"triton": {}, "cublas": {"xla_gpu_enable_triton_gemm": False}}


def decode_gemm() -> str:
    """The decode programs' GEMM backend: `MAMBA_LLAMA_DECODE_GEMM` if set, else `DECODE_GEMM`."""
    v = os.environ.get(DECODE_GEMM_ENV, "").strip().lower() or DECODE_GEMM
    if v not in _GEMM_OPTIONS:
        raise GenerationError(f"{DECODE_GEMM_ENV} must be one of {', '.join(sorted(_GEMM_OPTIONS))}, got {v!r}")
    return v


def decode_compiler_options() -> dict[str, Any]:
    """XLA options for a decode program compiled now (`decode_gemm` on GPUs; none elsewhere)."""
    return dict(_GEMM_OPTIONS[decode_gemm()]) if dispatch._on_gpu() else {}


class _DecodeJit:
    """`jax.jit(fn, **jit_kw)` compiled with `decode_compiler_options()`, read at each call (compiler options are
    fixed per jitted function, so each set gets its own)."""

    def __init__(self, fn: Any, **jit_kw: Any) -> None:
        functools.update_wrapper(self, fn)
        self._fn, self._kw, self._jits = fn, jit_kw, {}

    def jitted(self) -> Any:
        opts = decode_compiler_options()
        key = tuple(sorted(opts.items()))
        if key not in self._jits:
            self._jits[key] = jax.jit(self._fn, compiler_options=opts or None, **self._kw)
        return self._jits[key]

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.jitted()(*args, **kw)

    def lower(self, *args: Any, **kw: Any) -> Any:
        return self.jitted().lower(*args, **kw)

    def clear_cache(self) -> None:
        for f in self._jits.values():
            f.clear_cache()


def decode_jit(**jit_kw: Any) -> Any:
    """Decorator: `jax.jit` for decode programs, with the GEMM backend of `decode_gemm()` (see above)."""
    return lambda fn: _DecodeJit(fn, **jit_kw)


# ------------------------------------------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.seed, int):
            raise GenerationError(f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "SamplingConfig":
        """From a mapping of options (a request body, a config file): unknown names are an error, not ignored."""
        if not isinstance(options, dict):
            raise GenerationError(f"sampling options must be a mapping, got {type(options).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(map(str, set(options) - set(known)))
        if unknown:
            raise GenerationError(f"unknown sampling option(s) {unknown}; valid options are {known}")
        return cls(**options)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static (compile-time) part of a SamplingConfig; temperature and top_p values stay dynamic."""

    greedy: bool
    top_k: int
    use_top_p: bool


def _spec(s: SamplingConfig, vocab: int) -> _Spec:
    if s.greedy:
        return _Spec(True, 0, False)
    return _Spec(False, min(s.top_k, vocab), s.top_p < 1.0)


def greedy_ids(model: DecoderLM, h: jax.Array) -> jax.Array:
    """(b,) int32 greedy ids for final-norm hidden rows h (b, D): argmax over the logits, or, with a tied head (the
    embedding table is the output-major weight), through `pallas_kernels.lm_head_argmax`, whose kernel (no logits in
    memory) runs where MAMBA_LLAMA_LM_HEAD_KERNEL=1 asks for it."""
    if model.lm_head is None:
        dt = jnp.dtype(model.cfg.dtype)
        return lm_head_argmax(h.astype(dt), model.embed_tokens.embedding[...].astype(dt))
    return jnp.argmax(model.logits(h), axis=-1).astype(jnp.int32)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  spec: _Spec) -> jax.Array:
    """(b, V) fp32 logits -> (b,) int32 token ids."""
    if spec.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if spec.top_k == 0 and not spec.use_top_p:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    if spec.top_k:
        vals, idx = jax.lax.top_k(logits, spec.top_k)
    else:  # top-p over the whole vocabulary needs it sorted
        idx = jnp.argsort(-logits, axis=-1)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    if spec.use_top_p:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens: the best is always kept
        vals = jnp.where(before < top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# --------------------------------------------------------------------------------------- inference-only modules


class FusedAttention(nnx.Module):
    """`Attention` with q/k/v in one matmul and a one-launch decode step.

    Same maths and the same KVCache as `models.llama.Attention`; built from one by `prepare_for_inference`.
    A single-token decode step goes through `pallas_kernels.decode_attention.decode_attention`: on GPU one Pallas
    kernel does RoPE, the cache write and attention over the filled slots; elsewhere (or with
    MAMBA_LLAMA_FORCE_REFERENCE=1) the XLA reference reads the first `decode_window` slots.
    """

    def __init__(self, attn: Attention):
        # output-major (N, K), as `pallas_kernels.fused_decode` reads them (contiguous per output)
        self.qkv = nnx.Param(jnp.concatenate(
            [attn.q_proj.kernel[...], attn.k_proj.kernel[...], attn.v_proj.kernel[...]], axis=1).T)
        self.o = nnx.Param(attn.o_proj.kernel[...].T)
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.dtype = attn.dtype
        self.decode_window = 0  # static, set per decode phase; 0 = the whole cache

    def init_cache(self, batch: int, slots: int) -> Any:
        return Attention.init_cache(self, batch, slots)  # type: ignore[arg-type]  (same fields)

    def decode_residual(self, x: jax.Array, norm: Any, ctx: Context, cache: Any,
                        next_norm: Any = None) -> tuple[Any, Any]:
        """x + attention(norm(x)) for one decode token per row (x: (b, 1, D)), as three or four launches on GPU at
        small batch: RMSNorm + q·k·v (`fused_decode.norm_matmul`), decode attention, the merge of its sequence
        splits when it ran split (`merge_splits`, or in the next kernel's prologue: `fused_decode.merge_mode`), and
        o-projection + residual. Each piece falls back to its
        reference on its own (CPU, large batch, shapes a kernel does not tile): then this is exactly
        `x + self(norm(x), ctx, cache)[0]`. Given the MLP's norm (`next_norm`) where the `weighed` MLP form applies
        (`gate_up_rows`), the result is `WeighedRows` (the rows and the rows times that norm's weight)."""
        from mamba_llama_jax.models.cache import KVCache

        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        dt = jnp.dtype(self.dtype)
        x2 = x[:, 0].astype(dt)
        b = x2.shape[0]
        wo = self.o[...].astype(dt)
        qkv, proj = self._norm_qkv(x2, norm)
        cos, sin = ctx.cos[:, 0], ctx.sin[:, 0]
        args = (qkv, cache.k, cache.v, cos, sin, ctx.index, ctx.valid)
        kw = dict(num_heads=h, num_kv_heads=kv, window=self.decode_window)
        if (decode_attention_choice(qkv, cache.k, cache.v, cos, sin, ctx.valid, rows=proj.get("rows"), **kw)
                == PALLAS_TRITON
                and kernels_would_run(b, h * d, wo.shape[0])):
            block, splits = plan(b, kv, self.decode_window or cache.k.shape[1], max_splits=combine_max_splits(b),
                                 dot=uses_dot(b, d))
            if splits > 1:
                o_part, m, l, kc, vc = decode_attention_partials(*args, block=block, splits=splits, **kw, **proj)
                if merge_mode() == "combine":  # the o-projection kernel merges the splits: no launch for it
                    return attn_combine_residual(o_part, m, l, wo, x2)[:, None], KVCache(kc, vc)
                merged = (merge_splits if merge_mode() == "kernel" else merge_partials)(o_part, m, l, dt)
                return matmul_residual(merged, wo, x2)[:, None], KVCache(kc, vc)
        out, kc, vc = decode_attention(*args, **kw, **proj)
        if next_norm is not None and weighed_form(b, wo.shape[0]):
            rows, hw, *squares = matmul_residual_weigh(out, wo, x2, next_norm.weight[...])
            return WeighedRows(rows[:, None], hw, *squares), KVCache(kc, vc)
        return matmul_residual(out, wo, x2)[:, None], KVCache(kc, vc)

    def _norm_qkv(self, x2: jax.Array, norm: Any) -> tuple[jax.Array, dict[str, Any]]:
        """RMSNorm + q·k·v of a decode step's rows as (qkv, the decode attention's keywords for it):
        `fused_decode.norm_matmul`, or with `split_k.qkv_splits` > 1 (past its kernels' batches, or asked for)
        XLA's GEMM as split-K partials of the rows times the norm's weight, which the attention sums and scales
        (`rows=`)."""
        wt = self.qkv[...].astype(x2.dtype)
        rows, width = x2.shape
        parts = split_k.qkv_splits(rows, fused=kernels_would_run(rows, width, wt.shape[0]))
        if parts > 1 and width % parts == 0:
            dispatch.record_choice(QKV_OP, f"split_k:{parts}")
            return matmul_t_partials(weigh(x2, norm.weight[...]), wt, parts), dict(rows=x2, eps=norm.eps)
        dispatch.record_choice(QKV_OP, "norm_matmul")  # which itself records its choice under "fused_decode"
        return norm_matmul(x2, norm.weight[...], wt, eps=norm.eps), {}

    def verify_residual(self, x: jax.Array, norm: Any, ctx: Context, cache: Any) -> tuple[jax.Array, Any]:
        """x + attention(norm(x)) for a verify chunk x (b, t, D): its b·t tokens go through RMSNorm + q·k·v and
        o-projection + residual as rows (`fused_decode.norm_matmul` / `matmul_residual`: the plain decode step's
        kernels where b·t is within their rows, the same maths as their references elsewhere)."""
        b, t, width = x.shape
        if t == 1:  # a one-token chunk (a Mamba draft's steps) is a decode step to attention
            return self.decode_residual(x, norm, ctx, cache)
        if not verify_rows_fused():
            y, cache = self(norm(x), ctx, cache)
            return x + y, cache
        dt = jnp.dtype(self.dtype)
        x2 = x.reshape(b * t, width).astype(dt)
        qkv = norm_matmul(x2, norm.weight[...], self.qkv[...].astype(dt), eps=norm.eps)
        out, cache = self._attend(qkv.reshape(b, t, -1), ctx, cache)
        y = matmul_residual(out.reshape(b * t, -1).astype(dt), self.o[...].astype(dt), x2)
        return y.reshape(b, t, width), cache

    def __call__(self, x: jax.Array, ctx: Context, cache: Any) -> tuple[jax.Array, Any]:
        from mamba_llama_jax.models.cache import KVCache

        b, t, _ = x.shape
        dt = jnp.dtype(self.dtype)
        qkv = matmul_t(x.astype(dt), self.qkv[...].astype(dt))
        if cache is not None and not ctx.prefill and t == 1:
            out, kc, vc = decode_attention(qkv[:, 0], cache.k, cache.v, ctx.cos[:, 0], ctx.sin[:, 0], ctx.index,
                                           ctx.valid, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                           window=self.decode_window)
            return matmul_t(out[:, None].astype(dt), self.o[...].astype(dt)), KVCache(kc, vc)
        out, cache = self._attend(qkv, ctx, cache)
        return matmul_t(out.astype(dt), self.o[...].astype(dt)), cache

    def _attend(self, qkv: jax.Array, ctx: Context, cache: Any) -> tuple[jax.Array, Any]:
        """Attention of a chunk from its q·k·v (b, t, (h + 2·kv)·d): RoPE, the cache write, attention over cache +
        chunk (or the chunk alone at prefill / without a cache). Returns (b, t, h·d) and the cache. A chunk
        appended to a filled cache (a speculative verify) goes through `pallas_kernels.verify_attention`: one
        launch on GPU where its kernel runs, and fp32 probabilities either way, as a decode step has them."""
        from mamba_llama_jax.models.cache import KVCache

        b, t, _ = qkv.shape
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if cache is not None and not ctx.prefill:
            out, kc, vc = verify_attention(qkv, cache.k, cache.v, ctx.cos, ctx.sin, ctx.index, ctx.valid,
                                           num_heads=h, num_kv_heads=kv)
            return out, KVCache(kc, vc)
        q = qkv[..., : h * d].reshape(b, t, h, d)
        k = qkv[..., h * d: (h + kv) * d].reshape(b, t, kv, d)
        v = qkv[..., (h + kv) * d:].reshape(b, t, kv, d)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:  # prefill: the chunk attends to itself and fills the (empty) cache
            start = (0, ctx.index, 0, 0)
            cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                            jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start))
        return attend(q, k, v, chunk_mask(ctx)).reshape(b, t, h * d), cache


def _attend_one(q: jax.Array, kc: jax.Array, vc: jax.Array, mask: jax.Array, window: int) -> jax.Array:
    """(b, 1, h, d) query against the cache with a (b, 1, slots) mask; see `ops.attention.attend_one`."""
    b, _, h, d = q.shape
    return attend_one(q[:, 0], kc, vc, mask[:, 0], window).reshape(b, 1, h, d)


@dataclasses.dataclass(frozen=True)
class WeighedRows:
    """A decode step's rows after attention (b, 1, D) and, (b, D), those rows times the MLP norm's weight without its
    row scale (`ops.partials.weigh`): what the `weighed` MLP form (`gate_up_rows`) hands from the o-projection to
    gate·up; with `fused_decode.squares_from()` "o", also the rows' sum-of-squares partials (P, b) fp32."""

    rows: jax.Array
    weighed: jax.Array
    squares: jax.Array | None = None


def weighed_form(rows: int, width: int) -> bool:
    """Whether a decode step of `rows` rows takes the `weighed` MLP form: asked for (`gate_up_rows.gate_up_form`)
    and past the fused GEMVs' batches."""
    return gate_up_form(rows) == "weighed" and not kernels_would_run(rows, width)


class FusedMLP(nnx.Module):
    """SwiGLU with gate and up in one matmul."""

    def __init__(self, mlp: MLP):
        # output-major (N, K), as in `FusedAttention`
        self.gate_up = nnx.Param(jnp.concatenate([mlp.gate_proj.kernel[...], mlp.up_proj.kernel[...]], axis=1).T)
        self.down = nnx.Param(mlp.down_proj.kernel[...].T)
        self.dtype = mlp.down_proj.dtype
        self.inter = mlp.gate_proj.kernel.shape[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype)
        gu = matmul_t(x.astype(dt), self.gate_up[...].astype(dt))
        return matmul_t(swiglu(gu, self.inter), self.down[...].astype(dt))

    def norm_residual(self, x: Any, norm: Any) -> jax.Array:
        """x + self(norm(x)), the b·t tokens of x (b, t, D) taken as rows: at a decode step or a speculative
        verify chunk, two launches on GPU while b·t is small: RMSNorm + gate·up + SiLU·mul
        (`fused_decode.norm_gate_up`) and down + residual (`fused_decode.matmul_residual`); their references
        elsewhere (prefill, larger batches), which are exactly the unfused ops. x as `WeighedRows` (the `weighed`
        form): gate·up takes its weighed rows and applies the norm's row scale (`fused_decode.gate_up_weighed`)."""
        if isinstance(x, WeighedRows):
            dt = jnp.dtype(self.dtype)
            b, t, width = x.rows.shape
            x2 = x.rows.reshape(b * t, width).astype(dt)
            act = gate_up_weighed(x.weighed, x2, self.gate_up[...].astype(dt), eps=norm.eps, squares=x.squares)
            return matmul_residual(act, self.down[...].astype(dt), x2).reshape(b, t, width)
        b, t, width = x.shape
        if t != 1 and not verify_rows_fused():
            return x + self(norm(x))
        dt = jnp.dtype(self.dtype)
        x2 = x.reshape(b * t, width).astype(dt)
        wt = self.gate_up[...].astype(dt)
        # plain rows where the weighed form is planned (after a Mamba layer, which weighs nothing) take the kernel
        if not kernels_would_run(b * t, width, self.inter) and gate_up_form(b * t) in ("kernel", "weighed"):
            act = gate_up(rms_norm_reference(x2, norm.weight[...], norm.eps), wt)  # the norm stays with XLA
        else:
            act = norm_gate_up(x2, norm.weight[...], wt, eps=norm.eps)
        return matmul_residual(act, self.down[...].astype(dt), x2).reshape(b, t, width)


class FusedMamba2(Mamba2):
    """`Mamba2` with output-major projections and a three-launch decode step; built from one by
    `prepare_for_inference` where `pallas_kernels.mamba_decode` would run its kernel.

    Same maths, parameters and cache as `models.mamba.Mamba2` (prefill and `multistep` run its own code through
    the projections `_in` / `_out_proj` below). A single-token decode step is RMSNorm + in_proj
    (`fused_decode.norm_matmul`), the whole step between the projections (`mamba_decode.mamba2_decode`: conv,
    SiLU, state update, D skip, gated norm) and out_proj + residual (`fused_decode.matmul_residual`), where XLA
    runs ~12 kernels (`pallas_kernels/mamba_decode.py` says why that matters at decode). A verify chunk's steps
    between the projections are one launch too (`_chunk_steps`: `pallas_kernels.mamba_chunk`)."""

    def __init__(self, m: Mamba2):  # noqa: D107 - no super().__init__: the parameters are m's, not fresh ones
        self.d_inner, self.d_xb, self.d_state = m.d_inner, m.d_xb, m.d_state
        self.nheads, self.headdim, self.mcfg, self.dtype, self.conv_dim = (m.nheads, m.headdim, m.mcfg, m.dtype,
                                                                           m.conv_dim)
        # output-major (N, K), as `pallas_kernels.fused_decode` reads them (contiguous per output). in_proj's
        # outputs (d_inner + conv channels + heads: 1,545 for SmolLM2's hybrids) padded with zero rows to a multiple
        # of 16, the fused GEMVs' tile, so that RMSNorm + in_proj is one launch at decode; nothing reads the
        # padding columns (`models.mamba.mamba_project` and the Mamba2 decode kernel stop at the heads' dt).
        w_in = m.in_proj.kernel[...].T
        self.in_t = nnx.Param(jnp.pad(w_in, ((0, -w_in.shape[0] % 16), (0, 0))))
        self.out_t = nnx.Param(m.out_proj.kernel[...].T)
        self.conv1d, self.dt_bias, self.A_log, self.D, self.norm = m.conv1d, m.dt_bias, m.A_log, m.D, m.norm

    def _in(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype)
        return matmul_t(x.astype(dt), self.in_t[...].astype(dt))

    def _out_proj(self, y: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype)
        return matmul_t(y.astype(dt), self.out_t[...].astype(dt))

    def _chunk_steps(self, *args: Any, **kw: Any) -> tuple[jax.Array, ...]:
        """A verify chunk's steps between the projections as one launch where `pallas_kernels.mamba_chunk` runs
        (the reference, `Mamba2`'s own, elsewhere)."""
        return mamba2_chunk(*args, **kw)

    def decode_residual(self, x: jax.Array, norm: Any, ctx: Context, cache: Any,
                        next_norm: Any = None) -> tuple[jax.Array, Any]:
        """x + mixer(norm(x)) for one decode token per row (x: (b, 1, D)): three launches on GPU (see the class);
        each falls back to its reference on its own, and the references are exactly the unfused ops. (`next_norm`:
        the attention layers' signature; the rows come back plain, never `WeighedRows`.)"""
        from mamba_llama_jax.models.cache import MambaCache

        del next_norm

        dt = jnp.dtype(self.dtype)
        x2 = x[:, 0].astype(dt)
        zx = norm_matmul(x2, norm.weight[...], self.in_t[...].astype(dt), eps=norm.eps)
        bias = None if self.conv1d.bias is None else self.conv1d.bias[...]
        y, conv, ssm = mamba2_decode(zx, cache.conv, cache.ssm, self.conv1d.weight[...], bias, self.dt_bias[...],
                                     -jnp.exp(self.A_log[...].astype(jnp.float32)), self.D[...],
                                     self.norm.weight[...], ctx.token_mask[:, 0], d_inner=self.d_inner,
                                     d_xb=self.d_xb, eps=self.mcfg.norm_eps)
        return matmul_residual(y, self.out_t[...].astype(dt), x2)[:, None], MambaCache(conv, ssm)

    def verify_residual(self, x: jax.Array, norm: Any, ctx: Context, cache: Any) -> tuple[jax.Array, Any]:
        """x + multistep(norm(x)) for a verify chunk x (b, t, D) (returns the `MambaChunk`, as `multistep`): the
        projections take its b·t tokens as rows (`fused_decode.norm_matmul` / `matmul_residual`, as in
        `FusedAttention.verify_residual`), the steps between them are `Mamba2.multistep_gated`."""
        b, t, width = x.shape
        if not verify_rows_fused():
            y, chunk = self.multistep(norm(x), ctx, cache)
            return x + y, chunk
        dt = jnp.dtype(self.dtype)
        x2 = x.reshape(b * t, width).astype(dt)
        zx = norm_matmul(x2, norm.weight[...], self.in_t[...].astype(dt), eps=norm.eps)
        y, chunk = self.multistep_gated(zx.reshape(b, t, -1), ctx, cache)
        return matmul_residual(y.reshape(b * t, -1), self.out_t[...].astype(dt), x2).reshape(b, t, width), chunk


def _fusable_mamba(m: Any) -> bool:
    return (type(m) is Mamba2 and m.in_proj.bias is None and m.out_proj.bias is None
            and mamba_decode_would_run(m.d_state))


def _fusable_attention(m: Any) -> bool:
    return type(m) is Attention and all(p.bias is None for p in (m.q_proj, m.k_proj, m.v_proj, m.o_proj))


# Leaves cast to the compute dtype: weight matrices that the model casts on every call anyway (Linear kernels,
# the embedding / tied LM head, the fused matrices). Others keep their dtype — norm weights, and the Mamba conv
# weights, A_log, D and dt_bias, which the model upcasts to fp32: rounding them would change the result.
_CAST = frozenset({"kernel", "embedding", "qkv", "o", "gate_up", "down", "in_t", "out_t"})


def _param_name(path: tuple[Any, ...]) -> str | None:
    """The parameter a state leaf belongs to: the path's last dict key. Newer flax versions put the Variable's own
    `.value` attribute after it, so the path's last entry alone names nothing (every cast was silently skipped)."""
    for k in reversed(path):
        if isinstance(k, jax.tree_util.DictKey):
            return str(k.key)
    return None


def prepare_for_inference(model: DecoderLM, *, fuse: bool = True) -> tuple[nnx.GraphDef, nnx.State, bool]:
    """(graphdef, state, fused): a copy of `model` with fused projections where possible and weight matrices
    cast to the compute dtype. The original model is left untouched.

    Works on any `DecoderLM` (the teacher, `HybridLM`, ...): every plain bias-free attention layer becomes a
    `FusedAttention`, every plain MLP a `FusedMLP`, and every bias-free Mamba2 mixer a `FusedMamba2` where its
    decode kernel would run (`pallas_kernels.mamba_decode.kernel_would_run`); other mixers keep their own path.
    `fused` says whether any layer was fused.
    """
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    fused = False
    if fuse:
        for layer in copy.layers:
            if _fusable_attention(layer.mixer):
                layer.mixer = FusedAttention(layer.mixer)
                fused = True
            elif _fusable_mamba(layer.mixer):
                layer.mixer = FusedMamba2(layer.mixer)
                fused = True
            if type(layer.mlp) is MLP:
                layer.mlp = FusedMLP(layer.mlp)
                fused = True
    graphdef, state = nnx.split(copy)
    compute = jnp.dtype(model.cfg.dtype)

    def cast(path: tuple[Any, ...], x: Any) -> Any:
        if (_param_name(path) in _CAST and isinstance(x, jax.Array) and x.ndim >= 2
                and jnp.issubdtype(x.dtype, jnp.floating)):
            return x.astype(compute)
        return x

    return graphdef, jax.tree_util.tree_map_with_path(cast, state), fused


# ---------------------------------------------------------------------------------------------- jitted programs


def _set_window(model: DecoderLM, window: int) -> None:
    for layer in model.layers:
        if isinstance(layer.mixer, FusedAttention):
            layer.mixer.decode_window = window


def _step(model: DecoderLM, tok: jax.Array, cache: DecodeState, key: jax.Array, i: jax.Array,
          temperature: jax.Array, top_p: jax.Array, spec: _Spec) -> tuple[jax.Array, DecodeState]:
    h, cache = model.hidden(tok[:, None], cache=cache)
    if spec.greedy:
        return greedy_ids(model, h[:, 0]), cache
    logits = model.logits(h[:, 0])
    return sample_logits(logits, jax.random.fold_in(key, i), temperature, top_p, spec), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "spec"))
def _prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array, key: jax.Array,
             temperature: jax.Array, top_p: jax.Array, *, slots: int, spec: _Spec) -> tuple[jax.Array, DecodeState]:
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], slots)
    h, cache = model.hidden(tokens, token_mask=mask, cache=cache, prefill=True)
    last = h[:, -1]  # left padding: the last column is every row's last prompt token
    if spec.greedy:
        return greedy_ids(model, last), cache
    return sample_logits(model.logits(last), jax.random.fold_in(key, 0), temperature, top_p, spec), cache


@decode_jit(static_argnames=("graphdef", "spec", "n_new", "eos", "pad_id", "phases"), donate_argnames=("cache",))
def _decode_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: DecodeState, first: jax.Array, key: jax.Array,
                 temperature: jax.Array, top_p: jax.Array, *, spec: _Spec, n_new: int, eos: tuple[int, ...],
                 pad_id: int, phases: tuple[tuple[int, int], ...],
                 live: jax.Array | None = None) -> tuple[jax.Array, jax.Array, DecodeState]:
    """All decode steps in one program. Returns (b, n_new) tokens (pad after EOS), the index of the first step
    not run, and the cache (returned so that the donated input buffers are updated in place). `live` (b,): rows
    that are False count as finished from the start (`Generator.decode_batch`'s padding rows), None: every row."""
    model = nnx.merge(graphdef, state)
    b = first.shape[0]
    eos_arr = jnp.asarray(eos, jnp.int32)

    def is_eos(t: jax.Array) -> jax.Array:
        return jnp.isin(t, eos_arr) if eos else jnp.zeros(t.shape, bool)

    out = jnp.full((b, n_new), pad_id, jnp.int32).at[:, 0].set(first)
    done = is_eos(first) if live is None else is_eos(first) | ~live
    carry = (jnp.int32(1), first, cache, done, out)
    for last_step, window in phases:
        _set_window(model, window)  # a static attribute: each phase traces its own loop body

        def cond(c: Any, last_step: int = last_step) -> jax.Array:
            return (c[0] <= last_step) & ~jnp.all(c[3])

        def body(c: Any) -> Any:
            i, tok, cache, done, out = c
            nxt, cache = _step(model, tok, cache, key, i, temperature, top_p, spec)
            nxt = jnp.where(done, pad_id, nxt)
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
            return i + 1, nxt, cache, done | is_eos(nxt), out

        carry = jax.lax.while_loop(cond, body, carry)
    return carry[4], carry[0], carry[2]


@decode_jit(static_argnames=("graphdef", "spec"), donate_argnames=("cache",))
def _single_step(graphdef: nnx.GraphDef, state: nnx.State, cache: DecodeState, tok: jax.Array, key: jax.Array,
                 i: jax.Array, temperature: jax.Array, top_p: jax.Array, *, spec: _Spec
                 ) -> tuple[jax.Array, DecodeState]:
    model = nnx.merge(graphdef, state)
    return _step(model, tok, cache, key, i, temperature, top_p, spec)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def decode_phases(prompt_len: int, n_new: int, slots: int, block: int) -> tuple[tuple[int, int], ...]:
    """(last step, attention window) per phase. Step i (1-based) writes slot prompt_len + i - 1 and attends
    to slots [0, prompt_len + i), so a phase with window W covers steps up to W - prompt_len."""
    if n_new <= 1:
        return ()
    if block <= 0:
        return ((n_new - 1, slots),)
    phases = []
    for w in range(_round_up(prompt_len + 1, block), slots + block, block):
        w = min(w, slots)
        last = min(w - prompt_len, n_new - 1)
        if not phases or last > phases[-1][0]:
            phases.append((last, w))
        if last == n_new - 1:
            break
    return tuple(phases)


# -------------------------------------------------------------------------------------------------- generator


@dataclasses.dataclass
class GenerationOutput:
    """tokens: (b, max_new_tokens) new ids, `pad_id` after a row's EOS; lengths: new tokens per row, EOS
    excluded; steps: forward passes run after prefill; prefill_s / decode_s: wall time of each phase."""

    tokens: np.ndarray
    lengths: list[int]
    steps: int
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    def ids(self) -> list[list[int]]:
        return [self.tokens[r, : n].tolist() for r, n in enumerate(self.lengths)]


def check_prompts(prompt_ids: Sequence[Sequence[int]], *, vocab_size: int, context: int,
                  max_new_tokens: int) -> list[list[int]]:
    """Validated token-id rows: non-empty, in the vocabulary, and leaving room for `max_new_tokens`."""
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) or not prompt_ids:
        raise GenerationError("prompt_ids must be a non-empty list of token-id lists")
    rows = []
    for r, p in enumerate(prompt_ids):
        if isinstance(p, (str, bytes)):
            raise GenerationError(f"prompt {r} is a string; pass token ids (or use `generate` for text)")
        ids = [int(t) for t in p]
        if not ids:
            raise GenerationError(f"prompt {r} is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {r} holds token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if len(ids) + max_new_tokens > context:
            raise GenerationError(
                f"prompt {r} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                f"the model's context of {context} tokens: shorten the prompt or lower max_new_tokens "
                f"(at most {context - max_new_tokens} prompt tokens)")
        rows.append(ids)
    return rows


def left_pad(rows: list[list[int]], multiple: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) with every row right-aligned, the length rounded up to `multiple` (fewer compiles)."""
    plen = _round_up(max(len(r) for r in rows), multiple)
    tokens = np.full((len(rows), plen), pad_id, np.int32)
    mask = np.zeros((len(rows), plen), bool)
    for i, r in enumerate(rows):
        tokens[i, plen - len(r):] = r
        mask[i, plen - len(r):] = True
    return tokens, mask


class Generator:
    """A model snapshot prepared for generation (fused, weights in the compute dtype, on device).

    Weights are captured at construction: build a new Generator after training the model further.
    """

    def __init__(self, model: DecoderLM, *, fuse: bool = True, window_block: int = 128, prompt_multiple: int = 16,
                 pad_id: int = 0):
        self.cfg = model.cfg
        self.graphdef, self.state, self.fused = prepare_for_inference(model, fuse=fuse)
        attention = [isinstance(layer.mixer, FusedAttention) for layer in nnx.merge(self.graphdef, self.state).layers]
        self.has_attention, self.all_attention = any(attention), all(attention)
        self.window_block = window_block if self.has_attention else 0
        self.prompt_multiple = max(1, prompt_multiple)
        self.pad_id = int(pad_id)

    # -------------------------------------------------------------------- validation and batching

    def _check(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[int]]:
        return check_prompts(prompt_ids, vocab_size=self.cfg.vocab_size, context=self.cfg.max_position_embeddings,
                             max_new_tokens=sampling.max_new_tokens)

    def _batch(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return left_pad(rows, self.prompt_multiple, self.pad_id)

    def uses_kernel(self) -> bool:
        """Whether decode attention runs as the Pallas kernel (GPU, not forced to the reference)."""
        return self.has_attention and kernel_would_run(self.cfg.head_dim, self.window_block or self.prompt_multiple)

    def decode_attention_impl(self) -> str:
        """Which decode-attention implementation `run` uses: `pallas_triton`, `reference_xla` or `none`."""
        if not self.has_attention:
            return "none"
        return "pallas_triton" if self.uses_kernel() else "reference_xla"

    def fused_decode_impl(self, batch: int) -> str:
        """Which implementation the decode step's fused norm/projection/residual GEMVs use at this batch:
        `pallas_triton` or `reference_xla` (`pallas_kernels.fused_decode`); `none` without fused layers."""
        if not self.fused:
            return "none"
        c = self.cfg
        ok = kernels_would_run(batch, c.hidden_size, c.intermediate_size)
        return "pallas_triton" if ok else "reference_xla"

    def decode_batch(self, batch: int, new_tokens: int = PAD_MIN_NEW_TOKENS) -> int:
        """The rows `run` decodes `batch` prompts as, for up to `new_tokens` new tokens each (PAD_BATCH_BY_BATCH
        says where and why it pads): `batch` itself unless the decode kernels run (GPU), the model is a fused Llama
        no wider than the fused GEMVs' bound, at least PAD_MIN_NEW_TOKENS are asked for and padding is not turned
        off."""
        c = self.cfg
        if not (self.all_attention and self.uses_kernel() and c.hidden_size <= DEFAULT_MAX_HIDDEN
                and new_tokens >= PAD_MIN_NEW_TOKENS and pad_batch_allowed()):
            return batch
        return max(batch, by_batch(PAD_BATCH_BY_BATCH, batch))

    def phases(self, plen: int, n_new: int, slots: int) -> tuple[tuple[int, int], ...]:
        """The decode loop's phases. The kernel bounds its reads by the fill itself, so it needs one phase (one
        traced loop body, one compile); the reference reads a static window, so it grows in `window_block`s."""
        return decode_phases(plen, n_new, slots, 0 if self.uses_kernel() else self.window_block)

    def _slots(self, plen: int, n_new: int) -> int:
        return _round_up(plen + n_new, self.window_block or self.prompt_multiple)

    def _dyn(self, sampling: SamplingConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jax.random.key(sampling.seed), jnp.float32(max(sampling.temperature, 1e-6)),
                jnp.float32(sampling.top_p))

    # -------------------------------------------------------------------- batch generation

    def run(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
            eos_ids: Sequence[int] = ()) -> GenerationOutput:
        """Generates for a batch of token-id prompts; EOS ends a row (pass no eos_ids for a fixed length)."""
        rows = self._check(prompt_ids, sampling)
        n = len(rows)
        width = self.decode_batch(n, sampling.max_new_tokens)
        tokens, mask = self._batch(rows + [rows[0]] * (width - n))
        n_new = sampling.max_new_tokens
        slots = self._slots(tokens.shape[1], n_new)
        spec = _spec(sampling, self.cfg.vocab_size)
        key, temp, top_p = self._dyn(sampling)
        eos = tuple(sorted({int(e) for e in eos_ids}))

        t0 = time.perf_counter()
        first, cache = _prefill(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(mask), key, temp, top_p,
                                slots=slots, spec=spec)
        first = jax.block_until_ready(first)
        t1 = time.perf_counter()
        phases = self.phases(tokens.shape[1], n_new, slots)
        live = None if width == n else jnp.arange(width) < n
        out, steps, _ = _decode_loop(self.graphdef, self.state, cache, first, key, temp, top_p, spec=spec, n_new=n_new,
                                     eos=eos, pad_id=self.pad_id, phases=phases, live=live)
        out = np.asarray(jax.block_until_ready(out))[:n]
        mask = mask[:n]
        t2 = time.perf_counter()

        lengths = []
        for r in range(out.shape[0]):
            hits = np.flatnonzero(np.isin(out[r], eos)) if eos else []
            lengths.append(int(hits[0]) if len(hits) else n_new)
        return GenerationOutput(out, lengths, int(steps) - 1, int(mask.sum()), t1 - t0, t2 - t1)

    def stream(self, prompt: Sequence[int], sampling: SamplingConfig = SamplingConfig(),
               eos_ids: Sequence[int] = ()) -> Iterator[int]:
        """Yields new token ids one at a time (one jitted step per token), stopping after EOS (not yielded)."""
        rows = self._check([prompt], sampling)
        tokens, mask = self._batch(rows)
        n_new = sampling.max_new_tokens
        slots = self._slots(tokens.shape[1], n_new)
        spec = _spec(sampling, self.cfg.vocab_size)
        key, temp, top_p = self._dyn(sampling)
        eos = {int(e) for e in eos_ids}
        tok, cache = _prefill(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(mask), key, temp, top_p,
                              slots=slots, spec=spec)
        for i in range(1, n_new + 1):
            t = int(tok[0])
            if t in eos:
                return
            yield t
            if i == n_new:
                return
            tok, cache = _single_step(self.graphdef, self.state, cache, tok, key, jnp.int32(i), temp, top_p,
                                      spec=spec)

    # -------------------------------------------------------------------- text

    def encode_prompts(self, tokenizer: Any, prompts: Sequence[str], chat: bool = True,
                       system: str | None = None) -> list[list[int]]:
        out = []
        for p in prompts:
            if not isinstance(p, str):
                raise GenerationError(f"prompts must be strings, got {type(p).__name__}")
            if chat:
                msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                out.append(tokenizer.encode_chat(msgs))
            else:
                out.append(tokenizer.encode(p, add_special_tokens=True))
        return out

    def generate(self, tokenizer: Any, prompts: str | Sequence[str], sampling: SamplingConfig = SamplingConfig(),
                 *, chat: bool = True, stop: Sequence[str] = (), system: str | None = None) -> list[str]:
        """Answers to text prompts (the chat template applied when `chat`), cut at EOS and at any stop string."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise GenerationError("no prompts given")
        ids = self.encode_prompts(tokenizer, prompts, chat, system)
        res = self.run(ids, sampling, eos_ids=tokenizer.eos_token_ids)
        return [truncate_at_stop(tokenizer.decode(r), stop) for r in res.ids()]

    def stream_text(self, tokenizer: Any, prompt: str | list[dict[str, str]],
                    sampling: SamplingConfig = SamplingConfig(), *, chat: bool = True,
                    stop: Sequence[str] = ()) -> Iterator[str]:
        """Yields text deltas as tokens arrive. `prompt` may be a whole message list (multi-turn chat)."""
        if isinstance(prompt, list):
            ids = tokenizer.encode_chat(prompt)
        else:
            ids = self.encode_prompts(tokenizer, [prompt], chat)[0]
        got: list[int] = []
        shown = ""
        hold = max((len(s) for s in stop), default=0)
        for t in self.stream(ids, sampling, eos_ids=tokenizer.eos_token_ids):
            got.append(t)
            text = tokenizer.decode(got)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest of the character
                continue
            cut = truncate_at_stop(text, stop)
            if cut != text:
                if len(cut) > len(shown):
                    yield cut[len(shown):]
                return
            # Hold back a possible stop-string prefix until it is decided.
            safe = text[: max(len(shown), len(text) - hold + 1)] if hold else text
            if len(safe) > len(shown):
                yield safe[len(shown):]
                shown = safe
        text = truncate_at_stop(tokenizer.decode(got), stop)
        if len(text) > len(shown):
            yield text[len(shown):]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            j = text.find(s)
            if j >= 0:
                cut = min(cut, j)
    return text[:cut]


# ------------------------------------------------------------------------------------------- convenience API


def generate_ids(model: DecoderLM, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
                 eos_ids: Sequence[int] = (), *, pad_id: int = 0, fuse: bool = True) -> list[list[int]]:
    """New token ids per prompt (EOS excluded). Builds a `Generator` each call; keep one for repeated use."""
    return Generator(model, fuse=fuse, pad_id=pad_id).run(prompt_ids, sampling, eos_ids).ids()


def generate(model: DecoderLM, tokenizer: Any, prompts: str | Sequence[str],
             sampling: SamplingConfig = SamplingConfig(), *, chat: bool = True, stop: Sequence[str] = (),
             system: str | None = None) -> list[str]:
    """Text answers to text prompts. Builds a `Generator` each call; keep one for repeated use."""
    return Generator(model, pad_id=tokenizer.pad_token_id).generate(tokenizer, prompts, sampling, chat=chat,
                                                                    stop=stop, system=system)
