"""Closed-loop control as data: `Monitor` (per-token projections), `Guard` (act when a
token's projection passes a ceiling), `Condition` (steer a request only if its prompt
projects past a threshold) and `whiten` (a direction that moves the residual stream less
where it varies most).

They run inside the continuous-batching engine's steps (`runtime/engine.py`), per slot,
as arrays: a guard's ceiling and coefficient and a condition's threshold are per-request
values, so a sweep over ceilings is one request stream of one compiled program.

Where they act, at hidden state l (row l of a persona vector: the embedding output for
l = 0, block l-1's output otherwise, after any `Steering` there):

* every position that produces a generated token: the prompt's last token in the
  prefill (token 0 is sampled from it), then the token fed at each decode step. Guards
  act there; the monitor reads there, after the guards, so row i of a generation's
  projections is the state token i was sampled from (what transformers'
  `generate(output_hidden_states=True)` returns per step). Hidden state L is read after
  the final norm (the HF convention), as `capture` reads it; a guard at L acts before it.
* a conditioned `Steering` acts on the decode steps only (from the second generated
  token's step on): whether it applies is known once the prompt has been read.

Projections are on the unit vector, h . v[l] / |v[l]| (METHOD.md 7).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.io.vectors import check_second_moment

ACTIONS = ("cap", "subtract")
DIRECTIONS = ("above", "below")
PROMPT_REDUCTIONS = ("prompt_last", "prompt_avg")


def _rows(vector, num_layers: int, hidden_size: int, what: str) -> np.ndarray:
    """A `PersonaVector`, [L+1, D] or [D] -> [L+1, D] float32, checked against the model."""
    v = np.asarray(getattr(vector, "array", vector), np.float32)
    if v.shape not in ((num_layers + 1, hidden_size), (hidden_size,)):
        raise PersonaError(f"{what} vector has shape {tuple(v.shape)} but this model needs "
                           f"({num_layers + 1}, {hidden_size}) or ({hidden_size},)")
    if not np.all(np.isfinite(v)):
        raise PersonaError(f"{what} vector contains NaN or inf")
    return np.broadcast_to(v, (num_layers + 1, hidden_size)) if v.ndim == 1 else v


def _layer(layer, num_layers: int, what: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) <= num_layers:
        raise PersonaError(f"{what} layer {layer!r} is outside 0..{num_layers} for this {num_layers}-layer model")
    return int(layer)


def _unit(row: np.ndarray, what: str) -> np.ndarray:
    n = float(np.linalg.norm(row))
    if n == 0:
        raise PersonaError(f"{what} vector is zero at its layer: its direction is undefined")
    return (row / n).astype(np.float32)


def _per_row(value, batch: int | None, what: str) -> np.ndarray:
    """A scalar or one value per input -> [batch] float32 (or [n] when batch is None)."""
    a = np.atleast_1d(np.asarray(value, np.float64)).astype(np.float32)
    if a.ndim != 1 or (batch is not None and a.size not in (1, batch)):
        raise PersonaError(f"{what} has {a.size} values for {batch} inputs; give one or one per input")
    return np.broadcast_to(a, (batch,)) if batch is not None and a.size == 1 else a


@dataclasses.dataclass
class Monitor:
    """Record each generated token's projection on `vector` at hidden states `layers`
    (default: every layer 0..L), and the prompt's `prompt_last` / `prompt_avg` ones.

    `generate(..., monitor=Monitor(v, [20]))` returns a `Generation` whose
    `projections[i]` is [new tokens of input i, len(layers)] and `prompt_projections` is
    {"prompt_last": [N, len(layers)], "prompt_avg": [N, len(layers)]}.
    """

    vector: np.ndarray
    layers: int | Sequence[int] | None = None

    def resolve(self, num_layers: int, hidden_size: int) -> tuple[tuple[int, ...], np.ndarray]:
        """(layers, unit directions [len(layers), D])."""
        v = _rows(self.vector, num_layers, hidden_size, "monitor")
        layers = range(num_layers + 1) if self.layers is None else np.atleast_1d(self.layers).tolist()
        layers = tuple(_layer(l, num_layers, "monitor") for l in layers)
        if not layers:
            raise PersonaError("a monitor needs at least one layer")
        return layers, np.stack([_unit(v[l], "monitor") for l in layers])


@dataclasses.dataclass
class Guard:
    """Act on a token whose projection on `vector` at hidden state `layer` exceeds `ceiling`.

    ceiling: one value, or one per input (`inf` = this input is not guarded), e.g. a
      percentile of the monitoring step's projections under the neutral condition.
    action: "cap" removes the excess along the unit vector, h <- h - max(0, h.v^ - ceiling) v^;
      "subtract" adds -coef * v[layer] at that step only.
    direction: optional [L+1, D] or [D] to act along instead of v (e.g. `whiten(v, sigma)`):
      "cap" then removes the same excess along v^ moving along it, h <- h - excess d / (d . v^),
      and "subtract" adds -coef * d[layer]; the trigger stays the projection on v.
    Several guards act in their order; each records, per generated token, whether it fired.
    """

    vector: np.ndarray
    layer: int
    ceiling: float | Sequence[float]
    action: str = "cap"
    coef: float | Sequence[float] = 1.0
    direction: np.ndarray | None = None

    def resolve(self, num_layers: int, hidden_size: int, batch: int) -> dict:
        """{layer, cap (bool), dir [D] unit (the trigger), vec [D] (subtracted), act [D] (the
        cap's step per unit of excess), ceiling [B], coef [B]}, checked."""
        if self.action not in ACTIONS:
            raise PersonaError(f"unknown guard action {self.action!r}; use one of: {', '.join(ACTIONS)}")
        v = _rows(self.vector, num_layers, hidden_size, "guard")
        layer = _layer(self.layer, num_layers, "guard")
        ceiling = _per_row(self.ceiling, batch, "guard ceiling")
        if np.any(np.isnan(ceiling)):
            raise PersonaError("guard ceiling is NaN; give a number (inf turns the guard off for an input)")
        coef = _per_row(self.coef, batch, "guard coefficient")
        if not np.all(np.isfinite(coef)):
            raise PersonaError("guard coefficient must be finite")
        u = _unit(v[layer], "guard")
        vec, act = v[layer], u
        if self.direction is not None:
            vec = _rows(self.direction, num_layers, hidden_size, "guard direction")[layer]
            along = float(vec @ u)
            if not along > 1e-12 * max(float(np.linalg.norm(vec)), 1e-30):
                raise PersonaError("a guard's direction must point along its vector (d . v > 0 at the guard's layer)")
            act = (vec / along).astype(np.float32)
        return {"layer": layer, "cap": self.action == "cap", "dir": u, "vec": vec, "act": act,
                "ceiling": ceiling, "coef": coef}


@dataclasses.dataclass
class Condition:
    """Steer a request only when its prompt's projection on `vector` at hidden state
    `layer` (reduction "prompt_last" or "prompt_avg") is above (or below) `threshold`
    (CAST-style conditional steering). Set it as `Steering(..., condition=...)`; the
    steering then acts on the decode steps of the requests whose prompts qualify."""

    vector: np.ndarray
    layer: int
    threshold: float | Sequence[float]
    direction: str = "above"
    reduction: str = "prompt_last"

    def resolve(self, num_layers: int, hidden_size: int, batch: int) -> dict:
        """{layer, dir [D] unit, threshold [B], sign (+1 above, -1 below), avg (bool)}."""
        if self.direction not in DIRECTIONS:
            raise PersonaError(f"unknown condition direction {self.direction!r}; use one of: {', '.join(DIRECTIONS)}")
        if self.reduction not in PROMPT_REDUCTIONS:
            raise PersonaError(f"unknown condition reduction {self.reduction!r}; use one of: "
                               f"{', '.join(PROMPT_REDUCTIONS)}")
        v = _rows(self.vector, num_layers, hidden_size, "condition")
        layer = _layer(self.layer, num_layers, "condition")
        threshold = _per_row(self.threshold, batch, "condition threshold")
        if np.any(np.isnan(threshold)):
            raise PersonaError("condition threshold is NaN")
        return {"layer": layer, "dir": _unit(v[layer], "condition"), "threshold": threshold,
                "sign": 1.0 if self.direction == "above" else -1.0, "avg": self.reduction == "prompt_avg"}


def calibrate(pos_projections, neg_projections, target: str = "f1", max_fpr: float = 0.05) -> dict:
    """The threshold that best separates prompts that should be steered (`pos`) from
    those that should not (`neg`), from their projections (e.g. `Generation.prompt_projections`).

    target "f1": the threshold of best F1 for "projection > threshold"; "fpr": the lowest
    threshold whose false-positive rate on `neg` is at most `max_fpr`.
    Returns {threshold, direction, f1, precision, recall, fpr}. When the pos projections
    lie lower than the neg ones, the direction is "below" (the rule is mirrored).
    """
    pos = np.asarray(pos_projections, np.float64).ravel()
    neg = np.asarray(neg_projections, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise PersonaError(f"calibration needs both classes; got {pos.size} positive and {neg.size} negative prompts")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise PersonaError("calibration projections contain NaN or inf")
    if target not in ("f1", "fpr"):
        raise PersonaError(f"unknown calibration target {target!r}; use f1 or fpr")
    sign = 1.0 if np.median(pos) >= np.median(neg) else -1.0
    p, n = sign * pos, sign * neg
    values = np.unique(np.concatenate([p, n]))
    # candidate thresholds: midpoints between neighbouring values, and below the smallest
    cands = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2]) if values.size > 1 else values - 1.0
    tp = (p[None, :] > cands[:, None]).sum(1)
    fp = (n[None, :] > cands[:, None]).sum(1)
    prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    rec = tp / p.size
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    fpr = fp / n.size
    if target == "f1":
        i = int(np.argmax(f1))
    else:
        ok = np.flatnonzero(fpr <= max_fpr)
        i = int(ok[np.argmin(cands[ok])])
    return {"threshold": float(sign * cands[i]), "direction": "above" if sign > 0 else "below",
            "f1": float(f1[i]), "precision": float(prec[i]), "recall": float(rec[i]), "fpr": float(fpr[i])}


def whiten(vector, second_moment, ridge: float = 1e-2) -> np.ndarray:
    """(Sigma + ridge * I)^-1 v, rescaled so its component along v equals |v|: a direction
    with the same effect along v that moves the residual stream less where it varies most.

    vector: [D] or [L+1, D] (or a `PersonaVector`); second_moment: [D, D], or
    [L+1, D, D] for an [L+1, D] vector (one per layer; `second_moment` computes them);
    ridge: lambda, relative to the mean eigenvalue (trace / D) of each Sigma.
    Returns float32 of the vector's shape (a zero row stays zero).
    """
    v = np.asarray(getattr(vector, "array", vector), np.float64)
    s = np.asarray(second_moment, np.float64)
    if v.ndim not in (1, 2):
        raise PersonaError(f"whiten takes a [D] or [L+1, D] vector; got shape {tuple(v.shape)}")
    rows = v[None] if v.ndim == 1 else v
    mats = s[None] if s.ndim == 2 else s
    d = rows.shape[-1]
    if mats.ndim != 3 or mats.shape[1:] != (d, d) or mats.shape[0] not in (1, rows.shape[0]):
        raise PersonaError(f"second-moment matrix has shape {tuple(s.shape)}; this vector needs ({d}, {d})"
                           + (f" or ({rows.shape[0]}, {d}, {d})" if v.ndim == 2 else ""))
    check_second_moment(mats)
    if not (np.isfinite(ridge) and ridge >= 0):
        raise PersonaError(f"ridge must be a finite number >= 0; got {ridge}")
    out = np.zeros_like(rows)
    for i, r in enumerate(rows):
        m = mats[i if mats.shape[0] > 1 else 0]
        lam = ridge * max(np.trace(m) / d, 1e-12)
        w = np.linalg.solve(m + lam * np.eye(d), r)
        along = float(w @ r)
        out[i] = 0.0 if not np.any(r) else w * (float(r @ r) / along)
    out = out.astype(np.float32)
    return out[0] if v.ndim == 1 else out


def as_guards(guard) -> list[Guard]:
    """None, one `Guard` or a sequence of them -> a list of `Guard`s (anything else: a
    PersonaError), as `spec.as_list` is for steerings."""
    guards = [] if guard is None else [guard] if isinstance(guard, Guard) else list(guard)
    for g in guards:
        if not isinstance(g, Guard):
            raise PersonaError(f"guard must be a pj.Guard or a list of them; got {type(g).__name__}")
    return guards


def guard_arrays(guards: Sequence[Guard], num_layers: int, hidden_size: int, batch: int) -> dict:
    """Interceptor rows for guards in a teacher-forced call (`steering.interceptor`; every
    row of the batch guarded alike, so each guard's ceiling and coefficient are one value):
    {grd_dir, grd_vec, grd_act [L+1, G, D], grd_ceil, grd_coef [L+1, G, B], grd_cap [L+1, G]}, the
    ceiling infinite off each guard's layer. Positions come from the call's `grd_pos`."""
    rs = [g.resolve(num_layers, hidden_size, 1) for g in guards]
    n, b = num_layers + 1, batch
    out = {"grd_dir": np.zeros((n, len(rs), hidden_size), np.float32),
           "grd_vec": np.zeros((n, len(rs), hidden_size), np.float32),
           "grd_act": np.zeros((n, len(rs), hidden_size), np.float32),
           "grd_ceil": np.full((n, len(rs), b), np.inf, np.float32),
           "grd_coef": np.zeros((n, len(rs), b), np.float32),
           "grd_cap": np.zeros((n, len(rs)), np.float32)}
    for g, r in enumerate(rs):
        if r["ceiling"].size != 1 or r["coef"].size != 1:
            raise PersonaError("a guard in a teacher-forced call takes one ceiling and one coefficient")
        l = r["layer"]
        out["grd_dir"][l, g], out["grd_vec"][l, g], out["grd_act"][l, g] = r["dir"], r["vec"], r["act"]
        out["grd_ceil"][l, g], out["grd_coef"][l, g] = r["ceiling"][0], r["coef"][0]
        out["grd_cap"][l, g] = float(r["cap"])
    return out
