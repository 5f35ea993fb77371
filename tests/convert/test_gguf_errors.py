"""`convert/gguf.py` on tiny hand-written GGUF files: what a valid file gives, and project errors (never a raw
numpy/struct/tokenizers exception, never a hang) for missing, truncated, corrupt and unsupported files."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mamba_llama_jax.convert import load_teacher
from mamba_llama_jax.convert.gguf import read_gguf, unpermute_rope
from mamba_llama_jax.errors import MambaLlamaError, ModelFormatError, TokenizerError

V = GGUFValueType
VOCAB = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "\u0120", "ab", "\u0120a", "\u0120ab", "h", "i"]
TYPES = [3, 3, 3] + [1] * (len(VOCAB) - 3)
MERGES = ["a b", "\u0120 a", "\u0120a b"]
D, FF, HEADS, KV_HEADS, LAYERS = 32, 64, 2, 1, 2  # rows of 32: the block size of Q8_0/Q4_x
HEAD_DIM = D // HEADS


def base_metadata() -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """key -> (value, type, array element type) of a valid tiny Llama with a byte-level BPE tokenizer."""
    return {
        "llama.block_count": (LAYERS, V.UINT32, None),
        "llama.context_length": (64, V.UINT32, None),
        "llama.embedding_length": (D, V.UINT32, None),
        "llama.feed_forward_length": (FF, V.UINT32, None),
        "llama.attention.head_count": (HEADS, V.UINT32, None),
        "llama.attention.head_count_kv": (KV_HEADS, V.UINT32, None),
        "llama.rope.freq_base": (10000.0, V.FLOAT32, None),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32, None),
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.pre": ("smollm", V.STRING, None),
        "tokenizer.ggml.tokens": (VOCAB, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (TYPES, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (MERGES, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32, None),
        "tokenizer.chat_template": ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
                                    V.STRING, None),
    }


def hf_weights(seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    """Random weights under HF names, HF orientation (out, in)."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)
    out = {"model.embed_tokens.weight": w(len(VOCAB), D), "model.norm.weight": w(D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, D), p + "self_attn.k_proj.weight":
                w(KV_HEADS * HEAD_DIM, D), p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, D),
                p + "self_attn.o_proj.weight": w(D, HEADS * HEAD_DIM), p + "mlp.gate_proj.weight": w(FF, D),
                p + "mlp.up_proj.weight": w(FF, D), p + "mlp.down_proj.weight": w(D, FF),
                p + "input_layernorm.weight": w(D), p + "post_attention_layernorm.weight": w(D)}
    if not tied:
        out["lm_head.weight"] = w(len(VOCAB), D)
    return out


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter layout for Q/K rows (written independently of the code under test)."""
    rows, cols = w.shape
    half = rows // heads // 2
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(2):
            for j in range(half):
                out[h * 2 * half + 2 * j + i] = w[h * 2 * half + i * half + j]
    return out


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            key = rest[: -len(".weight")]
            if key == "self_attn.q_proj":
                w = permute(w, HEADS)
            elif key == "self_attn.k_proj":
                w = permute(w, KV_HEADS)
            out[f"blk.{i}.{GGUF_NAMES[key]}.weight"] = w
    return out


def write_gguf(path: Path, *, arch: str = "llama", metadata: dict | None = None, drop_keys: tuple[str, ...] = (),
               weights: dict[str, np.ndarray] | None = None, drop_tensors: tuple[str, ...] = (),
               qtypes: dict[str, GGMLQuantizationType] | None = None) -> Path:
    meta = base_metadata() if metadata is None else metadata
    w = GGUFWriter(path, arch)
    for key, (val, vtype, sub) in meta.items():
        if key not in drop_keys:
            w.add_key_value(key, val, vtype, sub)
    for name, t in gguf_tensors(hf_weights() if weights is None else weights).items():
        if name in drop_tensors:
            continue
        q = (qtypes or {}).get(name)
        if q is None:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, quantize(t, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ----------------------------------------------------------------------------------------------- valid files


def test_tiny_gguf_reads_back_hf_weights(valid: Path) -> None:
    cfg, params, tok = read_gguf(valid)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == \
        (LAYERS, D, HEADS, KV_HEADS, len(VOCAB))
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    hf = hf_weights()
    for i in range(LAYERS):
        layer = params["layers"][i]
        p = f"model.layers.{i}."
        # un-permuted Q/K equal HF's exactly (F32); kernels are stored (in, out)
        np.testing.assert_array_equal(layer["mixer"]["q_proj"]["kernel"], hf[p + "self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(layer["mixer"]["k_proj"]["kernel"], hf[p + "self_attn.k_proj.weight"].T)
        np.testing.assert_array_equal(layer["mlp"]["down_proj"]["kernel"], hf[p + "mlp.down_proj.weight"].T)
        np.testing.assert_array_equal(layer["input_layernorm"]["weight"], hf[p + "input_layernorm.weight"])
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], hf["model.embed_tokens.weight"])
    assert tok.encode("<|im_start|>ab a<|im_end|>") == [1, 7, 8, 2]


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    for heads in (1, 2, 4):
        np.testing.assert_array_equal(unpermute_rope(permute(w, heads), heads), w)


def test_untied_head_and_quantized_tensors(tmp_path: Path) -> None:
    hf = hf_weights(1, tied=False)
    qtypes = {"blk.0.ffn_up.weight": GGMLQuantizationType.Q8_0, "blk.0.attn_q.weight": GGMLQuantizationType.Q4_1,
              "blk.1.ffn_gate.weight": GGMLQuantizationType.Q4_0, "blk.1.attn_k.weight": GGMLQuantizationType.F16,
              "output.weight": GGMLQuantizationType.BF16}
    cfg, params, _ = read_gguf(write_gguf(tmp_path / "q.gguf", weights=hf, qtypes=qtypes))
    assert not cfg.tie_word_embeddings
    np.testing.assert_allclose(params["lm_head"]["kernel"], hf["lm_head.weight"].T, rtol=2 ** -7)
    np.testing.assert_allclose(params["layers"][1]["mixer"]["k_proj"]["kernel"],
                               hf["model.layers.1.self_attn.k_proj.weight"].T, rtol=1e-3, atol=1e-3)
    # 4/8-bit blocks: error bounded by the block scale (~max|w|/7 for 4 bits, /127 for 8 bits)
    for got, want, tol in ((params["layers"][0]["mlp"]["up_proj"]["kernel"], hf["model.layers.0.mlp.up_proj.weight"],
                            0.05), (params["layers"][0]["mixer"]["q_proj"]["kernel"],
                                    hf["model.layers.0.self_attn.q_proj.weight"], 0.5),
                           (params["layers"][1]["mlp"]["gate_proj"]["kernel"],
                            hf["model.layers.1.mlp.gate_proj.weight"], 0.7)):
        assert np.abs(got - want.T).max() < tol


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelFormatError, match="not found"):
        load_teacher(tmp_path / "nope.gguf")


def test_directory_is_not_a_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="not a file"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("keep", [0, 3, 20, 100, 0.5, 0.99, -1])
def test_truncated_file(valid: Path, tmp_path: Path, keep: float) -> None:
    data = valid.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) - 1)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ModelFormatError, match="truncated|too short|beyond the end") as e:
        read_gguf(bad)
    assert str(bad) in str(e.value)


def test_bad_magic(valid: Path, tmp_path: Path) -> None:
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + valid.read_bytes()[4:])
    with pytest.raises(ModelFormatError, match="not a GGUF file .*magic"):
        read_gguf(bad)
    (tmp_path / "text.gguf").write_text("this is not a model at all, just some words " * 3)
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        read_gguf(tmp_path / "text.gguf")


def test_unsupported_version(valid: Path, tmp_path: Path) -> None:
    bad = tmp_path / "v9.gguf"
    bad.write_bytes(valid.read_bytes()[:4] + struct.pack("<I", 9) + valid.read_bytes()[8:])
    with pytest.raises(ModelFormatError, match="version 9"):
        read_gguf(bad)


def test_non_llama_architecture(tmp_path: Path) -> None:
    meta = {k.replace("llama.", "qwen2."): v for k, v in base_metadata().items()}
    with pytest.raises(ModelFormatError, match="architecture 'qwen2' is not supported"):
        read_gguf(write_gguf(tmp_path / "qwen.gguf", arch="qwen2", metadata=meta))


def test_unknown_tokenizer_model(tmp_path: Path) -> None:
    meta = base_metadata() | {"tokenizer.ggml.model": ("bert", V.STRING, None)}
    with pytest.raises(TokenizerError, match="tokenizer model 'bert' is not supported"):
        read_gguf(write_gguf(tmp_path / "bert.gguf", metadata=meta))
    with pytest.raises(TokenizerError, match="no tokenizer"):
        read_gguf(write_gguf(tmp_path / "none.gguf", drop_keys=("tokenizer.ggml.model",)))


def test_unknown_pre_tokenizer(tmp_path: Path) -> None:
    meta = base_metadata() | {"tokenizer.ggml.pre": ("qwen9-future", V.STRING, None)}
    with pytest.raises(TokenizerError, match="pre-tokenizer 'qwen9-future'"):
        read_gguf(write_gguf(tmp_path / "pre.gguf", metadata=meta))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"'blk\.1\.ffn_down\.weight'.*missing"):
        read_gguf(write_gguf(tmp_path / "miss.gguf", drop_tensors=("blk.1.ffn_down.weight",)))


def test_missing_required_metadata_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="llama.block_count"):
        read_gguf(write_gguf(tmp_path / "meta.gguf", drop_keys=("llama.block_count",)))


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    q = {"blk.0.ffn_up.weight": GGMLQuantizationType.Q5_0}
    with pytest.raises(ModelFormatError, match=r"blk\.0\.ffn_up\.weight.*Q5_0.*not supported"):
        read_gguf(write_gguf(tmp_path / "q5.gguf", qtypes=q))


def test_wrong_metadata_type(tmp_path: Path) -> None:
    meta = base_metadata() | {"llama.embedding_length": ("sixteen", V.STRING, None)}
    with pytest.raises(ModelFormatError, match="llama.embedding_length.*integer"):
        read_gguf(write_gguf(tmp_path / "type.gguf", metadata=meta))


def test_tensor_data_beyond_end_of_file(valid: Path, tmp_path: Path) -> None:
    reader = GGUFReader(valid)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    # the tensor-info record ends with its u64 data offset: point it far past the end of the file
    field_end = last.field.offset + sum(int(p.nbytes) for p in last.field.parts)
    data = bytearray(valid.read_bytes())
    data[field_end - 8:field_end] = struct.pack("<Q", len(data) * 4 // 32 * 32)
    bad = tmp_path / "far.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=f"{last.name}.*beyond the end of the file"):
        read_gguf(bad)


def test_absurd_array_length_fails_fast(valid: Path, tmp_path: Path) -> None:
    """gguf's reader would loop ~2^63 times over a corrupt scalar-array length; the layout check stops it."""
    reader = GGUFReader(valid)
    field = reader.fields["tokenizer.ggml.token_type"]
    length_part = field.parts[4]  # key len, key, type, element type, element count
    offset = field.offset + sum(int(p.nbytes) for p in field.parts[:4])
    assert int(length_part[0]) == len(VOCAB)
    data = bytearray(valid.read_bytes())
    data[offset:offset + 8] = struct.pack("<Q", 2 ** 63)
    bad = tmp_path / "long.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="token_type"):
        read_gguf(bad)


# ------------------------------------------------------------------------------------------------ fuzzing


def _read_only_project_errors(path: Path) -> None:
    try:
        read_gguf(path)
    except MambaLlamaError as e:
        assert str(e)  # every project error carries a message


@pytest.fixture(scope="module")
def header_end(valid: Path) -> int:
    return GGUFReader(valid).data_offset


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_header_bytes(valid: Path, header_end: int, tmp_path_factory, data: st.DataObject) -> None:
    """Random byte edits and u64 smashes anywhere in the header and metadata: project errors or a clean load."""
    raw = bytearray(valid.read_bytes())
    edits = data.draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), max_size=4))
    for pos, byte in edits:
        raw[pos] = byte
    smash = data.draw(st.none() | st.tuples(st.integers(4, header_end - 8),
                                           st.sampled_from([0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 40, 2 ** 63, 2 ** 64 - 1])))
    if smash is not None:
        raw[smash[0]:smash[0] + 8] = struct.pack("<Q", smash[1])
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    path = tmp_path_factory.getbasetemp() / "fuzz_bytes.gguf"
    path.write_bytes(bytes(raw[:cut]))
    if cut is not None and cut < len(raw):
        with pytest.raises(ModelFormatError):
            read_gguf(path)
    else:
        _read_only_project_errors(path)


_VALUES = st.one_of(
    st.tuples(st.integers(0, 2 ** 32 - 1), st.just(V.UINT32)),
    st.tuples(st.integers(-2 ** 31, 2 ** 31 - 1), st.just(V.INT32)),
    st.tuples(st.integers(0, 2 ** 64 - 1), st.just(V.UINT64)),
    st.tuples(st.floats(width=32, allow_nan=True, allow_infinity=True), st.just(V.FLOAT32)),
    st.tuples(st.booleans(), st.just(V.BOOL)),
    st.tuples(st.text(max_size=12), st.just(V.STRING)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(base_metadata())), value=_VALUES, drop=st.booleans(),
       array=st.none() | st.lists(st.one_of(st.text(max_size=6), st.integers(-5, 40)), min_size=1, max_size=20))
def test_fuzz_metadata_fields(tmp_path_factory, key: str, value: tuple, drop: bool, array: list | None) -> None:
    """A metadata field replaced by any value of any type (or removed): project errors or a clean load."""
    meta = base_metadata()
    if array is not None and len({type(a) for a in array}) == 1:
        meta[key] = (array, V.ARRAY, V.STRING if isinstance(array[0], str) else V.INT32)
    elif value[1] == V.STRING and not value[0]:
        meta.pop(key)  # the writer cannot write an empty string; a missing key is the nearest case
    else:
        meta[key] = (value[0], value[1], None)
    path = tmp_path_factory.getbasetemp() / "fuzz_meta.gguf"
    write_gguf(path, metadata=meta, drop_keys=(key,) if drop else ())
    _read_only_project_errors(path)


# ------------------------------------------------------------------------------- K-quants and rope_freqs
# gguf has no Q4_K/Q6_K quantizer, so blocks are made of random bytes (fp16 scales kept finite) and decoded by
# a scalar transcription of the block layouts in ggml's documentation (ggml-common.h / dequantize_row_*).

QK_K = 256


def _random_blocks(rng: np.random.Generator, n: int, size: int, f16_at: tuple[int, ...]) -> np.ndarray:
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for off in f16_at:
        raw[:, off:off + 2] = rng.uniform(0.01, 0.1, (n, 1)).astype(np.float16).view(np.uint8)
    return raw


def _q4_k_reference(block: np.ndarray) -> np.ndarray:
    d, dmin = (float(block[i:i + 2].view(np.float16)[0]) for i in (0, 2))
    sc, q = block[4:16], block[16:144]

    def scale_min(j: int) -> tuple[int, int]:
        if j < 4:
            return int(sc[j]) & 63, int(sc[j + 4]) & 63
        return (int(sc[j + 4]) & 0xF) | ((int(sc[j - 4]) >> 6) << 4), (int(sc[j + 4]) >> 4) | ((int(sc[j]) >> 6) << 4)

    y = []
    for j in range(4):  # 64 values per step: low nibbles with scale 2j, high nibbles with scale 2j+1
        (s1, m1), (s2, m2) = scale_min(2 * j), scale_min(2 * j + 1)
        qs = q[32 * j:32 * j + 32].astype(int)
        y += [d * s1 * (v & 0xF) - dmin * m1 for v in qs] + [d * s2 * (v >> 4) - dmin * m2 for v in qs]
    return np.asarray(y, np.float32)


def _q6_k_reference(block: np.ndarray) -> np.ndarray:
    ql, qh, sc = block[:128].astype(int), block[128:192].astype(int), block[192:208].view(np.int8).astype(int)
    d = float(block[208:210].view(np.float16)[0])
    y = np.zeros(QK_K, np.float32)
    for half in range(2):
        L, H, S, Y = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
        for l in range(32):
            i = l // 16
            q = [((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32, ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32,
                 ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32, ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32]
            for k in range(4):
                y[Y + l + 32 * k] = d * S[i + 2 * k] * q[k]
    return y


def test_k_quants_match_the_block_layout(tmp_path: Path) -> None:
    from mamba_llama_jax.convert.gguf import _dequantize, open_gguf

    rng = np.random.default_rng(0)
    q4k = _random_blocks(rng, 3, 144, (0, 2))
    q6k = _random_blocks(rng, 3, 210, (208,))
    w = GGUFWriter(tmp_path / "k.gguf", "llama")
    w.add_tensor("q4k.weight", q4k, raw_dtype=GGMLQuantizationType.Q4_K)  # 3 rows of 256
    w.add_tensor("q6k.weight", q6k, raw_dtype=GGMLQuantizationType.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors = {t.name: t for t in open_gguf(tmp_path / "k.gguf").tensors}
    got4, got6 = (_dequantize(tensors[n], "k.gguf") for n in ("q4k.weight", "q6k.weight"))
    assert got4.shape == got6.shape == (3, QK_K)
    np.testing.assert_allclose(got4, np.stack([_q4_k_reference(b) for b in q4k]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got6, np.stack([_q6_k_reference(b) for b in q6k]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scaling", [
    dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),  # 3.1
    dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),  # 3.2
    dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=6.0, original_max_position_embeddings=4096),
])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path, scaling: dict) -> None:
    """llama.cpp stores Llama 3.1 rope scaling as per-frequency divisors (`rope_freqs.weight`)."""
    from mamba_llama_jax.config import RopeScaling
    from mamba_llama_jax.models.llama import rope_inv_freq

    head_dim, theta = 128, 500000.0
    want = rope_inv_freq(head_dim, theta, RopeScaling("llama3", **scaling))
    divisors = (rope_inv_freq(head_dim, theta, None) / want).astype(np.float32)
    meta = base_metadata() | {"llama.rope.freq_base": (theta, V.FLOAT32, None),
                              "llama.embedding_length": (head_dim * 2, V.UINT32, None)}
    w = GGUFWriter(tmp_path / "rope.gguf", "llama")
    for key, (val, vtype, sub) in meta.items():
        w.add_key_value(key, val, vtype, sub)
    w.add_tensor("rope_freqs.weight", divisors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from mamba_llama_jax.convert.gguf import Metadata, config_from_metadata, open_gguf

    reader = open_gguf(tmp_path / "rope.gguf")
    cfg = config_from_metadata(Metadata(reader, "rope.gguf"), {t.name: t for t in reader.tensors})
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == scaling["factor"]
    np.testing.assert_allclose(rope_inv_freq(head_dim, theta, cfg.rope_scaling), want, rtol=1e-5)


def test_linear_rope_scaling_and_unknown_type(tmp_path: Path) -> None:
    meta = base_metadata() | {"llama.rope.scaling.type": ("linear", V.STRING, None),
                              "llama.rope.scaling.factor": (2.0, V.FLOAT32, None)}
    cfg, _, _ = read_gguf(write_gguf(tmp_path / "lin.gguf", metadata=meta))
    assert cfg.rope_scaling is not None and (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 2.0)
    meta["llama.rope.scaling.type"] = ("yarn", V.STRING, None)
    with pytest.raises(ModelFormatError, match="rope scaling type 'yarn'"):
        read_gguf(write_gguf(tmp_path / "yarn.gguf", metadata=meta))
