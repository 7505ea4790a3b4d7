"""One run per workdir at a time: a lock file naming the process that holds it.

Two runs on one workdir would both do all the work and overwrite each other's files. The
lock is `{workdir}/.persona_jax.lock`, created with O_EXCL and holding `pid@host`; it is
removed when the process exits. A lock whose process is gone (same host, pid not alive)
is stale, for example after a crash or a kill, and is taken over.
"""
from __future__ import annotations

import atexit
import os
import socket

from persona_jax.errors import PersonaError

LOCK_NAME = ".persona_jax.lock"
_held: set[str] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(path: str) -> tuple[int, str] | None:
    try:
        text = open(path).read().strip()
        pid, host = text.split("@", 1)
        return int(pid), host
    except (OSError, ValueError):
        return None


def acquire(workdir: str) -> str:
    """Take the workdir's lock for this process (a no-op when it already holds it).

    Raises PersonaError naming the other process when a live one holds it."""
    path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    if path in _held:
        return path
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is not None and owner[1] == socket.gethostname() and not _alive(owner[0]):
                os.unlink(path)  # stale: its process is gone
                continue
            who = f"process {owner[0]} on {owner[1]}" if owner else "another process"
            raise PersonaError(f"workdir {workdir} is in use by {who} (lock file {path}); wait for "
                               "it to finish, or delete the lock file if that run is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        _held.add(path)
        atexit.register(release, path)
        return path
    raise PersonaError(f"workdir {workdir}: could not take the lock file {path}")


def release(path: str) -> None:
    """Drop a lock this process holds (also run at exit)."""
    if path in _held:
        _held.discard(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
