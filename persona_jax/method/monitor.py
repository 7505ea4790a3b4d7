"""Monitoring (METHOD.md 7): does the last-prompt-token projection predict the trait?

Conditions are conversation prefixes (a system prompt from discouraging to encouraging,
or many-shot examples). For each condition we sample answers to the evaluation
questions, judge them, and project `prompt_last` (and `response_avg`) at the chosen
layer; Pearson r is taken between per-condition means.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.runtime.capture import capture
from persona_jax.io.csvio import read_csv
from persona_jax.judges.base import Judge, judge_csv
from persona_jax.method.projection import project
from persona_jax.method.stats import pearson
from persona_jax.method.responses import Sampling, Spec, generate_to_csv, mean, scores
from persona_jax.method.steer_eval import conversation
from persona_jax.io.distributed import writer_only


@dataclasses.dataclass
class Condition:
    name: str
    system: Optional[str] = None
    prefix: Sequence[dict] = ()  # many-shot example turns before the question


def run_conditions(model, vector: np.ndarray, layer: int, conditions: Sequence[Condition], questions: Sequence[str],
                   judge: Judge, trait: str, eval_prompt: str, csv_path: str, sampling: Sampling,
                   n_per_question: int = 1, progress=True) -> dict:
    """Per-condition mean projections and trait scores, and Pearson r between them."""
    specs = []
    for ci, cond in enumerate(conditions):
        for qi, q in enumerate(questions):
            prompt = model.render_chat(conversation(q, cond.system, cond.prefix))
            for r in range(n_per_question):
                specs.append(Spec(q, prompt, f"{trait}_{qi}_{ci}_{r}", {"condition": cond.name}))
    generate_to_csv(model, specs, csv_path, trait, sampling, progress=progress)
    judge_csv(judge, csv_path, trait, eval_prompt, progress=progress)
    _, rows = read_csv(csv_path)
    caps = capture(model, [r["prompt"] for r in rows], [r["answer"] for r in rows], progress=progress)
    pl = np.full(len(rows), np.nan)
    ra = np.full(len(rows), np.nan)
    pl[caps["kept"]] = project(caps["prompt_last"][:, layer], vector[layer])
    ra[caps["kept"]] = project(caps["response_avg"][:, layer], vector[layer])
    t = scores(rows, trait, csv_path)
    per = []
    for cond in conditions:
        idx = [i for i, r in enumerate(rows) if r["condition"] == cond.name]
        per.append({"condition": cond.name,
                    "prompt_last_proj": float(np.nanmean(pl[idx])),
                    "response_avg_proj": float(np.nanmean(ra[idx])),
                    "trait": mean(t[i] for i in idx)})
    ok = [p for p in per if p["trait"] is not None]
    return {
        "layer": layer,
        "n_conditions": len(ok),
        "pearson_r": pearson([p["prompt_last_proj"] for p in ok], [p["trait"] for p in ok]),
        "pearson_r_response_avg": pearson([p["response_avg_proj"] for p in ok], [p["trait"] for p in ok]),
        "conditions": per,
    }


@writer_only
def plot_monitor(result: dict, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = [p for p in result["conditions"] if p["trait"] is not None]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([p["prompt_last_proj"] for p in per], [p["trait"] for p in per])
    for p in per:
        ax.annotate(p["condition"], (p["prompt_last_proj"], p["trait"]), fontsize=6)
    ax.set(xlabel=f"last prompt token projection (layer {result['layer']})", ylabel="trait score",
           title=f"{title}: r = {result['pearson_r']:.2f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
