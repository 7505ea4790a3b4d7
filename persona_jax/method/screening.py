"""Data screening as the paper runs it (METHOD.md 9 and 11; the paper's appendices F, I, K).

Built on `method.flagging` (the per-sample projection difference and its `prompt_last`
approximation); this module adds what the paper does with them:

* thresholds calibrated on a clean reference set as a percentile (the 95th) of its values,
  and the filters they make: by the trait judge's score of each dataset response, by the
  projection difference, and by both (a sample is dropped when either flags it);
* real chat corpora cut as the paper cuts them: the first two turns (first user message,
  first assistant reply), prompts of at most `max_prompt_tokens` tokens, then the top,
  bottom and random k samples by projection difference written as training JSONL;
* the dataset level: mean projection difference of each dataset against its measured
  fine-tuning shift, with Pearson r;
* histograms of the projection difference of the kept and dropped samples.

Arrays are per sample, [N], NaN where a value is missing (an empty response, a judge
refusal); a missing value never flags a sample.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.io import jsonl
from persona_jax.io.atomic import atomic_path
from persona_jax.io.distributed import writer_only
from persona_jax.method import stats

FILTERS = ("judge", "delta", "combined")
SETS = ("top", "bottom", "random")


# ---------------------------------------------------------------------------------------
# Thresholds and filters (appendix K).

def calibrate_threshold(values, percentile: float = 95.0, what: str = "reference values") -> float:
    """The `percentile`-th percentile (numpy's linear interpolation) of the finite `values`."""
    if not 0.0 < float(percentile) <= 100.0:
        raise PersonaError(f"the calibration percentile must be in (0, 100]; got {percentile}")
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise PersonaError(f"no finite {what} to calibrate a threshold on")
    return float(np.percentile(v, float(percentile)))


def judge_scores(judge, trait: str, eval_prompt: str, records: Sequence[dict]) -> np.ndarray:
    """[N] the trait judge's score of each record's last (assistant) message, the question
    being the last user message before it; NaN where the judge gave no score."""
    questions, answers = [], []
    for r in records:
        msgs = r["messages"]
        users = [m["content"] for m in msgs[:-1] if m["role"] == "user"]
        questions.append(users[-1] if users else "")
        answers.append(msgs[-1]["content"])
    got = judge.trait_scores(trait, eval_prompt, questions, answers)
    return np.array([np.nan if s is None else float(s) for s in got], float)


def filter_masks(delta=None, judge=None, delta_threshold: Optional[float] = None,
                 judge_threshold: Optional[float] = None) -> dict[str, np.ndarray]:
    """{filter: [N] bool, True = dropped}: "delta" drops delta > delta_threshold, "judge"
    drops judge score > judge_threshold, "combined" (when both are given) drops either.
    NaN never drops a sample."""
    out = {}
    if judge is not None and judge_threshold is not None:
        j = np.asarray(judge, float)
        out["judge"] = np.nan_to_num(j, nan=-np.inf) > float(judge_threshold)
    if delta is not None and delta_threshold is not None:
        d = np.asarray(delta, float)
        out["delta"] = np.nan_to_num(d, nan=-np.inf) > float(delta_threshold)
    if "judge" in out and "delta" in out:
        if out["judge"].shape != out["delta"].shape:
            raise PersonaError(f"{out['judge'].size} judge scores for {out['delta'].size} projection differences")
        out["combined"] = out["judge"] | out["delta"]
    return out


def filter_summary(masks: Mapping[str, np.ndarray]) -> dict:
    """{filter: {removed, kept, removed_fraction}}."""
    return {k: {"removed": int(m.sum()), "kept": int((~m).sum()), "removed_fraction": float(m.mean()) if m.size else 0.0}
            for k, m in masks.items()}


# ---------------------------------------------------------------------------------------
# Real chat corpora.

def first_two_turns(path: str) -> tuple[list[dict], dict]:
    """Records {"messages": [first user message, first assistant reply after it]} of a chat
    corpus JSONL (one {"messages": [...]} per line, any number of turns; other messages,
    a system prompt included, are dropped), and counts {n_read, n_no_exchange}: lines
    without a user message followed by a non-empty assistant reply are left out."""
    out, skipped, lines = [], 0, jsonl.read_jsonl(path, "chat corpus")
    for n, obj in lines:
        where = f"{path}, line {n}"
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list):
            raise PersonaError(f"{where} has no \"messages\" list; expected {{\"messages\": [{{\"role\": ..., "
                               "\"content\": ...}, ...]}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise PersonaError(f"{where}: message {i} must be an object with string \"role\" and \"content\"")
        u = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        a = None if u is None else next((i for i in range(u + 1, len(msgs)) if msgs[i]["role"] == "assistant"), None)
        if a is None or not msgs[a]["content"].strip():
            skipped += 1
            continue
        out.append({"messages": [{"role": "user", "content": msgs[u]["content"]},
                                 {"role": "assistant", "content": msgs[a]["content"]}]})
    if not lines:
        raise PersonaError(f"{path} holds no conversations; expected one {{\"messages\": [...]}} object per line")
    return out, {"n_read": len(lines), "n_no_exchange": skipped}


def prompt_token_counts(model, records: Sequence[dict]) -> np.ndarray:
    """[N] tokens of each record's prompt as the model reads it: the chat template of every
    message but the last, with the generation prompt (no further special tokens)."""
    from persona_jax.runtime.generate import tokenize

    if not records:
        return np.zeros(0, int)
    prompts = [model.render_chat(r["messages"][:-1], add_generation_prompt=True) for r in records]
    return np.array([len(ids) for ids in tokenize(model, prompts)], int)


def rank_sets(delta, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{top, bottom, random}: k sample indices each among the finite deltas: the largest
    first, the smallest first, and a uniform draw without replacement (by `seed`, in
    index order)."""
    d = np.asarray(delta, float)
    ok = np.flatnonzero(np.isfinite(d))
    if not 0 < int(k) <= ok.size:
        raise PersonaError(f"k={k} samples per set, but {ok.size} samples have a projection difference; "
                           f"choose k between 1 and {ok.size}")
    top = ok[np.argsort(-d[ok], kind="stable")[:k]]
    bottom = ok[np.argsort(d[ok], kind="stable")[:k]]
    rand = np.sort(np.random.default_rng(int(seed)).choice(ok, size=int(k), replace=False))
    return {"top": top, "bottom": bottom, "random": rand}


def write_sets(records: Sequence[dict], sets: Mapping[str, np.ndarray], directory: str) -> dict[str, str]:
    """Each set as training JSONL `{name}_{k}.jsonl` ({"messages": [...]} per line, in the
    set's order) under `directory`; returns {name: path}."""
    out = {}
    for name, idx in sets.items():
        path = os.path.join(directory, f"{name}_{len(idx)}.jsonl")
        jsonl.write_jsonl(path, [{"messages": records[int(i)]["messages"]} for i in idx])
        out[name] = path
    return out


# ---------------------------------------------------------------------------------------
# Dataset level (appendix F).

def read_shifts(path: str, key: str = "shift_response_avg", trait: Optional[str] = None) -> dict[str, float]:
    """Per-dataset measured shifts from a JSON file: {label: number}, or a fine-tuning
    summary whose `datasets` maps labels to records holding `key` (the pipeline's
    `finetune.json`), or a pipeline report.json (`traits.<trait>.finetune.datasets`)."""
    if not os.path.isfile(path):
        raise PersonaError(f"shifts file {path} does not exist; check the path")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:
        raise PersonaError(f"shifts file {path} is not valid JSON ({e})") from None
    if isinstance(obj, dict) and "traits" in obj and isinstance(obj["traits"], dict):
        names = [t for t, v in obj["traits"].items() if isinstance(v, dict) and isinstance(v.get("finetune"), dict)]
        if trait is None and len(names) == 1:
            trait = names[0]
        if trait not in names:
            raise PersonaError(f"{path} has fine-tuning results for {', '.join(names) or 'no trait'}; "
                               "name the trait whose shifts to use")
        obj = obj["traits"][trait]["finetune"]
    if isinstance(obj, dict) and isinstance(obj.get("datasets"), dict):
        obj = {label: (rec.get(key) if isinstance(rec, dict) else None) for label, rec in obj["datasets"].items()}
    if not isinstance(obj, dict) or not obj:
        raise PersonaError(f"{path} holds no shifts; expected {{label: shift, ...}} or a fine-tuning summary")
    out = {}
    for label, v in obj.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PersonaError(f"{path}: the shift of {label!r} is {v!r}, not a number (key {key!r})")
        out[str(label)] = float(v)
    if not out:
        raise PersonaError(f"{path} holds no numeric {key!r} for any dataset")
    return out


def shift_correlation(mean_deltas: Mapping[str, float], shifts: Mapping[str, float]) -> dict:
    """Dataset-level mean projection difference against the measured shift, over the labels
    both have: {labels, mean_delta, shift, pearson_r, p_value} (r NaN under 3 datasets)."""
    labels = [k for k in mean_deltas if k in shifts]
    if not labels:
        raise PersonaError(f"no dataset has both a projection difference ({', '.join(mean_deltas)}) and a shift "
                           f"({', '.join(shifts)}); the labels must match")
    x = [float(mean_deltas[k]) for k in labels]
    y = [float(shifts[k]) for k in labels]
    r, p = stats.pearson_test(x, y)
    return {"labels": labels, "mean_delta": x, "shift": y, "pearson_r": r, "p_value": p}


# ---------------------------------------------------------------------------------------
# Figures.

@writer_only
def plot_histograms(path: str, delta, masks: Mapping[str, np.ndarray], thresholds: Mapping[str, float] | None = None,
                    reference=None, title: str = "projection difference"):
    """One panel per filter: histograms of `delta` for the kept and the dropped samples
    (and of the reference set's, when given), the delta threshold as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.asarray(delta, float)
    panels = list(masks) or ["all"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    fin = np.isfinite(d)
    ref = None if reference is None else np.asarray(reference, float)
    pool = [d[fin]] + ([ref[np.isfinite(ref)]] if ref is not None else [])
    allv = np.concatenate(pool) if pool else np.zeros(1)
    bins = np.histogram_bin_edges(allv if allv.size else np.zeros(1), bins=30)
    for ax, name in zip(axes[0], panels):
        m = masks.get(name, np.zeros(d.shape, bool))
        ax.hist(d[fin & ~m], bins=bins, alpha=0.6, label=f"kept ({int((fin & ~m).sum())})")
        ax.hist(d[fin & m], bins=bins, alpha=0.6, label=f"dropped ({int((fin & m).sum())})")
        if ref is not None:
            ax.hist(ref[np.isfinite(ref)], bins=bins, histtype="step", color="k", label="reference")
        if thresholds and thresholds.get("delta") is not None and name in ("delta", "combined"):
            ax.axvline(thresholds["delta"], color="r", ls="--", lw=1)
        ax.set(xlabel=title, ylabel="samples", title=f"filter: {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


__all__ = ["calibrate_threshold", "judge_scores", "filter_masks", "filter_summary", "first_two_turns",
           "prompt_token_counts", "rank_sets", "write_sets", "read_shifts", "shift_correlation", "plot_histograms"]
