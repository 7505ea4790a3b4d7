"""Count the XLA programs a piece of code compiles (or loads from the persistent cache).

JAX reports every program it hands to the backend as a `/jax/core/compile/backend_compile_duration`
event (named by the jitted function), whether XLA compiles it or the persistent
compilation cache supplies it; a cache hit is preceded by a `/jax/compilation_cache/cache_hits`
event. An executable `executable_store` loads whole is reported by its own event. `counting()` listens to both, so a benchmark or test can say how many programs a
call needed and which ones were compiled rather than loaded.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading

from jax import monitoring

_COMPILE = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
STORED_EVENT = "/persona_jax/executable_store/loaded"  # `executable_store`: loaded, neither traced nor compiled


@dataclasses.dataclass
class Count:
    """programs: {jitted function name: programs obtained}; loaded: how many of them came
    from the persistent cache; seconds: backend time (compile or load) in all."""

    programs: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    loaded: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.programs.values())

    @property
    def compiled(self) -> int:
        """Programs XLA compiled (not loaded from disk)."""
        return self.total - self.loaded

    def summary(self) -> dict:
        return {"programs": self.total, "compiled": self.compiled, "loaded": self.loaded,
                "backend_s": round(self.seconds, 3), "by_name": dict(sorted(self.programs.items()))}


_active: list[Count] = []
_lock = threading.Lock()
_registered = False


def _on_duration(name, secs, **kw):
    if name != _COMPILE:
        return
    fun = str(kw.get("fun_name", "?")).removeprefix("jit(").removesuffix(")")
    with _lock:
        for c in _active:
            c.programs[fun] += 1
            c.seconds += secs


def _on_event(name, **kw):
    if name == _HIT:
        with _lock:
            for c in _active:
                c.loaded += 1
    elif name == STORED_EVENT:
        with _lock:
            for c in _active:
                c.programs[str(kw.get("fun_name", "?"))] += 1
                c.loaded += 1


@contextlib.contextmanager
def counting():
    """`with counting() as c: ...` -> c.total programs obtained inside the block, c.compiled,
    c.loaded, c.programs by function name. Blocks may nest."""
    global _registered
    with _lock:
        if not _registered:  # listeners cannot be removed one by one: register once, dispatch here
            monitoring.register_event_duration_secs_listener(_on_duration)
            monitoring.register_event_listener(_on_event)
            _registered = True
        c = Count()
        _active.append(c)
    try:
        yield c
    finally:
        with _lock:
            _active.remove(c)
