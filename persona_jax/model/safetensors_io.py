"""A lazy safetensors reader over `np.memmap`: tensors are views, read only when sliced.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw
bytes) so bfloat16 works with numpy (via ml_dtypes) and so a tensor slice touches only
the pages it needs: this is what lets loading stream straight into device placement.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from persona_jax.errors import PersonaError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """Tensors of one `.safetensors` file as lazy numpy views (`file[name]`)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length out of range")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise PersonaError(f"{path} is not a valid safetensors file ({e}); re-download or re-save it") from None
        header.pop("__metadata__", None)
        self._entries = header
        self._base = 8 + n
        self._size = size
        self._mm = None

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name):
        return name in self._entries

    def __getitem__(self, name) -> np.ndarray:
        e = self._entries[name]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise PersonaError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
        if self._base + end > self._size:
            raise PersonaError(f"{self.path} is truncated (tensor {name} runs past the end); re-download it")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self._base + start:self._base + end]
        return raw.view(dtype).reshape(e["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str):
    """Write numpy arrays as a safetensors file (atomic: temp file, then rename)."""
    names = {v: k for k, v in _DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        blob = arr.tobytes()
        header[name] = {"dtype": names[arr.dtype.type], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
