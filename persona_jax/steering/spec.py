"""`Steering`: what to add to (or ablate from) the residual stream, as data.

A `Steering` becomes intervention arrays (see `persona_jax.steering.interceptor`):
`add_vec`/`abl_dir` [L+1, K, D], `add_coef`/`abl_coef` [L+1, K, B] and per-call position
masks [K, B, T]. Coefficients and layers are array values, so a layer x coefficient
sweep is one batch of one compiled program.

Position modes (METHOD.md 6, the reference's meaning):
  all      every position of every forward call (prefill and each decode step);
  prompt   every position of the prefill call, nothing while decoding;
  response the last position of every forward call: the last prompt token in prefill
           (the last real token of each row, whatever the padding), then every new token.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from persona_jax.errors import PersonaError

POSITIONS = ("all", "prompt", "response")
KINDS = ("add", "ablate")
Phase = Literal["prefill", "decode", "train"]


@dataclasses.dataclass
class Steering:
    """Steer with `vector` [L+1, D] (a persona vector, one row per hidden state), a
    `PersonaVector`, or one direction [D] used at whichever layer(s) `layer` names.

    layer: hidden-state index l in 0..L (adds to block l-1's output; 0 = embeddings), or a
      sequence of them for multi-layer steering (every listed layer, every row).
    coef: one coefficient, or one per batch row. For `ablate`, the strength (1 = remove
      the projection on v[l]/|v[l]| entirely).
    rows_layers: optional per-row layer (a sweep: row b steers layer rows_layers[b]
      with coef[b]); overrides `layer`. Build it with `Steering.sweep`.
    site: None = the residual stream (the rows above); or the name of another site of the
      model, whose instances are then the rows (our decoder: "attn" and "mlp", the
      attention and MLP outputs, [L] rows, row i = block i; see `persona_jax.steering.sites`
      for any linen model).
    condition: a `Condition` (`persona_jax.steering.control`): in `generate`, the
      steering then acts on the decode steps of the requests whose prompt projection
      passes the condition's threshold, and on nothing else (residual stream only).
    """

    vector: np.ndarray
    layer: int | Sequence[int] = 0
    coef: float | Sequence[float] = 1.0
    positions: str = "all"
    kind: str = "add"
    rows_layers: Sequence[int] | None = None
    site: str | None = None
    condition: object = None  # a `steering.control.Condition`: steer only requests whose prompt qualifies

    def __post_init__(self):
        self.vector = getattr(self.vector, "array", self.vector)  # a PersonaVector steers as its array

    def rows(self, num_layers: int) -> np.ndarray:
        """The vector as [L+1, D] float32: a [D] direction is repeated on every row (only
        the rows of steered layers have a non-zero coefficient, so this is the same as
        placing it at `layer`)."""
        v = np.asarray(self.vector, np.float32)
        return np.broadcast_to(v, (num_layers + 1, v.shape[0])) if v.ndim == 1 else v

    @classmethod
    def grid(cls, vector, layers: Sequence[int], coefs: Sequence[float], positions="all", kind="add"):
        """Every (layer, coef) of `layers` x `coefs` over a list of prompts, as a
        `SteeringGrid`: `pj.generate(model, prompts, n, steering=grid)` runs every cell on
        every prompt in one batched call and returns a pandas DataFrame with columns
        layer, coef, prompt (its index), input and text, one row per (cell, prompt).
        `vector`: [L+1, D], a `PersonaVector` or a [D] direction."""
        from persona_jax.steering.grid import SteeringGrid
        return SteeringGrid(vector, tuple(int(l) for l in layers), tuple(float(c) for c in coefs), positions, kind)

    @classmethod
    def sweep(cls, vector, layers: Sequence[int], coefs: Sequence[float], positions="all", kind="add"):
        """One row per (layer, coef) pair: `layers[b]`, `coefs[b]` for row b."""
        if len(layers) != len(coefs):
            raise PersonaError(f"a sweep needs one layer per coefficient; got {len(layers)} layers and {len(coefs)} coefficients")
        return cls(vector, layer=0, coef=list(coefs), positions=positions, kind=kind, rows_layers=list(layers))

    def validate(self, num_layers: int, hidden_size: int, batch: int | None = None):
        v = np.asarray(self.vector)
        if v.shape not in ((num_layers + 1, hidden_size), (hidden_size,)):
            raise PersonaError(
                f"steering vector has shape {tuple(v.shape)} but this model needs ({num_layers + 1}, {hidden_size}) "
                f"(one row per hidden state, layers+1 rows) or ({hidden_size},) (one direction for `layer`)")
        v = self.rows(num_layers)
        if not np.all(np.isfinite(v)):
            raise PersonaError("steering vector contains NaN or inf")
        layers = self.rows_layers if self.rows_layers is not None else np.atleast_1d(self.layer)
        for l in layers:
            if not (0 <= int(l) <= num_layers):
                raise PersonaError(f"steering layer {l} is outside 0..{num_layers} for this {num_layers}-layer model")
        if self.positions not in POSITIONS:
            raise PersonaError(f"unknown steering positions {self.positions!r}; use one of: {', '.join(POSITIONS)}")
        if self.kind not in KINDS:
            raise PersonaError(f"unknown steering kind {self.kind!r}; use one of: {', '.join(KINDS)}")
        if self.condition is not None:
            from persona_jax.steering.control import Condition
            if not isinstance(self.condition, Condition):
                raise PersonaError(f"Steering.condition must be a pj.Condition; got {type(self.condition).__name__}")
            if self.site is not None:
                raise PersonaError("a conditioned Steering acts on the residual stream only (site None)")
        if self.kind == "ablate" and np.any(np.linalg.norm(v[np.atleast_1d(layers).astype(int)], axis=-1) == 0):
            raise PersonaError("cannot ablate a zero vector: its direction is undefined")
        coef = np.atleast_1d(np.asarray(self.coef, np.float32))
        if batch is not None and coef.size not in (1, batch):
            raise PersonaError(f"steering has {coef.size} per-row coefficients for a batch of {batch} inputs")
        if self.rows_layers is not None and batch is not None and len(self.rows_layers) != batch:
            raise PersonaError(f"a sweep steering has {len(self.rows_layers)} rows for a batch of {batch} inputs")

    def coef_matrix(self, num_layers: int, batch: int) -> np.ndarray:
        """[L+1, B] coefficient of every hidden state for every row (input order)."""
        coef = np.atleast_1d(np.asarray(self.coef, np.float32))
        coef = np.broadcast_to(coef, (batch,)) if coef.size == 1 else coef
        m = np.zeros((num_layers + 1, batch), np.float32)
        if self.rows_layers is not None:
            m[np.asarray(self.rows_layers, int), np.arange(batch)] = coef
        else:
            m[np.atleast_1d(self.layer).astype(int)] = coef
        return m


def as_list(steering) -> list[Steering]:
    if steering is None:
        return []
    return [steering] if isinstance(steering, Steering) else list(steering)


def site_counts(steerings: Sequence[Steering], site_rows: dict | None, num_layers: int) -> dict:
    """{site: row count} of the sites the steerings use (None = the residual stream,
    num_layers + 1 rows); an unknown site is a PersonaError that lists the known ones."""
    known = {None: num_layers + 1, **{k: v for k, v in (site_rows or {}).items() if k is not None}}
    for s in steerings:
        if s.site not in known:
            names = ", ".join(repr(k) for k in known if k is not None) or "none besides the residual stream"
            raise PersonaError(f"steering site {s.site!r} is not a site of this model; it has: None "
                               f"(the residual stream), {names}")
    return known


def validate_all(steerings: Sequence[Steering], num_layers: int, hidden_size: int, batch: int | None = None,
                 site_rows: dict | None = None):
    """`Steering.validate` for each, against the rows of its own site."""
    known = site_counts(steerings, site_rows, num_layers)
    for s in steerings:
        s.validate(known[s.site] - 1, hidden_size, batch)


def steering_arrays(steerings: Sequence[Steering], num_layers: int, hidden_size: int,
                    rows: np.ndarray, batch: int, site_rows: dict | None = None,
                    conditions_ok: bool = False) -> dict:
    """Intervention arrays for a batch whose row b is input `rows[b]` (-1 = padding row).

    Returns {add_vec [L+1,K,D], add_coef [L+1,K,B], abl_dir, abl_coef} (only the kinds
    present) for the residual stream, and under the key of each other site used
    (`Steering.site`, with its row count N in `site_rows`) the same dict of [N, ...]
    arrays; position masks are built per call by `position_masks`. A conditioned steering
    (`Steering.condition`) is refused unless `conditions_ok` (the engine gates its terms).
    """
    if not conditions_ok and any(s.condition is not None for s in steerings):
        raise PersonaError("a conditioned Steering (Steering.condition) acts only in pj.generate, where the "
                           "prompt is read before the response; capture, forward and training cannot apply it")
    known = site_counts(steerings, site_rows, num_layers)
    out = _site_arrays([s for s in steerings if s.site is None], num_layers, rows, batch)
    for site in dict.fromkeys(s.site for s in steerings if s.site is not None):
        out[site] = _site_arrays([s for s in steerings if s.site == site], known[site] - 1, rows, batch)
    return out


def _site_arrays(steerings: Sequence[Steering], num_layers: int, rows: np.ndarray, batch: int) -> dict:
    out = {}
    real = rows >= 0
    for kind, vec_key, coef_key in (("add", "add_vec", "add_coef"), ("ablate", "abl_dir", "abl_coef")):
        terms = [s for s in steerings if s.kind == kind]
        if not terms:
            continue
        vecs, coefs = [], []
        for s in terms:
            v = s.rows(num_layers)
            if kind == "ablate":
                norms = np.linalg.norm(v, axis=-1, keepdims=True)
                v = v / np.where(norms == 0, 1, norms)
            per_row = np.size(s.coef) > 1 or s.rows_layers is not None
            full = s.coef_matrix(num_layers, np.size(s.coef) if per_row else 1)  # [L+1, n]
            m = np.zeros((num_layers + 1, batch), np.float32)
            m[:, real] = full[:, rows[real]] if per_row else full[:, :1]
            vecs.append(v)
            coefs.append(m)
        out[vec_key] = np.stack(vecs, axis=1)
        out[coef_key] = np.stack(coefs, axis=1)
    return out


def position_masks(steerings: Sequence[Steering], phase: Phase, attention_mask: np.ndarray) -> dict:
    """Per-call position masks {add_pos [K,B,T], abl_pos [J,B,T]} for one forward call.

    attention_mask: [B, T] of this call's tokens (1 = real). In `prefill` (and `train`,
    a teacher-forced forward), `response` marks each row's last real token; in `decode`
    (T = 1) every new token. Steerings of another site (`Steering.site`) get their
    masks under that site's key.
    """
    out = _position_masks([s for s in steerings if s.site is None], phase, attention_mask)
    for site in dict.fromkeys(s.site for s in steerings if s.site is not None):
        out[site] = _position_masks([s for s in steerings if s.site == site], phase, attention_mask)
    return out


def _position_masks(steerings: Sequence[Steering], phase: Phase, attention_mask: np.ndarray) -> dict:
    b, t = attention_mask.shape
    last = np.zeros((b, t), np.float32)
    has = attention_mask.sum(1) > 0
    idx = t - 1 - np.argmax(attention_mask[:, ::-1], axis=1)
    last[np.arange(b)[has], idx[has]] = 1.0
    out = {}
    for kind, key in (("add", "add_pos"), ("ablate", "abl_pos")):
        masks = []
        for s in steerings:
            if s.kind != kind:
                continue
            if s.positions == "all":
                m = np.ones((b, t), np.float32)
            elif s.positions == "prompt":
                m = np.zeros((b, t), np.float32) if phase == "decode" else np.ones((b, t), np.float32)
            else:  # response
                m = np.ones((b, t), np.float32) if phase == "decode" else last
            masks.append(m)
        if masks:
            out[key] = np.stack(masks)
    return out


# ---------------------------------------------------------------------------------------
# Steering across layers (the paper's appendix J.3, J.4).

def every_layer(num_layers: int, first: int = 1) -> list[int]:
    """Hidden-state indices first..L (1 = the output of the first block)."""
    return list(range(int(first), int(num_layers) + 1))


def incremental_vectors(vector, layers: Sequence[int]) -> np.ndarray:
    """[L+1, D] whose row l, for every l in `layers`, is v[l] - v[l-1] (v[0] for l = 0),
    and zero elsewhere. Added at every layer 1..l, the increments sum to v[l] - v[0], so
    the residual stream carries (about) the persona vector of its own layer at each depth."""
    v = np.asarray(vector, np.float32)
    if v.ndim != 2:
        raise PersonaError(f"a persona vector has shape [layers+1, hidden]; got {tuple(v.shape)}")
    out = np.zeros_like(v)
    for l in layers:
        l = int(l)
        if not 0 <= l < v.shape[0]:
            raise PersonaError(f"steering layer {l} is outside 0..{v.shape[0] - 1} for this vector")
        out[l] = v[l] - (v[l - 1] if l > 0 else 0.0)
    return out


def incremental_steering(vector, layers: Sequence[int] | None = None, coef: float | Sequence[float] = 1.0,
                         positions: str = "all") -> Steering:
    """Multi-layer steering with the increments v[l] - v[l-1] at every layer in `layers`
    (default 1..L), one coefficient (or one per batch row) for all of them: a `Steering`
    for `generate`, the steering runners and training (preventative steering)."""
    v = np.asarray(vector, np.float32)
    layers = every_layer(v.shape[0] - 1) if layers is None else sorted({int(l) for l in layers})
    if not layers:
        raise PersonaError("incremental steering needs at least one layer")
    return Steering(incremental_vectors(v, layers), layer=layers, coef=coef, positions=positions)


def ablation_every_layer(vector, layers: Sequence[int] | None = None, coef: float = 1.0,
                         positions: str = "all") -> Steering:
    """CAFT at every layer: h <- h - coef (h . u_l) u_l with u_l = v[l] / |v[l]| at each layer
    in `layers` (default 1..L), as one `Steering` of kind "ablate"."""
    v = np.asarray(vector, np.float32)
    layers = every_layer(v.shape[0] - 1) if layers is None else sorted({int(l) for l in layers})
    if not layers:
        raise PersonaError("ablation needs at least one layer")
    return Steering(v, layer=layers, coef=coef, positions=positions, kind="ablate")
