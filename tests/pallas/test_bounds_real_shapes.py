"""Plain and speculative decoding of a hybrid at SmolLM2's widths with every attention / Mamba kernel in the
bounds-checked interpreter (`pallas_kernels/triton_call.py`): no kernel reads or writes outside an array at the
shapes the GPU benchmarks run (hidden 576, 9 query / 3 KV heads of 64, Mamba2 heads of 64 with state 64, bf16),
through prefill, decode steps up to the cache's end, verify chunks and their commits. The kernel tests use small
shapes; an index or a tile that only goes out of range at real widths shows here (on a GPU it corrupts memory or
kills the process: session 10's unexplained CUDA launch failure). Slow (~1 min): the interpreter runs every
program's every access through a host callback. The fused decode GEMVs are off here (one program per output makes
them the slowest to interpret; their own tests cover them)."""

import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import HybridConfig, LlamaConfig, MambaConfig
from mamba_llama_jax.convert.from_attention import build_hybrid
from mamba_llama_jax.inference.generate import Generator, SamplingConfig
from mamba_llama_jax.inference.speculative import SpeculativeDecoder
from mamba_llama_jax.models.llama import LlamaLM
from pallas_kernels import dispatch
from pallas_kernels.fused_decode import FUSED_DECODE_ENV
from pallas_kernels.triton_call import CHECK_BOUNDS_ENV

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
               rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192, vocab_size=512,
               dtype="bfloat16", param_dtype="bfloat16")


@pytest.mark.slow
def test_plain_and_speculative_decoding_stay_in_bounds(monkeypatch):
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    monkeypatch.delenv(CHECK_BOUNDS_ENV, raising=False)
    monkeypatch.setenv(FUSED_DECODE_ENV, "0")
    mamba = MambaConfig(variant="mamba2")
    target = build_hybrid(LlamaLM(LlamaConfig(num_layers=2, **SMOLLM2), rngs=nnx.Rngs(0)),
                          HybridConfig(attn_fraction=0.5, mamba=mamba), rngs=nnx.Rngs(1))
    draft = build_hybrid(LlamaLM(LlamaConfig(num_layers=1, **SMOLLM2), rngs=nnx.Rngs(2)),
                         HybridConfig(attn_fraction=0.0, mamba=mamba), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, 29).tolist(), rng.integers(0, 512, 21).tolist()]  # left padding in row 2
    plain = Generator(target).run(prompts, SamplingConfig(max_new_tokens=6)).tokens
    assert plain.shape == (2, 6)
    assert {op: dispatch.last_choice(op) for op in ("decode_attention", "mamba2_decode")} == \
        {"decode_attention": "pallas_triton", "mamba2_decode": "pallas_triton"}
    # a 48-slot cache for the 32-slot prompt (the kernels want slots in 16s): a random draft's rounds keep about
    # one token each, so the last rounds' 3-token chunks are written at the cache's last slots
    out, _, stats = SpeculativeDecoder(target, draft).run(prompts, k=2, max_new_tokens=14, slots=48)
    assert {op: dispatch.last_choice(op) for op in ("verify_attention", "mamba2_chunk", "verify")} == \
        {"verify_attention": "pallas_triton", "mamba2_chunk": "pallas_triton", "verify": "pallas_triton"}
    assert out.shape == (2, 14) and stats.rounds >= 10
