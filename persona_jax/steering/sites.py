"""Intervention sites: the outputs of any Flax linen modules, chosen by class or by path.

A `Site` says which module calls an intervention reaches (`select`: a linen Module
class, a tuple of classes, or a module-path pattern) and which array of their return
value it acts on. The matching module instances, in the order the model first calls
them, are the site's rows: a `Steering` for a site of N instances has a vector
[N, D] and `layer` in 0..N-1, exactly as a persona vector's rows are hidden states.

Everything is the `nn.intercept_methods` mechanism and array data, nothing here knows a
particular model:

* row data lives in the `interventions` collection at each instance's scope, under the
  variable `"@" + site name`: a dict {add_vec [K, D], add_coef [K, B], abl_dir [J, D],
  abl_coef [J, B]} (`Layout.place` builds it from [N, ...] arrays; a module stacked by
  `nn.scan` gets its rows with a leading axis, so the scan must list "interventions" in
  `variable_axes`, and "intermediates" for capture);
* per-call data (position masks add_pos [K, B, ...], abl_pos [J, B, ...] and readout
  weights [R, B, ...] over the output's leading dims) is closed over by the interceptor;
* captured values are `sow`n into "intermediates" under the same variable name and
  gathered back into [N, ...] by `Layout.gather`.

At every matching call the interceptor ablates, then adds, then reads, so what is
captured is the steered output (what a PyTorch forward hook on that module would see).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.steering import interceptor as iv
from persona_jax.steering import spec as st
from persona_jax.steering.interceptor import CALL_KEYS, ROW_KEYS, Capture, variable_name



@dataclasses.dataclass(frozen=True)
class Site:
    """The outputs of the linen modules chosen by `select`.

    select: a linen Module class or a tuple of classes (isinstance), or a module path
      pattern: the module's path joined with "/" (`module.path`, e.g. "block_2/mlp" or
      "layers/mlp" for a module inside an `nn.scan` named "layers"), matched with
      fnmatch wildcards ("block_*/attn").
    output: when the method returns a tuple or list, the index of the element acted on
      (a block returning (h, cache) has output 0); other return values are acted on whole.
    method: the intercepted method.
    The acted-on array is [B, ..., D]: batch first, features last.
    """

    select: Any
    output: int = 0
    method: str = "__call__"

    def matches(self, module: nn.Module, method_name: str) -> bool:
        if method_name != self.method:
            return False
        if isinstance(self.select, str):
            return fnmatch.fnmatchcase("/".join(module.path), self.select)
        return isinstance(module, self.select)

    def get(self, out):
        return out[self.output] if isinstance(out, (tuple, list)) else out

    def put(self, out, h):
        if isinstance(out, (tuple, list)):
            return type(out)(h if i == self.output else o for i, o in enumerate(out))
        return h


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a site's rows live: (module path, count) entries in row order; count is
    None for a module called as itself, n for a module stacked n times by `nn.scan`.
    Hashable, so it can be closed over by a jitted function."""

    entries: tuple[tuple[tuple[str, ...], int | None], ...]

    @property
    def rows(self) -> int:
        return sum(1 if n is None else n for _, n in self.entries)

    def _spans(self):
        start = 0
        for path, n in self.entries:
            size = 1 if n is None else n
            yield path, n, start, start + size
            start += size

    def place(self, name: str, arrays: Mapping[str, Any]) -> dict:
        """Row arrays {key: [N, ...]} -> the nested `interventions` collection dict."""
        out: dict = {}
        for path, n, a, b in self._spans():
            node = out
            for p in path:
                node = node.setdefault(p, {})
            node[variable_name(name)] = {k: (v[a] if n is None else v[a:b]) for k, v in arrays.items()}
        return out

    def gather(self, name: str, intermediates: Mapping) -> jax.Array:
        """The values sown by the site's instances (first call of each) -> [N, ...]."""
        parts = []
        for path, n, _, _ in self._spans():
            node = intermediates
            try:
                for p in path:
                    node = node[p]
                value = node[variable_name(name)][0]
            except (KeyError, TypeError):
                raise PersonaError(f"site {name!r}: nothing was captured at module {'/'.join(path)}; "
                                   "was it called, and does an enclosing nn.scan list 'intermediates' "
                                   "in variable_axes?") from None
            parts.append(value[None] if n is None else value)
        return jnp.concatenate(parts, axis=0)


def merge(*trees: Mapping) -> dict:
    """Deep merge of nested dicts (collections of several sites)."""
    out: dict = {}
    for t in trees:
        for k, v in t.items():
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
                out[k] = merge(out[k], v)
            else:
                out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# Any linen model: find a site's instances, turn Steerings into arrays, apply.

_MARK = "@locate"


def locate(site: Site, model: nn.Module, variables, *args, **kwargs) -> Layout:
    """The site's instances in `model`, in the order of their first call, found by an
    abstract trace of `model.apply(variables, *args, **kwargs)` (nothing is computed).
    Modules inside `nn.scan` count once per scan step (the scan must list
    "intermediates" in variable_axes)."""
    paths: list[tuple[str, ...]] = []

    def spy(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        if site.matches(context.module, context.method_name):
            path = tuple(context.module.path)
            if path not in paths:
                paths.append(path)
            context.module.sow("intermediates", _MARK, jnp.zeros((), jnp.int8))
        return out

    def run(v):
        with nn.intercept_methods(spy):
            _, state = model.apply(v, *args, mutable=["intermediates"], **kwargs)
        return state.get("intermediates", {})

    marks = jax.eval_shape(run, variables)
    entries = []
    for path in paths:
        node = marks
        for p in path:
            node = node[p]
        shape = node[_MARK][0].shape
        if len(shape) > 1:
            raise PersonaError(f"module {'/'.join(path)} is stacked by nested scans {shape}; "
                               "sites support one level of nn.scan")
        entries.append((path, shape[0] if shape else None))
    if not entries:
        raise PersonaError(f"no module of {type(model).__name__} matches the site {site.select!r}")
    return Layout(tuple(entries))


def implied_batch(steerings, mask=None) -> int:
    """The batch a site's arrays need: the mask's rows, else the largest per-row
    coefficient count (or sweep length) of the steerings, else 1 (a [K, 1] coefficient
    broadcasts over any batch)."""
    if mask is not None:
        return int(np.shape(mask)[0])
    sizes = [len(s.rows_layers) if s.rows_layers is not None else np.size(s.coef) for s in steerings]
    return max(sizes + [1])


def site_arrays(steerings, layout: Layout | int, hidden_size: int | None = None, batch: int | None = None,
                mask=None, phase: st.Phase = "prefill") -> dict:
    """`Steering`s (vectors [N, D] with one row per site instance, or one direction [D]
    for `layer`) -> the arrays one site needs: row arrays {add_vec [N, K, D],
    add_coef [N, K, B], abl_dir, abl_coef} and, when `mask` ([B, T] 1 = real token) is
    given, per-call position masks {add_pos [K, B, T], abl_pos [J, B, T]} (see
    `spec.position_masks`). Without a mask every position is steered, which is what
    positions="all" means. hidden_size defaults to the vectors' width, batch to
    `implied_batch` (B = 1 when every coefficient is one number: it broadcasts)."""
    rows = layout.rows if isinstance(layout, Layout) else int(layout)
    steerings = [dataclasses.replace(s, site=None) for s in st.as_list(steerings)]  # the one site of the call
    if hidden_size is None:
        hidden_size = int(np.shape(steerings[0].vector)[-1]) if steerings else 0
    if batch is None:
        batch = implied_batch(steerings, mask)
    for s in steerings:
        s.validate(rows - 1, hidden_size, batch)
        if mask is None and s.positions != "all":
            raise PersonaError(f"steering positions {s.positions!r} need the attention mask of the call")
    out = st.steering_arrays(steerings, rows - 1, hidden_size, np.arange(batch), batch)
    if mask is not None:
        out.update(st.position_masks(steerings, phase, np.asarray(mask)))
    return out


def apply(model: nn.Module, variables, *args, sites: Mapping[str, Site], layouts: Mapping[str, Layout],
          interventions: Mapping[str, Mapping] | None = None, capture: Mapping[str, Capture] | None = None,
          **kwargs):
    """`model.apply(variables, *args, **kwargs)` with interventions at named sites.

    interventions: {site: `site_arrays(...)`} (row arrays [N, ...] placed with the site's
      layout, per-call masks closed over); capture: {site: "output" | "readout"}
      ("readout" needs a `readout` [R, B, ...] array in that site's interventions dict).
    Jittable (sites and layouts are static). Returns (model output, {site: captured
    [N, ...]}), the captured dict empty when nothing is captured.
    """
    interventions, capture = dict(interventions or {}), {k: v for k, v in (capture or {}).items() if v}
    unknown = [k for k in [*interventions, *capture] if k not in sites]
    if unknown:
        raise PersonaError(f"unknown sites {unknown}; these are defined: {list(sites)}")
    variables = dict(variables)
    calls, placed = {}, []
    for name, arrays in interventions.items():
        calls[name] = {k: v for k, v in arrays.items() if k in CALL_KEYS}
        rows = {k: v for k, v in arrays.items() if k in ROW_KEYS}
        if rows:
            placed.append(layouts[name].place(name, rows))
    if placed:
        variables["interventions"] = merge(variables.get("interventions", {}), *placed)
    with iv.active(sites, capture, calls):
        if capture:
            out, state = model.apply(variables, *args, mutable=["intermediates"], **kwargs)
        else:
            out, state = model.apply(variables, *args, **kwargs), {}
    captured = {name: layouts[name].gather(name, state["intermediates"]) for name in capture}
    return out, captured

