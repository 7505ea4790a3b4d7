"""Compiled programs kept on disk and loaded without tracing (issue 25).

JAX's persistent compilation cache skips XLA's compile in a later process, but not the
Python trace and the lowering that compute its key. For the engine's unrolled decoder
those are most of what a fresh process's first `generate` call spends beyond a warm one
(benchmarks/engine_cold.py's model: 1.4 s of tracing and 0.6 s of lowering for its 6
programs, in a profile); loaded whole, that first call went from 1.40x to 1.14x the warm one.

`stored_jit` is `jax.jit` for a module-level function. The first call of a new
key lowers and compiles it (the compilation cache still applies) and writes the
executable to the store; a later process with the same key loads it and calls it
directly. The key holds everything the traced program is a function of:

* the function's name and static arguments (their repr: frozen dataclasses, ints);
* the pytree structure, shape, dtype, weak type and sharding of every dynamic argument;
* the source of every `persona_jax` module, the versions of Python, jax, jaxlib, flax
  and numpy, the backend and its devices, `XLA_FLAGS`, and JAX's configuration.

So a program is never loaded for code, arguments or settings other than its own; a key
that cannot be told apart from another by these is traced as before. Used only where
every argument lives on one device of a single-process run (the multi-device programs
keep JAX's own cache). The folder is `executables/` inside the compilation cache's
(`compile_cache.enable`), and is off with it. Like any cache of programs it must be
trusted: loading an executable runs what it holds (JAX's `serialize_executable`).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import inspect
import os
import pickle
import sys
import threading

import jax
import numpy as np

from persona_jax.runtime import compile_count

_FORMAT = 1
_MEMORY = 64  # executables kept in this process (each maps memory; see clear())

_dir = ""
_lock = threading.Lock()
_loaded: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
_source_hash: str | None = None
# the settings a trace reads that a change mid-process must not reuse a program across
_TRACE_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                "jax_threefry_partitionable", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion")


def set_dir(path: str) -> None:
    """Store executables in `path` ("" = off). Called by `compile_cache.enable`."""
    global _dir
    _dir = path
    if path:
        os.makedirs(path, exist_ok=True)


def clear() -> None:
    """Drop this process's loaded executables (the files stay). `jax.clear_caches()` calls it."""
    with _lock:
        _loaded.clear()


class _Registered:  # JAX's cache registry wants cache_clear / cache_info / cache_keys
    cache_clear = staticmethod(clear)

    @staticmethod
    def cache_info():
        return len(_loaded)

    @staticmethod
    def cache_keys():
        return list(_loaded)


_REGISTERED = _Registered()
try:  # so that jax.clear_caches() (tests, users freeing memory) drops these too
    from jax._src import util as _jax_util
    _jax_util.register_cache(_REGISTERED, "persona_jax executable store")
except (ImportError, AttributeError):  # a JAX without the registry: clear() by hand
    pass


def _package_source() -> str:
    global _source_hash
    if _source_hash is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        h = hashlib.sha256()
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    p = os.path.join(dirpath, f)
                    h.update(os.path.relpath(p, root).encode())
                    with open(p, "rb") as fh:
                        h.update(hashlib.sha256(fh.read()).digest())
        _source_hash = h.hexdigest()
    return _source_hash


def _environment(device) -> str:
    import flax
    import jaxlib
    config = sorted((k, repr(v)) for k, v in jax.config.values.items())
    return repr((_FORMAT, sys.version, jax.__version__, jaxlib.__version__, flax.__version__, np.__version__,
                 device.platform, device.device_kind, device.client.platform_version, jax.device_count(),
                 jax.process_count(), os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""),
                 config, _package_source()))


def _leaf_key(x):
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, x.weak_type, x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
        return ("host", x.shape, x.dtype)
    return ("py", type(x).__name__)  # a Python scalar: weakly typed, by its type


def _device(leaves):
    """The one device every array argument lives on, or None (several devices or processes,
    or abstract arguments: then the plain `jax.jit` runs)."""
    if jax.process_count() != 1:
        return None
    devices = set()
    for x in leaves:
        if isinstance(x, jax.core.Tracer):  # called inside the caller's own jit / vmap / grad
            return None
        if isinstance(x, jax.Array):
            devices |= x.sharding.device_set
            if len(devices) > 1:
                return None
    return next(iter(devices)) if devices else jax.devices()[0]


class Stored:
    """`jitted` (a `jax.jit` function), its executables kept in the store: called as
    `jitted` is; `.lower` is `jitted.lower`."""

    def __init__(self, jitted, name: str, static_argnums=(), static_argnames=()):
        self.jitted, self.name = jitted, name
        self.static_argnums, self.static_argnames = tuple(static_argnums), tuple(static_argnames)
        self.lower = jitted.lower

    def __call__(self, *args, **kwargs):
        if not _dir:
            return self.jitted(*args, **kwargs)
        static = (tuple(args[i] for i in self.static_argnums if i < len(args)),
                  tuple((k, kwargs[k]) for k in self.static_argnames if k in kwargs))
        dyn_args = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        leaves, treedef = jax.tree.flatten((dyn_args, dyn_kwargs))
        device = _device(leaves)
        if device is None:
            return self.jitted(*args, **kwargs)
        flags = tuple(getattr(jax.config, f, None) for f in _TRACE_FLAGS)
        key = (self.name, static, treedef, tuple(map(_leaf_key, leaves)), flags)
        with _lock:
            exe = _loaded.get(key)
            if exe is not None:
                _loaded.move_to_end(key)
        if exe is None:
            exe = self._obtain(key, device, args, kwargs)
            with _lock:
                _loaded[key] = exe
                while len(_loaded) > _MEMORY:
                    _loaded.popitem(last=False)
        return exe(*dyn_args, **dyn_kwargs)

    def _obtain(self, key, device, args, kwargs):
        """The executable for `key`: from the store's file, else lowered and compiled, and
        written to the store when XLA compiled it here (not when JAX's persistent cache
        supplied it: then a later process traces it again, as without the store)."""
        from jax.experimental import serialize_executable as se
        name, static, treedef, leaf_keys, _ = key
        text = repr((name, static, str(treedef), [(k[:3] + (repr(k[3]),)) if len(k) == 4 else k for k in leaf_keys],
                     _environment(device)))
        path = os.path.join(_dir, hashlib.sha256(text.encode()).hexdigest() + ".exe")
        try:
            with open(path, "rb") as f:
                fmt, stored_text, blob, in_tree, out_tree = pickle.load(f)
            if fmt == _FORMAT and stored_text == text:
                exe = se.deserialize_and_load(blob, in_tree, out_tree, backend=device.client,
                                              execution_devices=[device])
                jax.monitoring.record_event(compile_count.STORED_EVENT, fun_name=name)
                return exe
        except Exception:  # noqa: BLE001 — absent, cut short or from another build: compile it
            pass
        with compile_count.counting() as obtained:
            exe = self.jitted.lower(*args, **kwargs).compile()
        if obtained.loaded:  # JAX's cache supplied it: XLA:CPU cannot serialize such an
            return exe  # executable again (a later load fails: "Function ... not found")
        try:
            blob, in_tree, out_tree = se.serialize(exe)
            from persona_jax.io.atomic import atomic_open
            with atomic_open(path, "wb") as f:
                pickle.dump((_FORMAT, text, blob, in_tree, out_tree), f, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 — a backend or program that cannot be serialized: not stored
            pass
        return exe


def stored_jit(fun=None, *, static_argnames=(), donate_argnames=()):
    """`jax.jit(fun, static_argnames=..., donate_argnames=...)` with its executables kept in
    the store (`Stored`), as a function with the jitted one's `.lower`; a decorator, bare
    or with arguments."""
    if fun is None:
        return functools.partial(stored_jit, static_argnames=static_argnames, donate_argnames=donate_argnames)
    positional = [n for n, p in inspect.signature(fun).parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    nums = tuple(positional.index(n) for n in static_argnames if n in positional)
    jitted = jax.jit(fun, static_argnames=static_argnames, donate_argnames=donate_argnames)
    store = Stored(jitted, fun.__name__, nums, static_argnames)

    @functools.wraps(fun)  # a function, so that it reads (and is documented) as `fun` does
    def call(*args, **kwargs):
        return store(*args, **kwargs)
    call.lower = jitted.lower
    return call
