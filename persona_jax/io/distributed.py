"""Multi-host conventions.

* `jax.distributed.initialize()` runs first when the config says `distributed=True`
  (`sharding.maybe_initialize_distributed`).
* Every process builds the same host inputs (tokenisation and sampling seeds are
  deterministic); `batching.place` copies to each process only the shards of its own
  devices, and `batching.to_host` all-gathers results so every process sees them.
* Only process 0 writes files (CSVs, JSON reports, vectors, plots, checkpoints other
  than Orbax's own multi-host protocol); the others compute the same values and skip
  the write. Every process then waits at a barrier until the write is done, because
  files are read by every process (a step reads the CSV or vector the step before
  wrote, and a resumed run reads the workdir): the workdir must be on a filesystem
  every host shares, and every process must call the same writers in the same order.
"""
from __future__ import annotations

import functools

import jax


def is_writer() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op on one process).

    Raises if the processes arrive at barriers of different names (diverged programs).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


_writing = 0  # depth of writer_only calls on this process (barrier at the outermost only)


def writer_only(fn):
    """Decorator: run `fn` on process 0 only (returns None elsewhere), then wait for it.

    On several processes every one of them calls `fn` (the program is the same) and
    waits at a barrier until process 0 has written, so a file can be read right after.
    """
    name = f"persona_jax.writer_only:{fn.__module__}.{fn.__qualname__}"

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        global _writing
        if _writing:  # inside another writer: only process 0 gets here
            return fn(*args, **kwargs)
        _writing += 1
        try:
            result = fn(*args, **kwargs) if is_writer() else None
        except Exception:
            barrier(name)  # the others go on (and fail reading the file) rather than hang
            raise
        finally:
            _writing -= 1
        barrier(name)
        return result

    return wrapped
