"""Persona vectors across training (issue 26): a vector at every checkpoint of one run,
and how it compares with the finished model's.

* every checkpoint sees the same text: the final model's judged pos / neg responses of a
  finished extract step, filtered by the extract rule and captured teacher-forced
  (`extract.vectors_from_rows`), so base checkpoints that cannot follow a system prompt
  still give a vector;
* per checkpoint, layer and reduction: the cosine to the final checkpoint's vector and
  to the previous checkpoint's (refinement);
* on a target model (by default the final one), at the target's chosen layer and
  coefficient grid: the trait gain of the checkpoint's vector, norm-matched to the
  target's own vector at that layer, at coherence >= the floor, as a share of the target
  vector's gain measured by the same sweep (the same prompts and seeds: common random
  numbers);
* the monitoring r of the checkpoint's vector: the target's monitoring responses,
  projected at their last prompt token on it, against their trait scores (Pearson r over
  condition means, as the monitoring step reports it).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.io.distributed import writer_only
from persona_jax.method import steer_eval as se
from persona_jax.method.monitor import condition_means_r
from persona_jax.method.projection import project
from persona_jax.method.transfer import cosines
from persona_jax.runtime.capture import REDUCTIONS


def cosine_table(vectors: Sequence[dict]) -> dict:
    """{reduction: {"to_final": [n, L+1], "to_previous": [n, L+1]}} of checkpoint vectors
    [{reduction: [L+1, D]}] in training order (row 0 of to_previous is NaN)."""
    out = {}
    for r in vectors[0]:
        fin = np.stack([cosines(v[r], vectors[-1][r]) for v in vectors])
        prev = np.stack([np.full(vectors[0][r].shape[0], np.nan)]
                        + [cosines(b[r], a[r]) for a, b in zip(vectors, vectors[1:])])
        out[r] = {"to_final": fin, "to_previous": prev}
    return out


def norm_matched(vector: np.ndarray, reference: np.ndarray, layer: int) -> np.ndarray:
    """`vector` scaled so its row `layer` has the norm of `reference`'s row `layer`."""
    n = float(np.linalg.norm(vector[layer]))
    return (vector * (float(np.linalg.norm(reference[layer])) / n if n > 0 else 0.0)).astype(np.float32)


@dataclasses.dataclass
class SteeringProbe:
    """The steering measure's fixed part: a target model, its chosen layer and coefficient
    grid, questions and sampling (every vector is judged on the same prompts and seeds)."""

    model: object
    layer: int
    coefs: Sequence[float]
    questions: Sequence[str]
    judge: object
    trait: str
    eval_prompt: str
    sampling: object
    n_per_question: int
    coherence_floor: float
    positions: str = "response"

    def gain(self, vector: np.ndarray, csv_path: str, progress: bool = False) -> dict:
        """{gain, coef, baseline, trait_scores, coherence}: the best trait gain over the
        coefficient grid at coherence >= the floor (None when no coefficient qualifies)."""
        coefs = sorted({0.0, *map(float, self.coefs)})
        res = se.sweep(self.model, vector, self.questions, [self.layer], coefs, self.judge, self.trait,
                       self.eval_prompt, csv_path, self.sampling, self.n_per_question, positions=self.positions,
                       progress=progress)
        baseline = float(res.trait[0, coefs.index(0.0)])
        _, coef, gain = res.best(baseline, self.coherence_floor)
        return {"gain": None if coef is None else float(gain), "coef": coef, "baseline": baseline,
                "coefs": coefs, "trait_scores": [float(x) for x in res.trait[0]],
                "coherence": [float(x) for x in res.coherence[0]]}


def share(gain: Optional[float], reference_gain: Optional[float]) -> Optional[float]:
    """gain / reference_gain; None when either is missing or the reference gains nothing."""
    if gain is None or reference_gain is None or not reference_gain > 0:
        return None
    return float(gain) / float(reference_gain)


def monitor_r(prompt_last: np.ndarray, vector_row: np.ndarray, conditions: Sequence[str],
              trait_scores: Sequence[Optional[float]]) -> Optional[float]:
    """Pearson r over condition means between the responses' last-prompt-token states
    [N, D] projected on `vector_row` [D] and their trait scores (the monitoring step's r)."""
    r = condition_means_r(conditions, project(prompt_last, vector_row), trait_scores)
    return None if r is None or not np.isfinite(r) else float(r)


def first_reaching(values: Sequence[Optional[float]], threshold: float) -> Optional[int]:
    """Index of the first checkpoint whose value is >= threshold, or None."""
    for i, v in enumerate(values):
        if v is not None and np.isfinite(v) and v >= threshold:
            return i
    return None


def run_fraction(ckpts, i: Optional[int]) -> Optional[float]:
    """Checkpoint i's place in the run: its step over the final step (tokens when steps
    are unknown, else its index over the last)."""
    if i is None:
        return None
    for attr in ("step", "tokens"):
        vals = [getattr(c, attr) for c in ckpts]
        if vals[i] is not None and vals[-1]:
            return float(vals[i]) / float(vals[-1])
    return i / max(len(ckpts) - 1, 1)


def x_axis(ckpts) -> tuple[list, str]:
    """(x values, label) for plots: steps when every checkpoint has one, else tokens, else
    the checkpoint index."""
    for attr, label in (("step", "training step"), ("tokens", "training tokens")):
        vals = [getattr(c, attr) for c in ckpts]
        if all(v is not None for v in vals):
            return vals, label
    return list(range(1, len(ckpts) + 1)), "checkpoint"


def _fmt(v, nd=3):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def markdown(report: dict) -> str:
    """trace.md: per trait, one row per checkpoint at the target's layer and reduction."""
    lines = [f"# Persona vectors across training: {report['run']}", "",
             f"Target: {report['target']}. Cosines and shares at the target's chosen layer, "
             f"reduction {report['reduction']}; share = the checkpoint vector's steering gain (norm-matched) "
             "over the target vector's, at coherence >= the floor.", ""]
    for name, t in report["traits"].items():
        lines += [f"## {name} (layer {t['layer']})", "",
                  f"First cosine >= {report['cosine_threshold']}: {t['first_cosine']['name'] or 'never'} "
                  f"(fraction of the run {_fmt(t['first_cosine']['fraction'])}); first share >= "
                  f"{report['share_threshold']}: {t['first_share']['name'] or 'never'} "
                  f"(fraction {_fmt(t['first_share']['fraction'])}).", "",
                  "| checkpoint | step | tokens | cos to final | cos to previous | steering share | gain (coef) | monitor r |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, c in enumerate(report["checkpoints"]):
            s = t["steering"][i] if t["steering"] else {}
            lines.append(f"| {c['name']} | {c['step'] if c['step'] is not None else 'n/a'} | "
                         f"{c['tokens'] if c['tokens'] is not None else 'n/a'} | {_fmt(t['cos_final'][i])} | "
                         f"{_fmt(t['cos_previous'][i])} | {_fmt(s.get('share'), 2)} | "
                         f"{_fmt(s.get('gain'), 1)} ({s.get('coef', 'n/a')}) | {_fmt(t['monitor_r'][i] if t['monitor_r'] else None, 2)} |")
        lines.append("")
    return "\n".join(lines)


@writer_only
def plot(report: dict, ckpts, path: str):
    """Cosine to the final vector and steering share against training (log x), a line per trait."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, label = x_axis(ckpts)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = [False, False]
    for name, t in report["traits"].items():
        panels = [t["cos_final"], [s["share"] for s in t["steering"]]]
        for k, vals in enumerate(panels):
            ys = np.asarray([np.nan if v is None else v for v in vals], float)
            if np.isfinite(ys).any():
                axes[k].plot(xs, ys, marker="o", ms=3, label=name)
                drawn[k] = True
    axes[0].set(xlabel=label, ylabel="cosine to the final vector", title="vector vs the final one")
    axes[1].set(xlabel=label, ylabel="steering share", title=f"steering {report['target']}")
    for k, (ax, thr) in enumerate(zip(axes, (report["cosine_threshold"], report["share_threshold"]))):
        ax.axhline(thr, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
        if drawn[k]:  # a log axis needs a point to place its ticks
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="grey")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["cosine_table", "norm_matched", "SteeringProbe", "share", "monitor_r", "first_reaching",
           "run_fraction", "x_axis", "markdown", "plot", "REDUCTIONS"]
