"""Multi-host conventions.

* `jax.distributed.initialize()` runs first when the config says `distributed=True`
  (`sharding.maybe_initialize_distributed`).
* Every process builds the same host inputs (tokenisation and sampling seeds are
  deterministic); `batching.place` copies to each process only the shards of its own
  devices, and `batching.to_host` all-gathers results so every process sees them.
* Only process 0 writes files (CSVs, JSON reports, vectors, plots, checkpoints other
  than Orbax's own multi-host protocol); the others compute the same values and skip
  the write. Files are read by every process, so the workdir must be on a shared
  filesystem for a resumed multi-host run.
"""
from __future__ import annotations

import functools

import jax


def is_writer() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


def writer_only(fn):
    """Decorator: run `fn` on process 0 only (returns None elsewhere)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if is_writer():
            return fn(*args, **kwargs)
        return None

    return wrapped
