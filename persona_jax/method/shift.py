"""Fine-tuning shift (METHOD.md 8): how far fine-tuning moved the mean activation along
the persona vector, measured before any sampling from the fine-tuned model is judged.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from persona_jax.runtime.capture import capture
from persona_jax.method.projection import project


def mean_activations(model, prompts: Sequence[str], responses: Sequence[str], layer: int, batch_size: int = 16,
                     progress: bool = False) -> dict[str, np.ndarray]:
    """Mean `prompt_last` and `response_avg` at `layer` over the samples: {name: [D]}."""
    caps = capture(model, list(prompts), list(responses), batch_size=batch_size, progress=progress)
    return {r: caps[r][:, layer].astype(np.float64).mean(0) for r in ("prompt_last", "response_avg")}


def finetuning_shift(base_means: dict, tuned_means: dict, vector: np.ndarray, layer: int) -> dict[str, float]:
    """(tuned - base) projected on v[layer] / |v[layer]|, for each reduction."""
    return {r: float(project((tuned_means[r] - base_means[r])[None], vector[layer])[0]) for r in base_means}
