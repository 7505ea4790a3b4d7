"""Reports and small files of the runners, written atomically by process 0 only
(`persona_jax.io.distributed.writer_only`)."""
from __future__ import annotations

import json
import os

import numpy as np

from persona_jax.io.atomic import atomic_open
from persona_jax.io.distributed import writer_only


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


@writer_only
def write_json(path: str | os.PathLike, data) -> str:
    """`data` as indented JSON (numpy scalars and arrays as numbers and lists)."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, default=_jsonable)
    return os.fspath(path)


@writer_only
def write_text(path: str | os.PathLike, text: str) -> str:
    with atomic_open(path) as f:
        f.write(text)
    return os.fspath(path)
