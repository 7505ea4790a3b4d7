"""`SteeringGrid`: a layer x coefficient sweep over prompts, results labelled by cell.

Every (layer, coef) cell on every input is one row of one `Steering.sweep`, so a whole
grid is a single `generate` call (one request stream of the continuous-batching engine);
`pj.generate(model, inputs, n, steering=grid)` returns the labelled table.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

from persona_jax.errors import PersonaError


@dataclasses.dataclass(frozen=True)
class SteeringGrid:
    """`layers` x `coefs` with one vector ([L+1, D], a `PersonaVector`, or [D]); build it
    with `Steering.grid` and pass it as `generate`'s `steering`. Cells are layer-major."""

    vector: Any
    layers: tuple[int, ...]
    coefs: tuple[float, ...]
    positions: str = "all"
    kind: str = "add"

    def __post_init__(self):
        if not self.layers or not self.coefs:
            raise PersonaError(f"a steering grid needs at least one layer and one coefficient; got "
                               f"{len(self.layers)} layers and {len(self.coefs)} coefficients")

    @property
    def cells(self) -> list[tuple[int, float]]:
        """The (layer, coef) pairs, layer-major."""
        return list(itertools.product(self.layers, self.coefs))

    def inputs(self, inputs: Sequence) -> list:
        """`inputs` repeated once per cell: row c * len(inputs) + i is cell c on input i."""
        return list(inputs) * len(self.cells)

    def rows(self, n_inputs: int) -> tuple[list[int], list[float]]:
        """(layer, coef) of each row of `inputs(...)` for `n_inputs` inputs, the arguments
        of the `Steering.sweep` that runs the grid (this module stays below `spec`)."""
        rows = [cell for cell in self.cells for _ in range(n_inputs)]
        return [l for l, _ in rows], [c for _, c in rows]

    def table(self, prompts: Sequence[str], outputs: Sequence):
        """A pandas DataFrame, one row per (cell, input) in the order of `inputs`: layer,
        coef, prompt (the input's index), input (its rendered text) and text (`outputs`)."""
        import pandas as pd

        n, cells = len(prompts), self.cells
        if len(outputs) != n * len(cells):
            raise PersonaError(f"a steering grid of {len(cells)} cells over {n} inputs has {n * len(cells)} "
                               f"rows; got {len(outputs)} outputs")
        return pd.DataFrame({"layer": [l for l, _ in cells for _ in range(n)],
                             "coef": [c for _, c in cells for _ in range(n)],
                             "prompt": list(range(n)) * len(cells), "input": list(prompts) * len(cells),
                             "text": list(outputs)})
