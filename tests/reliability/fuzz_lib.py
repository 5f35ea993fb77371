"""Structure-aware fuzzers for every parser of outside data (not a test module; used by
tests/reliability/test_fuzz_parsers.py and benchmarks/fuzz_parsers.py).

Each fuzzer starts from a valid input (a fixture file or a shipped config), decodes it into its structure, mutates
fields (counts, sizes, offsets, types, strings) and re-encodes it, so inputs get past magic numbers and checksums
and reach the parser's logic. `run_fuzzer` feeds a parser N inputs and classifies each outcome: accepted, a project
error (a `MambaLlamaError` with a message), or a crash (anything else, an empty message, a time-out, a
`MemoryError` under the address-space cap, also one a parser wrapped in a project error). Every fuzzer is
deterministic in its seed.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import json
import pickletools
import random
import resource
import signal
import struct
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).parents[2]
FIX = ROOT / "tests" / "fixtures"

# Values that break parsers: boundaries of every integer width, non-finite and subnormal floats, odd strings.
INTS = [0, 1, -1, 2, 3, 7, 31, 32, 255, 256, 2 ** 15, 2 ** 16 - 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32,
        2 ** 40, 2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -2 ** 31, -2 ** 63, 10 ** 400]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-320, 5e-324, 1e308, -1e308, float("nan"), float("inf"), float("-inf")]
STRINGS = ["", " ", "a", "llama", "gpt2", "\x00", "\u2581", "\ud7ff\ufffd", "é" * 3, "a b", "a b c", "<|im_start|>",
           "{{", "{% for %}", "x" * 5000, "../../etc/passwd", "/abs/path", "null", "NaN", "1e999", "\n\r\t"]


def json_values(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON-like value (the types json.loads/yaml.safe_load can give)."""
    r = rng.random()
    if r < 0.25:
        return rng.choice(INTS)
    if r < 0.4:
        return rng.choice(FLOATS)
    if r < 0.6:
        return rng.choice(STRINGS)
    if r < 0.7:
        return rng.choice([None, True, False])
    if depth > 2:
        return rng.choice(INTS)
    if r < 0.85:
        return [json_values(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(STRINGS[:8] + ["type", "rope_type", "factor"]): json_values(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


def mutate_tree(tree: Any, rng: random.Random, n: int | None = None,
                values: Callable[[random.Random], Any] = json_values) -> Any:
    """1-3 edits of a JSON-like tree: replace a node by a random value, drop it, duplicate a list item, add a key,
    or swap a value with another node's."""
    tree = copy.deepcopy(tree)
    for _ in range(n or rng.randint(1, 3)):
        paths = [p for p in _paths(tree) if p]
        if not paths:
            return values(rng)
        path = rng.choice(paths)
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = rng.random()
        if op < 0.5:
            parent[key] = values(rng)
        elif op < 0.7:
            del parent[key]
        elif op < 0.8 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op < 0.9 and isinstance(parent, dict):
            parent[rng.choice(STRINGS[:6] + ["extra_key"])] = values(rng)
        else:
            other = rng.choice(paths)
            node = tree
            try:
                for k in other:
                    node = node[k]
                parent[key] = copy.deepcopy(node)
            except (KeyError, IndexError, TypeError):
                parent[key] = values(rng)
    return tree


# --------------------------------------------------------------------------------------------------- the runner


class _Timeout(BaseException):
    """Raised by the per-input alarm; a BaseException so that no parser's `except Exception` swallows it."""


@dataclasses.dataclass
class Fuzzer:
    """A parser under test: `make(rng)` gives one mutated input, `target(input)` parses it."""

    name: str
    modules: tuple[str, ...]  # source files whose line coverage is reported, relative to the repo root
    make: Callable[[random.Random], Any]
    target: Callable[[Any], None]


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run_fuzzer(fz: Fuzzer, n: int, seed: int = 0, *, time_limit_s: float = 5.0, mem_limit_bytes: int = 0,
               keep_crashes: int = 5) -> dict[str, Any]:
    """Feeds `fz` `n` inputs; returns counts by outcome. `mem_limit_bytes` (0 = off) caps the address space above
    what is mapped now, so an allocation sized by a corrupt field fails as MemoryError instead of exhausting
    the machine."""
    from mamba_llama_jax.errors import MambaLlamaError

    rng = random.Random(f"{fz.name}/{seed}")
    counts: collections.Counter[str] = collections.Counter()
    crashes: list[dict[str, str]] = []
    slowest = 0.0

    def alarm(*_: Any) -> None:
        raise _Timeout()

    old_handler = signal.signal(signal.SIGALRM, alarm)
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    if mem_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + mem_limit_bytes, old_as[1]))
    t_start = time.perf_counter()
    try:
        for i in range(n):
            inp = fz.make(rng)
            t0 = time.perf_counter()
            outcome, detail = "ok", ""
            signal.setitimer(signal.ITIMER_REAL, time_limit_s)
            try:
                fz.target(inp)
            except _Timeout:
                outcome, detail = "crash:Timeout", f"no result within {time_limit_s} s"
            except MambaLlamaError as e:
                outcome = f"error:{type(e).__name__}" if str(e).strip() else "crash:EmptyMessage"
                if isinstance(e.__cause__, MemoryError):
                    # a clear message, but the parser tried to allocate by a size the input declared: without the
                    # address-space cap that allocation can take the machine's memory (torch_pickle's memo did)
                    outcome = "crash:MemoryErrorBehindProjectError"
                detail = str(e)[:300]
            except BaseException as e:  # noqa: BLE001 - anything but a project error is what we hunt
                if isinstance(e, KeyboardInterrupt):
                    raise
                outcome, detail = f"crash:{type(e).__name__}", "".join(
                    traceback.format_exception(type(e), e, e.__traceback__, limit=-4))[-1500:]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - t0)
            counts[outcome] += 1
            if outcome.startswith("crash") and len(crashes) < keep_crashes:
                crashes.append({"input": _describe(inp), "outcome": outcome, "detail": detail, "index": str(i)})
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if mem_limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, old_as)
    return {"parser": fz.name, "inputs": n, "seed": seed, "accepted": counts.get("ok", 0),
            "errors": {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("error:")},
            "crashes": {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("crash:")},
            "crash_examples": crashes, "slowest_input_s": round(slowest, 4),
            "seconds": round(time.perf_counter() - t_start, 2)}


def _describe(inp: Any) -> str:
    s = repr(inp)
    return s if len(s) < 400 else s[:200] + f" ...({len(s)} chars)... " + s[-150:]


# ------------------------------------------------------------------------------------------------------- GGUF

# GGUF value type -> struct code of its scalars; 8 = string, 9 = array
_G_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclasses.dataclass
class GGUFModel:
    version: int
    kvs: list[list[Any]]  # [key bytes, vtype, value]; value: scalar, bytes, or (itype, [values]) for arrays
    tensors: list[list[Any]]  # [name bytes, dims list, ggml type, relative data offset]
    data: bytes
    alignment: int = 32


def gguf_model(path: Path) -> GGUFModel:
    """The structure of a valid GGUF file, read with the gguf package."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    kvs = []
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        t = [int(x) for x in f.types]
        if t[0] == 9:
            if t[1] == 8:
                vals = [bytes(f.parts[i]) for i in f.data]
            else:
                vals = [f.parts[i].tolist()[0] for i in f.data]
            kvs.append([key.encode(), 9, (t[1], vals)])
        elif t[0] == 8:
            kvs.append([key.encode(), 8, bytes(f.parts[-1])])
        else:
            kvs.append([key.encode(), t[0], f.parts[-1].tolist()[0]])
    tensors = []
    for t in r.tensors:
        parts = t.field.parts
        tensors.append([bytes(parts[1]), [int(x) for x in parts[3].tolist()], int(parts[4][0]), int(parts[5][0])])
    data = Path(path).read_bytes()[r.data_offset:]
    return GGUFModel(3, kvs, tensors, data)


def _g_value(out: bytearray, vtype: int, value: Any, lens: list[int]) -> None:
    if vtype == 8:
        b = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
        lens.append(len(out))
        out += struct.pack("<Q", len(b)) + b
    elif vtype == 9:
        # a retyped scalar or string becomes a one-element array of its old type
        itype, vals = value if isinstance(value, tuple) else (8 if isinstance(value, bytes) else 5, [value])
        out += struct.pack("<I", itype & 0xFFFFFFFF)
        lens.append(len(out))
        out += struct.pack("<Q", len(vals))
        for v in vals:
            _g_value(out, itype, v, lens)
    elif vtype in _G_SCALAR:
        code = _G_SCALAR[vtype]
        try:
            out += struct.pack("<" + code, value)
        except (struct.error, TypeError, OverflowError):
            out += struct.pack("<" + code, 0 if code not in "fd" else 0.0)
    # an unknown type tag is written with no payload: the following bytes are misread as its value


def gguf_bytes(m: GGUFModel) -> tuple[bytes, dict[str, list[int]]]:
    """Serialises `m`; also returns the byte positions of every count/length/size/offset field."""
    out = bytearray(b"GGUF")
    fields: dict[str, list[int]] = {"version": [4], "counts": [8, 16], "lens": [], "dims": [], "offsets": [],
                                    "types": []}
    out += struct.pack("<IQQ", m.version & 0xFFFFFFFF, len(m.tensors), len(m.kvs))
    for key, vtype, value in m.kvs:
        fields["lens"].append(len(out))
        out += struct.pack("<Q", len(key)) + key
        fields["types"].append(len(out))
        out += struct.pack("<I", vtype & 0xFFFFFFFF)
        _g_value(out, vtype, value, fields["lens"])
    for name, dims, ttype, offset in m.tensors:
        fields["lens"].append(len(out))
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims) & 0xFFFFFFFF)
        for d in dims:
            fields["dims"].append(len(out))
            out += struct.pack("<Q", d % 2 ** 64)
        fields["types"].append(len(out))
        fields["offsets"].append(len(out) + 4)
        out += struct.pack("<IQ", ttype & 0xFFFFFFFF, offset % 2 ** 64)
    out += b"\0" * ((-len(out)) % m.alignment)
    return bytes(out) + m.data, fields


def _mutate_gguf_value(rng: random.Random, vtype: int, value: Any) -> tuple[int, Any]:
    r = rng.random()
    if r < 0.15:  # retype: a new type tag, the value re-encoded (or misread, for unknown tags)
        return rng.choice([0, 1, 4, 5, 6, 7, 8, 9, 10, 12, 13, 255, 2 ** 31]), value
    if vtype == 8 or r < 0.25:
        return 8, rng.choice([b"", b"\xff\xfe", b"llama", b"gpt2", b"\x00" * 3, "é".encode(), b"x" * 3000,
                              str(rng.choice(STRINGS)).encode("utf-8", "surrogatepass")])
    if vtype == 9:
        itype, vals = value if isinstance(value, tuple) else (8 if isinstance(value, bytes) else 5, [value])
        vals = list(vals)
        op = rng.random()
        if op < 0.2 and vals:
            vals = vals[: rng.randrange(len(vals))]
        elif op < 0.35 and vals:
            i = rng.randrange(len(vals))
            vals[i] = rng.choice(vals) if rng.random() < 0.5 else (
                rng.choice([b"", b"a b c", b"\xff", b"<|im_end|>"]) if itype == 8 else rng.choice(INTS[:20]))
        elif op < 0.5:
            vals = vals + vals[: rng.randint(1, 5)]
        elif op < 0.6:
            itype = rng.choice([0, 4, 5, 6, 8, 9, 10])
            if itype == 9:
                vals = [(4, [1, 2])] * min(len(vals), 3)
        elif op < 0.7:
            vals = []
        else:
            vals = [rng.choice(vals)] * len(vals) if vals else vals
        return 9, (itype, vals)
    if vtype in (6, 12):
        return vtype, rng.choice(FLOATS)
    return vtype, rng.choice(INTS[:22])


def make_gguf(base: GGUFModel, rng: random.Random) -> bytes:
    m = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.4 and m.kvs:  # a metadata value
            kv = rng.choice(m.kvs)
            kv[1], kv[2] = _mutate_gguf_value(rng, kv[1], kv[2])
        elif op < 0.5 and m.kvs:  # drop / duplicate / rename a key, or add general.alignment
            i = rng.randrange(len(m.kvs))
            r = rng.random()
            if r < 0.4:
                m.kvs.pop(i)
            elif r < 0.6:
                m.kvs.append(list(m.kvs[i]))
            elif r < 0.8:
                m.kvs[i][0] = rng.choice([b"", b"\xff\xfe", b"general.alignment", b"llama.vocab_size", b"k" * 500])
            else:
                m.kvs.append([b"general.alignment", rng.choice([4, 4, 6]), rng.choice([0, 1, 3, 16, 64, 2 ** 31])])
        elif op < 0.75 and m.tensors:  # a tensor record
            t = rng.choice(m.tensors)
            r = rng.random()
            if r < 0.3 and t[1]:
                j = rng.randrange(len(t[1]))
                t[1][j] = rng.choice([0, 1, 2, 32, 33, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 64 - 1, t[1][j] * 2])
            elif r < 0.45:
                t[1] = t[1] + [1] * rng.randint(1, 4) if rng.random() < 0.5 else t[1][:0]
            elif r < 0.65:
                t[2] = rng.choice([0, 1, 2, 3, 6, 8, 12, 14, 30, 31, 39, 100, 2 ** 32 - 1])
            elif r < 0.85:
                t[3] = rng.choice([t[3] + 1, t[3] + 32, t[3] - 32, 0, len(m.data), len(m.data) - 32, 2 ** 63,
                                   2 ** 64 - 32])
            elif r < 0.93:
                t[0] = rng.choice([b"", m.tensors[0][0], b"\xff", b"output.weight", b"rope_freqs.weight"])
            else:
                m.tensors.remove(t)
        elif op < 0.85:  # the data section
            d = bytearray(m.data)
            if rng.random() < 0.5 and d:
                for _ in range(rng.randint(1, 20)):
                    d[rng.randrange(len(d))] = rng.randrange(256)
            else:
                d = d[: rng.randrange(len(d) + 1)]
            m.data = bytes(d)
        else:
            m.version = rng.choice([0, 1, 2, 3, 4, 0x03000000, 2 ** 32 - 1])
    raw, fields = gguf_bytes(m)
    raw = bytearray(raw)
    if rng.random() < 0.35:  # lie in one size field: a count, a length, a dimension or an offset
        kind = rng.choice([k for k in ("counts", "lens", "dims", "offsets", "types", "version") if fields[k]])
        pos = rng.choice(fields[kind])
        width = 4 if kind in ("types", "version") else 8
        v = rng.choice(INTS[:24]) % 2 ** (8 * width)
        raw[pos:pos + width] = v.to_bytes(width, "little")
    if rng.random() < 0.1:
        raw = raw[: rng.randrange(len(raw))]
    return bytes(raw)


def gguf_fuzzer(workdir: Path) -> Fuzzer:
    from mamba_llama_jax.convert.gguf import read_gguf

    base = gguf_model(FIX / "tiny_llama-Q4_1.gguf")
    path = workdir / "fuzz.gguf"

    def target(raw: bytes) -> None:
        path.write_bytes(raw)
        read_gguf(path)

    return Fuzzer("gguf", ("mamba_llama_jax/convert/gguf.py",), lambda rng: make_gguf(base, rng), target)


# ------------------------------------------------------------------------------------- GGUF tokenizer metadata


def _sp_base() -> dict[str, Any]:
    """A small SentencePiece-style ('llama') vocabulary with byte fallback, user and control tokens."""
    toks = ["<unk>", "<s>", "</s>", "<0x41>", "<0x0A>", "\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "<u>"]
    types = [2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 1, 1, 4]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": toks, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -1.5, -2.5, -0.5, 0.0],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": True,
            "tokenizer.chat_template": "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"}


def _token_values(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.3:
        return rng.choice([0, 1, 2, 3, 5, 6, 7, -1, 12, 299, 300, 2 ** 31, 2 ** 63, True])
    if r < 0.5:
        return rng.choice(["gpt2", "llama", "bert", "smollm", "llama-bpe", "default", "", "qwen2", "a b", "a  b",
                           "<|im_start|>", "\u2581", "{% if %}", "{{ messages[0]['content'] }}",
                           "{% for m in messages %}{{ m.content }}{% endfor %}", "{{ raise_exception('no') }}"])
    return json_values(rng)


class DictMetadata:
    """`convert.gguf.Metadata` over plain Python values (what its `raw` returns), so the tokenizer builder is fuzzed
    without writing files; the typed getters and their checks are the real ones."""

    def __new__(cls, values: dict[str, Any], source: str = "fuzz.gguf") -> Any:
        from mamba_llama_jax.convert.gguf import Metadata

        class _M(Metadata):
            def __init__(self) -> None:
                self.fields, self.source = values, source

            def raw(self, key: str) -> Any:
                return self.fields[key]

        return _M()


def tokenizer_fuzzer(workdir: Path) -> Fuzzer:
    from mamba_llama_jax.convert.gguf import Metadata, open_gguf, tokenizer_from_metadata

    meta = Metadata(open_gguf(FIX / "tiny_llama-Q4_1.gguf"), "base")
    bpe = {k: meta.raw(k) for k in meta.fields if k.startswith("tokenizer.")}
    bases = [bpe, _sp_base()]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi <|im_start|> ab"}]

    def make(rng: random.Random) -> dict[str, Any]:
        base = rng.choice(bases)
        m = mutate_tree(base, rng, values=_token_values)
        if rng.random() < 0.2:  # drop a whole key
            m.pop(rng.choice(sorted(m)), None)
        return m

    def target(values: dict[str, Any]) -> None:
        tok = tokenizer_from_metadata(DictMetadata(values))
        ids = tok.encode("hello ab a\n<|im_start|> é 42", add_special_tokens=True)
        tok.decode(ids)
        if tok.hf.chat_template:
            tok.encode_chat(chat)

    return Fuzzer("gguf_tokenizer", ("mamba_llama_jax/convert/gguf.py", "mamba_llama_jax/data/tokenizer.py"),
                  make, target)


# ------------------------------------------------------------------------------------------------- safetensors


def _st_split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def make_safetensors(base: bytes, rng: random.Random) -> bytes:
    header, data = _st_split(base)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(names)
        info = header.get(name)
        if not isinstance(info, dict):
            continue
        r = rng.random()
        if r < 0.2:
            info["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "XX", "",
                                        5, None])
        elif r < 0.4:
            info["shape"] = rng.choice([[], [0], [-1], [2 ** 40], [2 ** 31, 2 ** 31], [3, 5], [1.5], ["2"], None,
                                        list(reversed(info.get("shape") or [])), [1] * 40])
        elif r < 0.65:
            offs = info.get("data_offsets")
            a, b = offs if isinstance(offs, list) and len(offs) == 2 and all(isinstance(x, int) for x in offs) \
                else (0, 0)
            info["data_offsets"] = rng.choice([[b, a], [a, a], [a, b + 4], [a - 4, b - 4], [-8, b], [a, 2 ** 63],
                                               [a, len(data) + 1], [0, b], [a], [a, b, 0], "0", [a + 0.5, b], None])
        elif r < 0.75:
            info.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        elif r < 0.85:
            header[rng.choice(names)] = json_values(rng)
        elif r < 0.95:
            header["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 5}, [], "x", None, {"a": {"b": 1}}])
        else:
            header.pop(name, None)
    hb = json.dumps(header).encode()
    if rng.random() < 0.1:
        hb = hb.replace(b'"', b"'", 1) if rng.random() < 0.5 else hb[: rng.randrange(len(hb))]
    if rng.random() < 0.2:
        hb += b" " * rng.randint(1, 9)
    n = len(hb)
    if rng.random() < 0.15:
        n = rng.choice([0, 1, 7, n - 1, n + 1, n + len(data), 2 ** 32, 2 ** 63, 2 ** 64 - 1])
    out = n.to_bytes(8, "little") + hb + data
    if rng.random() < 0.15:
        out = out[: rng.randrange(len(out))]
    return out


def safetensors_fuzzer(workdir: Path) -> Fuzzer:
    from mamba_llama_jax.convert import hf
    from mamba_llama_jax.errors import ModelFormatError

    base = (FIX / "tiny_llama_tied" / "model.safetensors").read_bytes()
    d = workdir / "st"
    d.mkdir(parents=True, exist_ok=True)
    f = d / "model.safetensors"

    def target(raw: bytes) -> None:
        f.write_bytes(raw)
        with hf.SafetensorsDir(d) as w:
            for k in list(w.keys()):
                w.get(k)
        # The raw reader (used when safetensors cannot hand numpy a bf16 array) parses the same header itself.
        try:
            names = [k for k in _st_split(raw)[0] if k != "__metadata__"]
        except Exception:  # noqa: BLE001 - the header is not JSON: use a name that exists in the valid file
            names = ["model.norm.weight"]
        for k in names[:3]:
            hf._read_raw(f, k)
        try:
            hf._read_raw(f, "missing.weight")
        except ModelFormatError:
            pass  # the expected answer; anything else is a crash

    return Fuzzer("safetensors", ("mamba_llama_jax/convert/hf.py",), lambda rng: make_safetensors(base, rng),
                  target)


# ------------------------------------------------------------------------------------------------ torch pickle

DANGEROUS_GLOBALS = [("posix", "system"), ("os", "system"), ("builtins", "eval"), ("builtins", "exec"),
                     ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen"),
                     ("__builtin__", "open"), ("torch._utils", "_rebuild_tensor"), ("numpy", "frombuffer"),
                     ("numpy.core.multiarray", "_reconstruct"), ("collections", "defaultdict"),
                     ("torch", "FloatStorage"), ("torch", "BFloat16Storage"), ("torch", "HalfStorage"),
                     ("torch", "LongStorage"), ("torch", "Tensor"), ("collections", "OrderedDict"),
                     ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_tensor_v2")]


def _p_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -2 ** 31 <= v < 2 ** 31:
        return b"J" + struct.pack("<i", v)
    b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _p_str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


_INSERTS = [b"(", b"t", b"R", b"b", b".", b"]", b"a", b"}", b"s", b"N", b"\x88", b"0", b"2", b"h\x00", b"h\x63",
            b"Q", b")", b"\x85", b"\x86", b"\x87", b"e", b"u", b"\x8c\x01a", b"I1\n", b"F1e999\n", b"\x94"]


def mutate_pickle(data: bytes, rng: random.Random) -> bytes:
    ops = list(pickletools.genops(data))
    chunks = [data[pos:(ops[i + 1][2] if i + 1 < len(ops) else len(data))] for i, (_, _, pos) in enumerate(ops)]
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(ops))
        op, arg, _ = ops[i]
        r = rng.random()
        if r < 0.3 and isinstance(arg, int) and not op.name.endswith("PUT") and not op.name.endswith("GET"):
            chunks[i] = _p_int(rng.choice(INTS[:24] + [arg + 1, arg - 1, arg * 1000]))
        elif r < 0.45 and isinstance(arg, str) and op.name.endswith("UNICODE"):
            chunks[i] = _p_str(rng.choice(["0", "1", "99", "../data.pkl", "", "cpu", "cuda:0", "storage", "x" * 300,
                                           arg + "0", "a.weight"]))
        elif r < 0.6 and op.name in ("GLOBAL", "STACK_GLOBAL"):
            mod, name = rng.choice(DANGEROUS_GLOBALS)
            chunks[i] = b"c" + f"{mod}\n{name}\n".encode()
        elif r < 0.7:
            chunks[i] = b""
        elif r < 0.8:
            chunks.insert(i, rng.choice(_INSERTS))
            ops.insert(i, ops[i])
        elif r < 0.9:
            j = rng.randrange(len(ops))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        else:
            chunks[i] = chunks[i] * 2
    out = b"".join(chunks)
    if rng.random() < 0.05:
        out = out[: rng.randrange(len(out) + 1)]
    return out


def make_torch_zip(base: Path, rng: random.Random) -> bytes:
    with zipfile.ZipFile(base) as zf:
        entries = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    pkl = next(i for i, (n, _) in enumerate(entries) if n.endswith("data.pkl"))
    storages = [i for i, (n, _) in enumerate(entries) if "/data/" in n]
    compress = zipfile.ZIP_STORED
    r = rng.random()
    if r < 0.6:
        entries[pkl] = (entries[pkl][0], mutate_pickle(entries[pkl][1], rng))
    elif r < 0.75 and storages:
        i = rng.choice(storages)
        name, d = entries[i]
        entries[i] = (name, rng.choice([d[:-1], d + b"\0" * 4, b"", d * 2, d[: len(d) // 2]]))
    elif r < 0.82 and storages:
        entries.pop(rng.choice(storages))
    elif r < 0.88:
        entries.append((entries[pkl][0].replace("data.pkl", "x/data.pkl"), entries[pkl][1]))
    elif r < 0.94:
        compress = zipfile.ZIP_DEFLATED
    else:
        entries[pkl] = (entries[pkl][0].replace("data.pkl", "dota.pkl"), entries[pkl][1])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as zout:
        for name, d in entries:
            zout.writestr(name, d)
    raw = bytearray(buf.getvalue())
    if rng.random() < 0.1:  # damage the archive itself: a byte of the central directory, or the tail
        if rng.random() < 0.5:
            raw = raw[: rng.randrange(len(raw))]
        else:
            raw[rng.randrange(len(raw) - 22, len(raw))] = rng.randrange(256)
    return bytes(raw)


def torch_pickle_fuzzer(workdir: Path) -> Fuzzer:
    from mamba_llama_jax.convert.torch_pickle import load_torch_state_dict

    bases = [FIX / "torch_pickle" / "tiny.bin", FIX / "mambainllama_tiny" / "pytorch_model.bin"]
    path = workdir / "fuzz.bin"

    def target(raw: bytes) -> None:
        path.write_bytes(raw)
        load_torch_state_dict(path)

    return Fuzzer("torch_pickle", ("mamba_llama_jax/convert/torch_pickle.py",),
                  lambda rng: make_torch_zip(bases[rng.random() < 0.2], rng), target)


# --------------------------------------------------------------------------- config.json (+ generation, index)


def config_json_fuzzer(workdir: Path) -> Fuzzer:
    from mamba_llama_jax.convert import hf

    cfgs = [json.loads((FIX / d / "config.json").read_text()) for d in ("tiny_llama", "tiny_llama_tied")]
    cfgs.append(dict(cfgs[0], rope_scaling={"rope_type": "linear", "factor": 2.0}))
    cfgs.append(dict(cfgs[0], rope_parameters={"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}))
    index = json.loads((FIX / "tiny_llama" / "model.safetensors.index.json").read_text())
    gen = json.loads((FIX / "tiny_llama" / "generation_config.json").read_text())
    d = workdir / "hfdir"
    d.mkdir(parents=True, exist_ok=True)
    for name in {str(v) for v in index["weight_map"].values()}:
        (d / name).write_bytes(b"")

    def make(rng: random.Random) -> tuple[str, str]:
        kind = rng.choice(["config", "config", "config", "generation", "index"])
        base = {"config": rng.choice(cfgs), "generation": gen, "index": index}[kind]
        text = json.dumps(mutate_tree(base, rng))
        if rng.random() < 0.1:
            text = rng.choice([text[: rng.randrange(len(text) + 1)], text.replace(",", ",,", 1),
                               text.replace(": ", ": " + "7" * 5000 + ", \"_\": ", 1), "[" * 100_000])
        return kind, text

    def target(inp: tuple[str, str]) -> None:
        kind, text = inp
        name = {"config": "config.json", "generation": "generation_config.json",
                "index": "model.safetensors.index.json"}[kind]
        p = d / name
        p.write_text(text, encoding="utf-8")
        if kind == "index":
            hf.shard_files(p, "safetensors index")
            return
        raw = hf._read_json(p, what=kind)
        if kind == "config":
            hf.llama_config_from_hf(raw, source=str(p))
        else:
            if not isinstance(raw, dict):
                return  # read_hf_dir refuses a non-object with a ModelFormatError before this point
            hf._eos_ids(raw.get("eos_token_id"), str(p))

    return Fuzzer("config_json", ("mamba_llama_jax/convert/hf.py",), make, target)


# ------------------------------------------------------------------------------------------- mamba_config.json

_SSM_KEYS = ["d_state", "d_conv", "ngroups", "chunk_size", "conv_bias", "dt_min", "dt_max", "dt_init_floor",
             "A_init_range", "dt_rank", "repeat_kv_before_conv", "bias", "rmsnorm", "norm_before_gate", "D_has_hdim",
             "dt_limit", "expand", "headdim", "d_ssm", "proj_x_bias", "use_fast_path", "unknown_key"]


def mamba_config_fuzzer(workdir: Path, full_every: int = 4) -> Fuzzer:
    """mamba_config.json (and, for one input in `full_every`, a whole `import_mambainllama` of the fixture with the
    mutated file, which builds the model)."""
    import shutil

    from mamba_llama_jax.convert import mambainllama as mil
    from mamba_llama_jax.convert.hf import llama_config_from_hf
    from mamba_llama_jax.convert.torch_pickle import load_torch_state_dict

    src = FIX / "mambainllama_tiny"
    base = json.loads((src / "mamba_config.json").read_text())
    llama = llama_config_from_hf(json.loads((src / "config.json").read_text()))
    names = set(load_torch_state_dict(src / "pytorch_model.bin"))
    d = workdir / "mil"
    if not d.exists():
        shutil.copytree(src, d)
    counter = [0]

    def values(rng: random.Random) -> Any:
        return rng.choice([json_values(rng), rng.choice([1, 2, 4, 8, 16, 32, 0, -4, 2 ** 40, 1e-3, "auto", True])])

    def make(rng: random.Random) -> dict[str, Any]:
        # Half the inputs keep the model-shape fields valid and vary only ssm_cfg, so they reach the mixer checks.
        m = mutate_tree(base, rng, values=values) if rng.random() < 0.5 else copy.deepcopy(base)
        if isinstance(m, dict) and isinstance(m.get("ssm_cfg"), dict) and rng.random() < 0.8:
            for _ in range(rng.randint(1, 3)):
                m["ssm_cfg"][rng.choice(_SSM_KEYS)] = values(rng)
        return m

    def target(raw: dict[str, Any]) -> None:
        counter[0] += 1
        if full_every and counter[0] % full_every == 0:
            (d / "mamba_config.json").write_text(json.dumps(raw))
            mil.import_mambainllama(d, dtype="float32")
            return
        source = "mamba_config.json"
        layers = mil._check_mamba_config(raw, llama, source)
        v = mil._detect_variant(names, llama.num_layers, layers, raw["ssm_cfg"], source)
        for variant in (v, "mamba1" if v == "mamba2" else "mamba2"):
            try:
                mil._mamba_config(raw, variant, llama, source)
            except Exception as e:  # noqa: BLE001 - re-raised as is: the runner classifies it
                if variant == v:
                    raise
                from mamba_llama_jax.errors import MambaLlamaError
                if not isinstance(e, MambaLlamaError):
                    raise

    return Fuzzer("mamba_config_json", ("mamba_llama_jax/convert/mambainllama.py",), make, target)


# ---------------------------------------------------------------------------------------------- recipe yaml

_YAML_TRICKS = [
    "a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
    "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n"
    "h: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n",  # "billion laughs"
    "a: &a [*a]\n",  # a list that contains itself
    "&r {output_dir: x, stages: [{name: a, data: {source: s}}], r: *r}\n",
    "output_dir: " + "[" * 3000 + "]" * 3000 + "\n",
    "output_dir: !!python/object/apply:os.system ['echo pwned']\n",
    "output_dir: x\n\tstages: []\n",
    "\x00\xff: 1\n",
    "output_dir: x\nstages: [{name: a, data: {source: s}, steps: 1" + "0" * 400 + "}]\n",
    "output_dir: x\nstages: [{name: a, data: {source: s}}]\nhybrid: {attn_fraction: 1.0e-320}\n",
    "output_dir: x\nstages: [{name: a, data: {source: s}}]\nseed: .inf\n",
    "- just\n- a list\n",
    "output_dir: x\nstages: [{name: a, data: {source: s}}]\nseed: " + "9" * 5000 + "\n",
    "output_dir: x\noutput_dir: y\nstages: [{name: a, data: {source: s}}]\n",
]
_OVERRIDES = ["stages.0.steps=10", "stages.9.steps=1", "stages.x.steps=1", "a.b.c=1", "=1", "noequals", "seed=[",
              "hybrid=5", "hybrid.attn_fraction=0.3", "stages=null", "stages.0=", "output_dir.x=1", "..=1",
              "stages.0.data.seq_len=-1", "mesh.data=0", "log_every=1" + "0" * 400, "checkpoint.every={a: 1}",
              "stages.0.optim.lr=.nan", "stages.0.hybrid.attn_layers=[1, 1]"]


def recipe_fuzzer(workdir: Path) -> Fuzzer:
    import yaml

    from mamba_llama_jax.config import TrainConfig, load_config

    bases = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "configs" / "recipes").glob("*.yaml"))]
    path = workdir / "recipe.yaml"

    def values(rng: random.Random) -> Any:
        return rng.choice([json_values(rng), rng.choice([0, 1, -1, 0.5, 0.3, 1e-320, "mamba", "all", "dpo", "pairs",
                                                         "chat", "cosine", [1, 3], [], {}, None])])

    def make(rng: random.Random) -> tuple[str, list[str]]:
        r = rng.random()
        if r < 0.08:
            text = rng.choice(_YAML_TRICKS)
        else:
            text = yaml.safe_dump(mutate_tree(rng.choice(bases), rng, values=values), allow_unicode=True)
            if r < 0.15:
                text = text[: rng.randrange(len(text) + 1)]
        overrides = rng.sample(_OVERRIDES, rng.randint(1, 2)) if rng.random() < 0.2 else []
        return text, overrides

    def target(inp: tuple[str, list[str]]) -> None:
        text, overrides = inp
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        load_config(TrainConfig, path, overrides)

    return Fuzzer("recipe_yaml", ("mamba_llama_jax/config.py",), make, target)


# -------------------------------------------------------------------------------------------------- chat rows


def chat_rows_fuzzer(workdir: Path) -> Fuzzer:
    from mamba_llama_jax.data import sources

    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    bases = [
        ("chat", {"messages": msgs}),
        ("chat", {"tokens": [1, 2, 3], "loss_mask": [0, 1, 1]}),
        ("pairs", {"chosen": msgs, "rejected": msgs[:2] + [{"role": "assistant", "content": "no"}]}),
        ("pairs", {"prompt": "p", "chosen": "c", "rejected": "r"}),
        ("pairs", {"prompt_ids": [1, 2], "tokens": [1, 2, 3, 4], "rejected_tokens": [1, 2, 5],
                   "loss_mask": [0, 0, 1, 1], "rejected_loss_mask": [0, 0, 1]}),
        ("tokens", {"tokens": [5, 6, 7], "loss_mask": [1, 1, 0]}),
    ]

    def values(rng: random.Random) -> Any:
        return rng.choice([json_values(rng), rng.choice(["user", "assistant", "system", "tool", "", [], {},
                                                          {"role": "assistant", "content": 5}])])

    def make(rng: random.Random) -> tuple[str, Any]:
        kind, row = rng.choice(bases)
        if rng.random() < 0.1:
            kind = rng.choice(["chat", "pairs", "tokens"])
        return kind, mutate_tree(row, rng, values=values)

    def target(inp: tuple[str, Any]) -> None:
        kind, row = inp
        if not isinstance(row, dict):
            row = {"value": row}  # a table row is always a mapping of column names
        sources.Examples([row], kind)[0]

    return Fuzzer("chat_rows", ("mamba_llama_jax/data/sources.py",), make, target)


FUZZERS: dict[str, Callable[[Path], Fuzzer]] = {
    "gguf": gguf_fuzzer, "gguf_tokenizer": tokenizer_fuzzer, "safetensors": safetensors_fuzzer,
    "torch_pickle": torch_pickle_fuzzer, "config_json": config_json_fuzzer, "mamba_config_json": mamba_config_fuzzer,
    "recipe_yaml": recipe_fuzzer, "chat_rows": chat_rows_fuzzer,
}
