"""Padding, length buckets and batch placement shared by every batched runner."""
from __future__ import annotations

import jax
import numpy as np

from persona_jax.model import sharding as sh


def bucket(n: int, minimum: int = 16) -> int:
    """Padded length for n tokens: powers of two up to 512, then multiples of 256, so a
    run compiles a handful of shapes rather than one per batch."""
    n = max(n, minimum)
    if n <= 512:
        return 1 << (n - 1).bit_length()
    return -(-n // 256) * 256


def batch_multiple(mesh) -> int:
    return 1 if mesh is None else mesh.shape["data"]


def pad_rows(seqs: list[list[int]], length: int, pad_id: int, left: bool):
    """Pad token lists to [B, length] (int32) with a matching 0/1 mask."""
    b = len(seqs)
    tokens = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, s in enumerate(seqs):
        n = len(s)
        if left:
            tokens[i, length - n:] = s
            mask[i, length - n:] = 1
        else:
            tokens[i, :n] = s
            mask[i, :n] = 1
    return tokens, mask


def place(mesh, *arrays, batch_axis: int = 0):
    """Put host arrays on device, batch split over the mesh's data axis.

    Every process holds the same host batch (inputs are made deterministically on every
    host); each one copies only the shards its own devices hold, so this is also the
    multi-host path (`jax.make_array_from_callback` builds the global array).
    """
    if mesh is None:
        out = tuple(jax.device_put(a) for a in arrays)
    else:
        out = tuple(jax.make_array_from_callback(np.shape(a), sh.data_sharding(mesh, np.ndim(a), batch_axis),
                                                 lambda idx, a=a: np.asarray(a)[idx]) for a in arrays)
    return out if len(out) > 1 else out[0]


def to_host(x) -> np.ndarray:
    """A (possibly multi-host) global array as one numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def grow_batch(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def by_length(lengths, batch_size: int, mesh, longest_first: bool = False) -> tuple[int, list[np.ndarray]]:
    """Sort rows by length and cut them into batches (sort -> pad -> place -> unsort).

    lengths: [N] token counts. The batch size is `batch_size` (at most N) grown to a
    multiple of the mesh's data axis, so every batch has the same row count Bp.
    Returns (Bp, batches): each batch an int array [Bp] of row indices in length order,
    padded with -1 for rows that only fill it. Callers write each result back to its
    row index, which undoes the sort.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths if longest_first else lengths, kind="stable")
    bs = grow_batch(min(batch_size, len(order)), batch_multiple(mesh))
    batches = []
    for start in range(0, len(order), bs):
        rows = np.full(bs, -1)
        chunk = order[start:start + bs]
        rows[: len(chunk)] = chunk
        batches.append(rows)
    return bs, batches


def batch_seqs(seqs, rows: np.ndarray, filler=(0,)) -> list:
    """The sequences of one `by_length` batch; padding rows (-1) get `filler`."""
    return [seqs[r] if r >= 0 else list(filler) for r in rows]
