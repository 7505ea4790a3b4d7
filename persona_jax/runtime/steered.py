"""`steer`: a model that carries a steering (usable wherever a model is), which is also a
context manager that steers the original model object inside a `with` block.

The runners (`generate`, `capture`, `forward`) read `attached(model)`: the model's own
`Model.steering` plus the steerings of every `with pj.steer(model, ...)` block open for
that very object. Nothing is patched: steering stays array data of the same programs.
"""
from __future__ import annotations

import contextvars
import dataclasses

from persona_jax.errors import PersonaError
from persona_jax.model.checkpoint import Model
from persona_jax.runtime.apply import steering_sites
from persona_jax.steering.spec import Steering, as_list, validate_all

# (model object, its steerings) for every open `with pj.steer(...)` block, innermost last.
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("persona_jax_steering", default=())


@dataclasses.dataclass(eq=False)
class SteeredModel(Model):
    """A `Model` whose runs are steered by `steering` (see `steer`). As a context
    manager, `with pj.steer(model, ...):` also steers `base`, the model it was made
    from, inside the block."""

    base: Model | None = dataclasses.field(default=None, repr=False)

    def __enter__(self) -> "SteeredModel":
        own = self.steering[len(self.base.steering):]
        self.__dict__.setdefault("_tokens", []).append(_ACTIVE.set(_ACTIVE.get() + ((self.base, own),)))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self.__dict__["_tokens"].pop())


def attached(model) -> list[Steering]:
    """The steerings every run of `model` applies: its own, then those of the open
    `with pj.steer(model, ...)` blocks for this object."""
    out = list(getattr(model, "steering", ()) or ())
    for target, steerings in _ACTIVE.get():
        if target is model:
            out.extend(steerings)
    return out


def steer(model: Model, vector, layer=None, coef=1.0, positions: str = "all", kind: str = "add",
          site: str | None = None) -> SteeredModel:
    """`model` steered by `coef * vector` at hidden state `layer` (METHOD.md 6), for every
    call of `generate`, `capture`, `forward` and what is built on them (`pj.extract`,
    `pj.project`, grids, the pipeline's runners given the model).

    vector: a `PersonaVector`, an [L+1, D] array, a [D] direction, or a ready `Steering`
      (then `layer`, `coef`, ... are its own). layer: hidden-state index 0..L, or a list of
      them. coef: one coefficient (a list gives one per input, so every call must then have
      that many inputs). positions, kind, site: as `Steering`.

    Use the result wherever a model is (`pj.generate(steer(model, v, 20, 4.0), ...)`), or
    as a context manager, which steers `model` itself inside the block:
    `with pj.steer(model, v, 20, 4.0): pj.generate(model, ...)`. Steerings stack: steering
    a steered model adds to its steering.
    """
    if isinstance(vector, Steering):
        s = vector
    else:
        if layer is None:
            raise PersonaError("steer needs the layer to steer at (a hidden-state index 0..L), "
                               "or a ready pj.Steering in place of the vector")
        s = Steering(vector, layer=layer, coef=coef, positions=positions, kind=kind, site=site)
    validate_all(as_list(s), model.num_layers, model.hidden_size, None, steering_sites(model.config))
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(Model) if f.init}
    fields["steering"] = tuple(model.steering) + (s,)
    steered = SteeredModel(**fields, base=model)
    steered._views = model._views  # the same weights: the same per-layer views
    return steered
