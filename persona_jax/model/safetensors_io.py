"""Checkpoint tensors through the `safetensors` package.

`safe_open(...).get_slice(name)[index]` reads only the bytes of the slice asked for, which
is what lets loading stream each device's shard straight into placement; `save_file`
writes. The one shim: importing `ml_dtypes` registers numpy's `bfloat16`, which the numpy
backend needs to return BF16 tensors.
"""
from __future__ import annotations

import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for the numpy backend)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as _save_file

from persona_jax.errors import PersonaError


class SafetensorsFile:
    """The tensors of one `.safetensors` file, read lazily.

    `file[name]` reads a whole tensor; `file.read(name, index, transpose)` reads one slice.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = safe_open(path, framework="np")
        except (OSError, SafetensorError, ValueError) as e:
            reason = "it is truncated" if "incomplete" in str(e).lower() else str(e)
            raise PersonaError(f"{path} is not a valid safetensors file ({reason}); re-download or re-save it") from None
        self._keys = set(self._file.keys())

    def keys(self):
        return self._keys

    def __contains__(self, name):
        return name in self._keys

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def read(self, name, index=None, transpose: bool = False) -> np.ndarray:
        """One tensor, or the slice `index` (a tuple of slices) of it.

        transpose: `index` addresses the transposed (2-D) tensor; the slice read from disk
        is the transposed index, and the result is transposed back.
        """
        sl = self._file.get_slice(name)
        if index is None:
            index = tuple(slice(None) for _ in sl.get_shape())
        index = tuple(index)
        try:
            if transpose:
                return np.asarray(sl[index[::-1]]).T
            return np.asarray(sl[index])
        except (SafetensorError, TypeError, ValueError) as e:
            raise PersonaError(f"{self.path}: tensor {name} could not be read ({e}); re-download it") from None

    def __getitem__(self, name) -> np.ndarray:
        return self.read(name)


def save_file(tensors: dict[str, np.ndarray], path: str):
    """Write numpy arrays as a safetensors file (atomic: temp file, then rename)."""
    tmp = path + ".tmp"
    # ascontiguousarray makes a 0-d array 1-d: keep scalars (xIELU buffers) scalar
    _save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
