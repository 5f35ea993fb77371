"""Every parser of outside data, fed structure-aware mutations of valid inputs (tests/reliability/fuzz_lib.py):
only project errors with a message, no hang, no allocation sized by a corrupt field. A small sample per parser by
default; `-m slow` runs 10,000 per parser (benchmarks/fuzz_parsers.py does the same and reports coverage).
Plus one regression test per crash the fuzzers found, and the no-code-execution guarantees (grep)."""

from __future__ import annotations

import io
import json
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fuzz_lib  # noqa: E402
from mamba_llama_jax.errors import ConfigError, DataError, ModelFormatError  # noqa: E402

ROOT = Path(__file__).parents[2]
FIX = ROOT / "tests" / "fixtures"


def _check(result: dict) -> None:
    assert not result["crashes"], json.dumps(result["crash_examples"], indent=1)[:6000]
    assert sum(result["errors"].values()) + result["accepted"] == result["inputs"]


@pytest.mark.parametrize("name", sorted(fuzz_lib.FUZZERS))
def test_fuzz_sample(name, tmp_path):
    fz = fuzz_lib.FUZZERS[name](tmp_path)
    _check(fuzz_lib.run_fuzzer(fz, 120, seed=1, time_limit_s=10.0, mem_limit_bytes=4 << 30))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(fuzz_lib.FUZZERS))
def test_fuzz_10k(name, tmp_path):
    fz = fuzz_lib.FUZZERS[name](tmp_path)
    _check(fuzz_lib.run_fuzzer(fz, 10_000, seed=2, time_limit_s=10.0, mem_limit_bytes=4 << 30))


# ------------------------------------------------------------------------------- regressions found by fuzzing


def test_no_pickle_code_paths_in_the_package():
    """Pickles are read only by convert/torch_pickle.py's restricted unpickler; nothing trusts remote code. Checked on
    the syntax tree (calls and keywords), so docstrings that name the risks do not count."""
    import ast

    files = [*(ROOT / "mamba_llama_jax").rglob("*.py"), *(ROOT / "pallas_kernels").rglob("*.py"), ROOT / "run.py",
             *(ROOT / "benchmarks").glob("*.py")]
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                value = getattr(kw.value, "value", None)
                assert not (kw.arg == "weights_only" and value is False), f"{p}:{node.lineno}"
                assert not (kw.arg == "trust_remote_code" and value is not False), f"{p}:{node.lineno}"
            name = ast.unparse(node.func)
            assert name not in ("torch.load", "pickle.load", "pickle.loads", "numpy.load", "dill.load"), \
                f"{p}:{node.lineno}: {name}"
            if name == "np.load":  # numpy refuses pickled objects unless allow_pickle=True
                assert all(kw.arg != "allow_pickle" for kw in node.keywords), f"{p}:{node.lineno}"
            if p.name != "torch_pickle.py":
                assert "Unpickler" not in name, f"{p}:{node.lineno}"
    assert "trust_remote_code=False" in (ROOT / "mamba_llama_jax" / "data" / "tokenizer.py").read_text()


def test_pickle_tensor_larger_than_its_storage_is_refused(tmp_path):
    """Stride 0 lets a 1-element storage describe a 2^33-element tensor: refused before the copy allocates."""
    src = FIX / "torch_pickle" / "tiny.bin"
    with zipfile.ZipFile(src) as zf:
        entries = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    name, pkl = next(e for e in entries if e[0].endswith("data.pkl"))
    # a.weight: size (3, 5) stride (5, 1) -> size (2^33,) stride (0,): BININT1 3, BININT1 5, TUPLE2 ...
    pkl = pkl.replace(b"K\x03K\x05\x86", b"\x8a\x05\x00\x00\x00\x00\x02\x85", 1).replace(b"K\x05K\x01\x86", b"K\x00\x85", 1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zout:
        for n, d in entries:
            zout.writestr(n, pkl if n == name else d)
    (tmp_path / "big.bin").write_bytes(buf.getvalue())
    from mamba_llama_jax.convert.torch_pickle import load_torch_state_dict

    with pytest.raises(ModelFormatError, match="more elements than its storage"):
        load_torch_state_dict(tmp_path / "big.bin")


def test_compressed_pickle_storage_is_refused(tmp_path):
    with zipfile.ZipFile(FIX / "torch_pickle" / "tiny.bin") as zf:
        entries = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    with zipfile.ZipFile(tmp_path / "z.bin", "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for n, d in entries:
            zout.writestr(n, d)
    from mamba_llama_jax.convert.torch_pickle import load_torch_state_dict

    with pytest.raises(ModelFormatError, match="compressed"):
        load_torch_state_dict(tmp_path / "z.bin")


def test_raw_safetensors_reader_checks_sizes_before_reading(tmp_path):
    from mamba_llama_jax.convert.hf import _read_raw

    good = (FIX / "tiny_llama_tied" / "model.safetensors").read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 2 ** 63) + good[8:])
    with pytest.raises(ModelFormatError, match="header length"):
        _read_raw(f, "model.norm.weight")
    header["model.norm.weight"]["data_offsets"] = [0, 2 ** 62]
    hb = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + good[8 + n:])
    with pytest.raises(ModelFormatError, match="outside the file"):
        _read_raw(f, "model.norm.weight")
    with pytest.raises(ModelFormatError, match="no tensor"):
        _read_raw(f, "nope")


@pytest.mark.parametrize("edit, match", [
    ({"d_conv": 2 ** 36}, "weight files hold only"),  # terabytes of conv weights, allocated before any read
    ({"d_conv": 2 ** 63}, "impossible shapes"),  # not even an int64 shape
    ({"rms_norm_eps": 10 ** 400}, "rms_norm_eps"),  # float() overflows
])
def test_mamba_config_sizes_checked_against_the_weights(tmp_path, edit, match):
    import shutil

    from mamba_llama_jax.convert.mambainllama import import_mambainllama

    d = tmp_path / "m"
    shutil.copytree(FIX / "mambainllama_tiny", d)
    cfg = json.loads((d / "mamba_config.json").read_text())
    if "d_conv" in edit:
        cfg["ssm_cfg"].update(edit)
    else:
        cfg.update(edit)
    (d / "mamba_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=match):
        import_mambainllama(d, dtype="float32")


@pytest.mark.parametrize("text, match", [
    ("a: &a [*a]\n", "refers to itself"),
    (fuzz_lib._YAML_TRICKS[0], "more than"),
    ("output_dir: " + "[" * 200 + "]" * 200 + "\n", "deeper"),
    ("output_dir: x\nstages: [{name: a, data: {source: s}}]\nseed: " + "9" * 5000 + "\n", "cannot parse"),
    ("output_dir: x\nstages: [{name: a, data: {source: s}, optim: {lr: 1" + "0" * 400 + "}}]\n", "finite"),
    ("output_dir: x\nstages: [{name: a, data: {source: s}}]\nhybrid: {attn_fraction: 1.0e-320}\n", "invalid value"),
])
def test_hostile_yaml_is_a_config_error(tmp_path, text, match):
    from mamba_llama_jax.config import TrainConfig, load_config

    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, p)


@pytest.mark.parametrize("raw", [{"rope_theta": 10 ** 400}, {"rms_norm_eps": float("nan")},
                                 {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                   "original_max_position_embeddings": float("inf")}}])
def test_hf_config_numbers_out_of_float_range(raw):
    from mamba_llama_jax.convert.hf import llama_config_from_hf

    base = json.loads((FIX / "tiny_llama" / "config.json").read_text())
    with pytest.raises((ModelFormatError, ConfigError)):
        llama_config_from_hf(base | raw)


@pytest.mark.parametrize("kind, row", [
    ("tokens", {"tokens": 5}), ("tokens", {"tokens": ["a", "b"]}), ("tokens", {"tokens": [1, -2]}),
    ("tokens", {"tokens": [1, 2], "loss_mask": [1, 7]}), ("chat", {"messages": [{"role": ["user"], "content": "x"}]}),
    ("pairs", {"tokens": [1, 2], "rejected_tokens": [1, 3]}),
    ("pairs", {"prompt_ids": [1], "tokens": [2, 2], "rejected_tokens": [1, 3]}),
])
def test_malformed_rows_are_data_errors(kind, row):
    from mamba_llama_jax.data.sources import Examples

    with pytest.raises(DataError):
        Examples([row], kind)[0]


def test_numpy_token_rows_still_accepted():
    from mamba_llama_jax.data.sources import Examples

    ex = Examples([{"tokens": np.arange(1, 4), "loss_mask": np.array([0, 1, 1])}], "tokens")[0]
    assert ex == {"tokens": [1, 2, 3], "loss_mask": [0, 1, 1]}


def test_runner_classifies_outcomes():
    """A project error is an error unless a MemoryError is behind it (an allocation sized by the input, which the
    address-space cap turned into an exception); anything else is a crash."""
    def target(kind: str) -> None:
        if kind == "error":
            raise ModelFormatError("bad field")
        if kind == "memory":
            try:
                bytearray(1 << 62)
            except MemoryError as e:
                raise ModelFormatError("corrupt: MemoryError") from e
        if kind == "raw":
            raise KeyError("x")

    kinds = iter(["ok", "error", "memory", "raw"])
    fz = fuzz_lib.Fuzzer("fake", (), lambda rng: next(kinds), target)
    r = fuzz_lib.run_fuzzer(fz, 4)
    assert (r["accepted"], r["errors"]) == (1, {"ModelFormatError": 1})
    assert r["crashes"] == {"KeyError": 1, "MemoryErrorBehindProjectError": 1}
