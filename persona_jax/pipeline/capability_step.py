"""Capability under steering inside the pipeline's steering step (issue 18, point 1).

`steering_capability` scores the config's multiple-choice items at the chosen layer and
every coefficient of the steering grid (one batched, teacher-forced call) and returns the
fields `step_steer` adds to its summary: `capability` (percent correct, aligned with
`coefs`), `capability_scoring`, `capability_n_items`. Items come from
`capability.data` (a local cais/mmlu-layout file) or, when that is empty, from the trait
source's own task (`capability_items(cfg)`: the organism's); with neither, or with
`capability.enabled` False, the step adds nothing. The per-item scores go to
`{trait}/capability.csv`.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.method import capability as cap


def _items(source, cfg):
    c = cfg.capability
    if c.data:
        return cap.read_items(c.data, limit=int(c.limit) or None)
    fn = getattr(source, "capability_items", None)
    return fn(cfg) if fn is not None else None


def steering_capability(model, source, name: str, cfg, workdir: str, vector: np.ndarray, layer: int,
                        coefs: Sequence[float], progress: bool = False) -> dict:
    """{} or {"capability": [percent per coef], "capability_scoring", "capability_n_items"}."""
    c = cfg.get("capability")
    if c is None or not c.enabled:
        return {}
    items = _items(source, cfg)
    if not items:
        return {}
    scoring = str(c.scoring)
    res = cap.evaluate(model, items, vector, [int(layer)], [float(x) for x in coefs],
                       positions=str(cfg.steer.positions), scorings=(scoring,), prompt_format=str(c.prompt_format),
                       chat=bool(c.chat), batch_size=int(c.batch_size), progress=progress)
    cap.write_csv(res, os.path.join(workdir, name, "capability.csv"))
    return {"capability": res.at(scoring), "capability_scoring": scoring, "capability_n_items": len(items)}


def markdown_column(st: dict) -> Optional[list[str]]:
    """The capability cells of the report's steering table (one per coefficient), or None."""
    values = st.get("capability")
    if not values:
        return None
    return [f"{v:.1f}" for v in values]
