"""Monitoring (METHOD.md 7): does the last-prompt-token projection predict the trait?

Conditions are conversation prefixes (a system prompt from discouraging to encouraging,
or many-shot examples). For each condition we sample answers to the evaluation
questions, judge them, and project `prompt_last` (and `response_avg`) at the chosen
layer. Pearson r (scipy.stats.pearsonr) is taken three ways, as the paper reports it:
over per-condition means, over (condition, question) points (each point averages its
rollouts), and within each condition over its questions (per condition and the mean);
and over condition means within each condition group (ladder, many-shot).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.runtime.capture import capture
from persona_jax.io.csvio import write_csv_atomic
from persona_jax.judges.base import Judge
from persona_jax.method.projection import project
from persona_jax.method.stats import pearson, pearson_test
from persona_jax.method.responses import Sampling, Spec, columns, mean, sample_and_judge, scores
from persona_jax.method.steer_eval import conversation
from persona_jax.io.distributed import writer_only


@dataclasses.dataclass
class Condition:
    name: str
    system: Optional[str] = None
    prefix: Sequence[dict] = ()  # many-shot example turns before the question
    group: str = ""  # condition family ("ladder", "many_shot"), for per-family r
    level: Optional[float] = None  # nominal strength (ladder -1..1) or shot count


def _r_entry(x, y) -> dict:
    r, p = pearson_test(x, y)
    n = int(np.sum(np.isfinite(np.asarray(x, float)) & np.isfinite(np.asarray(y, float))))
    return {"r": _none_if_nan(r), "p": _none_if_nan(p), "n": n}


def _none_if_nan(v):
    return None if v is None or not np.isfinite(v) else float(v)


def correlations(rows_condition, rows_question, proj, trait_scores, condition_names, groups=None) -> dict:
    """The three correlations between a projection and the trait score.

    Args:
      rows_condition, rows_question: [N] condition name and question of every response.
      proj: [N] projections (NaN where not captured); trait_scores: [N] (None/NaN missing).
      condition_names: the conditions in order; groups: {condition: group} or None.
    Returns {"condition_means", "points", "within": {"mean_r", "per_condition"}, "groups"}.
    """
    proj = np.asarray(proj, float)
    t = np.asarray([np.nan if v is None else v for v in trait_scores], float)
    cond = np.asarray(rows_condition, object)
    ques = np.asarray(rows_question, object)

    def mean_pair(idx):
        idx = [i for i in idx if np.isfinite(proj[i]) and np.isfinite(t[i])]
        return (float(proj[idx].mean()), float(t[idx].mean())) if idx else (np.nan, np.nan)

    means = {c: mean_pair(np.flatnonzero(cond == c)) for c in condition_names}
    points, within = [], {}
    for c in condition_names:
        cp = []
        for q in dict.fromkeys(ques[cond == c]):
            cp.append(mean_pair(np.flatnonzero((cond == c) & (ques == q))))
        points += cp
        within[c] = _r_entry([p for p, _ in cp], [s for _, s in cp])
    rs = [w["r"] for w in within.values() if w["r"] is not None]
    out = {
        "condition_means": _r_entry([means[c][0] for c in condition_names], [means[c][1] for c in condition_names]),
        "points": _r_entry([p for p, _ in points], [s for _, s in points]),
        "within": {"mean_r": float(np.mean(rs)) if rs else None, "n_conditions": len(rs), "per_condition": within},
    }
    if groups:
        out["groups"] = {}
        for g in dict.fromkeys(groups[c] for c in condition_names):
            cs = [c for c in condition_names if groups[c] == g]
            out["groups"][g] = _r_entry([means[c][0] for c in cs], [means[c][1] for c in cs])
    return out


def condition_means_r(rows_condition, proj, trait_scores, condition_names=None) -> float:
    """Pearson r over per-condition means (the monitoring step's headline r): each
    condition's mean projection (NaN-skipping) against its mean trait score (over the
    scores present); conditions with no score are left out."""
    proj = np.asarray(proj, float)
    cond = list(rows_condition)
    names = list(dict.fromkeys(cond)) if condition_names is None else list(condition_names)
    xs, ys = [], []
    for c in names:
        idx = [i for i, x in enumerate(cond) if x == c]
        t = mean(trait_scores[i] for i in idx)
        if t is not None:
            xs.append(float(np.nanmean(proj[idx])))
            ys.append(t)
    return pearson(xs, ys)


def spearman(x, y) -> float:
    """Rank correlation (ties broken by order)."""
    rx = np.argsort(np.argsort(np.asarray(x, float))).astype(float)
    ry = np.argsort(np.argsort(np.asarray(y, float))).astype(float)
    return pearson(rx, ry)


def run_conditions(model, vector: np.ndarray, layer: int, conditions: Sequence[Condition], questions: Sequence[str],
                   judge: Judge, trait: str, eval_prompt: str, csv_path: str, sampling: Sampling,
                   n_per_question: int = 1, progress=True) -> dict:
    """Per-condition mean projections and trait scores, and the Pearson correlations."""
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PersonaError(f"monitoring condition names must be unique; {dup} repeat")
    specs = []
    for ci, cond in enumerate(conditions):
        for qi, q in enumerate(questions):
            prompt = model.render_chat(conversation(q, cond.system, cond.prefix))
            for r in range(n_per_question):
                specs.append(Spec(q, prompt, f"{trait}_{qi}_{ci}_{r}", {"condition": cond.name}))
    rows = sample_and_judge(model, specs, csv_path, trait, sampling, judge, eval_prompt, progress=progress)
    fields = columns(trait, ["condition"])
    caps = capture(model, [r["prompt"] for r in rows], [r["answer"] for r in rows], progress=progress)
    pl = np.full(len(rows), np.nan)
    ra = np.full(len(rows), np.nan)
    pl[caps["kept"]] = project(caps["prompt_last"][:, layer], vector[layer])
    ra[caps["kept"]] = project(caps["response_avg"][:, layer], vector[layer])
    # every response's projections next to its scores (empty where nothing was captured)
    for r, a, b in zip(rows, pl, ra):
        r["prompt_last_proj"], r["response_avg_proj"] = float(a), float(b)
    write_csv_atomic(csv_path, [f for f in fields if f not in ("prompt_last_proj", "response_avg_proj")]
                     + ["prompt_last_proj", "response_avg_proj"], rows)
    t = scores(rows, trait, csv_path)
    per = []
    for cond in conditions:
        idx = [i for i, r in enumerate(rows) if r["condition"] == cond.name]
        per.append({"condition": cond.name,
                    "prompt_last_proj": float(np.nanmean(pl[idx])),
                    "response_avg_proj": float(np.nanmean(ra[idx])),
                    "trait": mean(t[i] for i in idx)})
    for p, cond in zip(per, conditions):
        p.update(group=cond.group, level=cond.level)
    ok = [p for p in per if p["trait"] is not None]
    names = [c.name for c in conditions]
    groups = {c.name: c.group for c in conditions} if any(c.group for c in conditions) else None
    corr = {kind: correlations([r["condition"] for r in rows], [r["question"] for r in rows], x, t, names, groups)
            for kind, x in (("prompt_last", pl), ("response_avg", ra))}
    for p in per:
        p["pearson_r_within"] = corr["prompt_last"]["within"]["per_condition"][p["condition"]]["r"]
    return {
        "layer": layer,
        "n_conditions": len(ok),
        "pearson_r": condition_means_r([r["condition"] for r in rows], pl, t, names),
        "pearson_r_response_avg": pearson([p["response_avg_proj"] for p in ok], [p["trait"] for p in ok]),
        "pearson_r_points": corr["prompt_last"]["points"]["r"],
        "pearson_r_within": corr["prompt_last"]["within"]["mean_r"],
        "correlations": corr,
        "conditions": per,
    }


@writer_only
def plot_monitor(result: dict, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = [p for p in result["conditions"] if p["trait"] is not None]
    fig, ax = plt.subplots(figsize=(5, 4))
    for g in dict.fromkeys(p.get("group", "") for p in per):
        pg = [p for p in per if p.get("group", "") == g]
        ax.scatter([p["prompt_last_proj"] for p in pg], [p["trait"] for p in pg], label=g or None)
    if any(p.get("group") for p in per):
        ax.legend(fontsize=7)
    for p in per:
        ax.annotate(p["condition"], (p["prompt_last_proj"], p["trait"]), fontsize=6)
    fmt = lambda v: "n/a" if v is None or not np.isfinite(v) else f"{v:.2f}"
    sub = ""
    if "pearson_r_points" in result:
        sub = f"\npoints r = {fmt(result['pearson_r_points'])}, within r = {fmt(result['pearson_r_within'])}"
    ax.set(xlabel=f"last prompt token projection (layer {result['layer']})", ylabel="trait score",
           title=f"{title}: means r = {fmt(result['pearson_r'])}{sub}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
