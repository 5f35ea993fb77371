"""Reads torch's zip checkpoint format (`pytorch_model.bin`) without torch and without running pickled code.

The pickle inside may only rebuild tensors from storages into (ordered) dicts: a restricted unpickler admits
exactly the handful of globals torch writes for a state dict and refuses everything else, so a hostile file can
not call arbitrary functions (the risk `torch.load(weights_only=False)` carries). Tensors come back as numpy
arrays (bf16 as `ml_dtypes.bfloat16`), bounds-checked against their storage.

Memory is bounded by the file too: before unpickling, `_check_opcodes` walks the stream's opcodes (pickletools
parses without building anything) and refuses a memo index or a frame larger than the stream could hold. Why: the
C unpickler sizes its memo table by the largest index it is given and zero-fills it, so one corrupt byte (a
`LONG_BINPUT` of 2^30) made it touch 16 GB, enough for the kernel to kill the process (most likely how a test
worker running the mutation test was OOM-killed at 21 GB); lengths of bytes / strings it allocates up front, which
the walk has checked are really there.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mamba_llama_jax.errors import ModelFormatError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ModelFormatError("pickle: negative tensor offset, size or stride")
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    # Zero or overlapping strides could make a tiny storage describe an enormous tensor, which the copy below
    # would allocate; a state dict's tensors never hold more elements than their storage.
    if math.prod(size) > storage.size:
        raise ModelFormatError(f"pickle: tensor of size {size} has more elements than its storage of {storage.size}")
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.size:
        raise ModelFormatError(f"pickle: tensor of size {size} reaches past its storage of {storage.size} items")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * item for s in stride))
    return np.array(view)  # a copy, so nothing keeps the whole storage alive


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: Any, zf: zipfile.ZipFile, prefix: str):
        super().__init__(data)
        self.zf, self.prefix = zf, prefix
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ModelFormatError(
            f"refusing to load {module}.{name} from a pickle: only tensors, storages and dicts are allowed "
            "(this file may try to run code; convert it to safetensors with a trusted tool)"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ModelFormatError(f"pickle: unsupported persistent id {str(pid)[:80]!r}")
        _, stype, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                raise ModelFormatError(f"pickle: storage {key!r} is missing from the archive") from None
            if info.compress_type != zipfile.ZIP_STORED:
                # torch writes storages uncompressed; a compressed one could inflate ~1000x past the file's size
                raise ModelFormatError(f"pickle: storage {key!r} is compressed, which torch never writes")
            if info.file_size != int(numel) * stype.dtype.itemsize:
                raise ModelFormatError(
                    f"pickle: storage {key!r} holds {info.file_size} bytes, expected {numel} x {stype.dtype}")
            self.storages[key] = np.frombuffer(self.zf.read(name), dtype=stype.dtype)
        return self.storages[key]


MAX_PICKLE_BYTES = 256 << 20  # a state dict's data.pkl is metadata: ~100 bytes a tensor
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def _check_opcodes(data: bytes) -> None:
    """Raises ModelFormatError unless every opcode parses with its arguments present, every memo index is below
    the stream's length (a pickler numbers its memo entries 0, 1, ..., each costing bytes of stream) and every
    frame fits in what is left (module docstring)."""
    try:
        with warnings.catch_warnings():  # a text-protocol STRING's bad escape warns as it is decoded: structure only
            warnings.simplefilter("ignore", DeprecationWarning)
            for op, arg, pos in pickletools.genops(data):
                if op.name in _MEMO_PUTS and not (isinstance(arg, int) and 0 <= arg < len(data)):
                    raise ModelFormatError(f"pickle: memo index {arg} at byte {pos} is beyond the stream's "
                                           f"{len(data)} bytes")
                if op.name == "FRAME" and not (isinstance(arg, int) and arg <= len(data) - pos):
                    raise ModelFormatError(f"pickle: a frame of {arg} bytes at byte {pos} is longer than the "
                                           "stream")
    except ModelFormatError:
        raise
    except Exception as e:  # pickletools' errors on a malformed stream (ValueError and others)
        raise ModelFormatError(f"corrupt pickle: {type(e).__name__}: {e}") from e


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A torch zip-format state dict as {name: numpy array}, read without torch and without running code."""
    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"checkpoint not found: {p}")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFormatError(
            f"{p} is not a torch zip checkpoint ({e}); legacy non-zip torch files are not supported") from e
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise ModelFormatError(f"{p}: expected one data.pkl in the archive, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        try:
            size = zf.getinfo(pkls[0]).file_size
            if size > MAX_PICKLE_BYTES:
                raise ModelFormatError(f"its data.pkl is {size} bytes; a state dict's is well under "
                                       f"{MAX_PICKLE_BYTES >> 20} MiB")
            data = zf.read(pkls[0])
            _check_opcodes(data)
            obj = _Unpickler(io.BytesIO(data), zf, prefix).load()
        except ModelFormatError as e:
            raise ModelFormatError(f"{p}: {e}") from e
        except Exception as e:  # any malformed pickle stream
            raise ModelFormatError(f"{p}: corrupt pickle: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise ModelFormatError(f"{p}: expected a flat state dict of tensors")
    return dict(obj)
