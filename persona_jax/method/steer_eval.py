"""Steering evaluation (METHOD.md 6): questions x layers x coefficients in one batched
generation (per-row layer and coefficient), judged for trait and coherence.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.judges.base import Judge
from persona_jax.method.responses import Sampling, Spec, mean, sample_and_judge, scores
from persona_jax.steering.spec import Steering
from persona_jax.io.distributed import writer_only


def conversation(question: str, system: Optional[str] = None, prefix: Sequence[dict] = ()) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + list(prefix) + [{"role": "user", "content": question}]


@dataclasses.dataclass
class SweepResult:
    """Mean scores per (layer, coef): arrays [n_layers, n_coefs]."""

    layers: list[int]
    coefs: list[float]
    trait: np.ndarray
    coherence: np.ndarray
    rows: list[dict]

    def best(self, baseline: float, coherence_floor: float, sign: float = 1.0):
        """(layer, coef, gain) with the largest sign*(trait - baseline) at coherence >= floor."""
        best = (None, None, -np.inf)
        for i, l in enumerate(self.layers):
            for j, c in enumerate(self.coefs):
                if np.isnan(self.trait[i, j]) or not self.coherence[i, j] >= coherence_floor:
                    continue
                gain = sign * (self.trait[i, j] - baseline)
                if gain > best[2]:
                    best = (l, c, gain)
        return best


def sweep(model, vector: np.ndarray, questions: Sequence[str], layers: Sequence[int], coefs: Sequence[float],
          judge: Judge, trait: str, eval_prompt: str, csv_path: str, sampling: Sampling, n_per_question: int = 1,
          system: Optional[str] = None, positions: str = "response", progress=True) -> SweepResult:
    """Generate and judge every (layer, coef, question, rollout) in batched calls.

    Rows carry their own layer and coefficient (`Steering.sweep`), so one compiled program
    covers the whole grid. The CSV gets `layer` and `coef` columns.
    """
    specs = []
    for layer in layers:
        for coef in coefs:
            for qi, q in enumerate(questions):
                prompt = model.render_chat(conversation(q, system))
                for r in range(n_per_question):
                    specs.append(Spec(q, prompt, f"{trait}_{qi}_l{layer}_c{coef:g}_{r}",
                                      {"layer": str(layer), "coef": repr(float(coef))}))

    def steering_for(chunk):
        return [Steering.sweep(vector, [int(s.extra["layer"]) for s in chunk],
                               [float(s.extra["coef"]) for s in chunk], positions=positions)]

    rows = sample_and_judge(model, specs, csv_path, trait, sampling, judge, eval_prompt, steering_for,
                            progress=progress)
    t, c = scores(rows, trait, csv_path), scores(rows, "coherence", csv_path)
    trait_m = np.full((len(layers), len(coefs)), np.nan)
    coh_m = np.full((len(layers), len(coefs)), np.nan)
    for i, layer in enumerate(layers):
        for j, coef in enumerate(coefs):
            idx = [k for k, r in enumerate(rows) if int(r["layer"]) == layer and float(r["coef"]) == float(coef)]
            mt, mc = mean(t[k] for k in idx), mean(c[k] for k in idx)
            trait_m[i, j] = np.nan if mt is None else mt
            coh_m[i, j] = np.nan if mc is None else mc
    return SweepResult(list(layers), [float(x) for x in coefs], trait_m, coh_m, rows)


def random_like(vector: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random direction per layer with the same norm as `vector`'s row (the control)."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(vector.shape).astype(np.float32)
    r /= np.linalg.norm(r, axis=-1, keepdims=True)
    return r * np.linalg.norm(vector, axis=-1, keepdims=True)


@writer_only
def plot_sweep(result: SweepResult, path: str, title: str, capability=None):
    """Trait and coherence against the coefficient per layer; `capability` = (layer,
    [percent correct per coefficient]) adds a third panel (multiple-choice accuracy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if capability else 2, figsize=(15 if capability else 10, 4))
    if capability:
        axes[2].plot(result.coefs, capability[1], marker="o", color="black", label=f"layer {capability[0]}")
        axes[2].set(xlabel="coefficient", ylabel="percent correct", title=f"{title}: capability", ylim=(0, 102))
        axes[2].legend(fontsize=7)
    for i, layer in enumerate(result.layers):
        axes[0].plot(result.coefs, result.trait[i], marker="o", label=f"layer {layer}")
        axes[1].plot(result.coefs, result.coherence[i], marker="o", label=f"layer {layer}")
    axes[0].set(xlabel="coefficient", ylabel="trait score", title=f"{title}: trait")
    axes[1].set(xlabel="coefficient", ylabel="coherence", title=f"{title}: coherence")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
