"""Closed-loop control in the engine's steps: the static `ControlSpec`, the device code
that guards and reads a hidden state between blocks (`at_hidden`), and `plan`, which
turns `Monitor` / `Guard` / conditioned `Steering`s (steering/control.py) into the
engine's arrays.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.steering import control as sc
from persona_jax.steering import interceptor as iv


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """The static part of closed-loop control (`steering/control.py`), part of the programs.

    monitor_layers: hidden states the monitor reads; guard_layers / guard_cap: each
    guard's hidden state and action (True = cap, False = subtract); cond_layers /
    cond_avg / cond_sign: each condition's hidden state, reduction (True = prompt_avg)
    and direction (+1 above, -1 below); add_cond / abl_cond: for each residual-stream
    add / ablate term of the steering arrays, the condition gating it (-1 = none).
    """

    monitor_layers: tuple[int, ...] = ()
    guard_layers: tuple[int, ...] = ()
    guard_cap: tuple[bool, ...] = ()
    cond_layers: tuple[int, ...] = ()
    cond_avg: tuple[bool, ...] = ()
    cond_sign: tuple[float, ...] = ()
    add_cond: tuple[int, ...] = ()
    abl_cond: tuple[int, ...] = ()

    def reads(self) -> tuple[int, ...]:
        """Every hidden state a monitor or condition reads."""
        return tuple(sorted(set(self.monitor_layers) | set(self.cond_layers)))


def at_hidden(l: int, h, ctl, cs: ControlSpec, outs: dict, final_norm=None):
    """Closed-loop control at hidden state l (h [B, T, D], after its steering): every
    guard of layer l acts on the last position (the one a token is sampled from), in
    order, then the monitor and conditions read every position (state L after the final
    norm, `final_norm`). Records into `outs`: fired {g: [B]}, read {l: [B, T] per
    direction}. Returns the new h."""
    for g, gl in enumerate(cs.guard_layers):
        if gl != l:
            continue
        last, fire = iv.guard_rule(h[:, -1:], ctl["grd_dir"][g], ctl["grd_vec"][g], ctl["grd_act"][g],
                                   ctl["grd_ceil"][g], ctl["grd_coef"][g], float(cs.guard_cap[g]))
        h = h.at[:, -1:].set(last)
        outs.setdefault("fired", {})[g] = fire[:, 0]
    if l in cs.reads():
        hr = (final_norm(h) if final_norm is not None else h).astype(jnp.float32)
        read = outs.setdefault("read", {})
        for i, ml in enumerate(cs.monitor_layers):
            if ml == l:
                read[("mon", i)] = hr @ ctl["mon_dir"][i].astype(jnp.float32)
        for i, cl in enumerate(cs.cond_layers):
            if cl == l:
                read[("cnd", i)] = hr @ ctl["cnd_dir"][i].astype(jnp.float32)
    return h


def records(cs: ControlSpec, outs: dict, b: int, t: int) -> dict:
    """`at_hidden`'s records stacked: fired [G, B], mon [M, B, T], cnd [C, B, T]."""
    read = outs.get("read", {})
    out = {"fired": jnp.stack([outs["fired"][g] for g in range(len(cs.guard_layers))])
           if cs.guard_layers else jnp.zeros((0, b), bool)}
    for key, n in (("mon", len(cs.monitor_layers)), ("cnd", len(cs.cond_layers))):
        out[key] = jnp.stack([read[(key, i)] for i in range(n)]) if n else jnp.zeros((0, b, t), jnp.float32)
    return out


@dataclasses.dataclass
class Plan:
    """The engine's control for one `generate` call: `spec` (static), `shared` unit
    directions {mon_dir [M, D], grd_dir, grd_vec, grd_act [G, D], cnd_dir [C, D]} and the
    per-input values (input order) that `rows` picks for a batch."""

    spec: ControlSpec
    shared: dict
    ceiling: np.ndarray  # [G, N]
    coef: np.ndarray  # [G, N]
    threshold: np.ndarray  # [C, N]

    def rows(self, rows: np.ndarray) -> dict:
        """{grd_ceil [G, B], grd_coef [G, B], cnd_thr [C, B]} for a batch whose row b is
        input rows[b] (-1 = padding: never guarded)."""
        rows = np.asarray(rows)
        real, idx = rows >= 0, np.maximum(rows, 0)
        pick = lambda a, fill: np.where(real[None], a[:, idx], fill).astype(np.float32)  # noqa: E731
        return {"grd_ceil": pick(self.ceiling, np.inf), "grd_coef": pick(self.coef, 0.0),
                "cnd_thr": pick(self.threshold, 0.0)}


def plan(monitor, guards, steerings, num_layers: int, hidden_size: int, n: int) -> Plan | None:
    """A `Plan` from a `Monitor` (or None), `Guard`s and the call's steerings (those with a
    `condition`), checked against the model; None when there is nothing to control."""
    guards = sc.as_guards(guards)
    if monitor is not None and not isinstance(monitor, sc.Monitor):
        raise PersonaError(f"monitor must be a pj.Monitor; got {type(monitor).__name__}")
    conditions = [s.condition for s in steerings if s.condition is not None]
    if monitor is None and not guards and not conditions:
        return None
    d = hidden_size
    m_layers, m_dirs = monitor.resolve(num_layers, d) if monitor is not None else ((), np.zeros((0, d), np.float32))
    gs = [g.resolve(num_layers, d, n) for g in guards]
    cs = [c.resolve(num_layers, d, n) for c in conditions]
    cond_of = {id(s): i for i, s in enumerate(s for s in steerings if s.condition is not None)}
    terms = lambda kind: tuple(cond_of.get(id(s), -1) for s in steerings  # noqa: E731
                               if s.site is None and s.kind == kind)
    spec = ControlSpec(monitor_layers=tuple(m_layers), guard_layers=tuple(g["layer"] for g in gs),
                       guard_cap=tuple(g["cap"] for g in gs), cond_layers=tuple(c["layer"] for c in cs),
                       cond_avg=tuple(c["avg"] for c in cs), cond_sign=tuple(c["sign"] for c in cs),
                       add_cond=terms("add"), abl_cond=terms("ablate"))
    stack = lambda xs, key, shape: np.stack([x[key] for x in xs]).astype(np.float32) if xs else np.zeros(shape, np.float32)  # noqa: E731
    shared = {"mon_dir": np.asarray(m_dirs, np.float32), "grd_dir": stack(gs, "dir", (0, d)),
              "grd_vec": stack(gs, "vec", (0, d)), "grd_act": stack(gs, "act", (0, d)),
              "cnd_dir": stack(cs, "dir", (0, d))}
    return Plan(spec, shared, stack(gs, "ceiling", (0, n)), stack(gs, "coef", (0, n)), stack(cs, "threshold", (0, n)))
