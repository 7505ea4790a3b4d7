"""Capability in the fine-tuning report (issue 18; METHOD.md 8 and 11).

`step_finetune` scores the config's multiple-choice items (`capability.data`, a local
cais/mmlu-layout file, or the trait source's own task: the organism's) on the base model,
the model fine-tuned on the trait's full dataset ("after"), the preventatively steered
and the CAFT fine-tunes, and the fine-tuned model under post-hoc steering at every
post-hoc coefficient (one batched sweep). `summary(...)` gives `finetune.capability`:

* `before`, `after`, `preventative`, `caft`: percent correct;
* `posthoc`: at the `posthoc_best` coefficient (`posthoc_coef`), and `posthoc_curve`: trait,
  coherence and capability at coefficient 0 (the fine-tuned model) and every post-hoc one;
* `matched`: the paper's claim checked at a matched trait level: the post-hoc curve is
  followed from coefficient 0 outward to where its trait first falls to the preventative
  model's trait level, capability interpolated linearly there, and compared with the
  preventative model's capability (`difference` = preventative - post-hoc; positive means
  preventative steering cost less capability). None when post-hoc steering never gets
  the trait that low (`matched_note` says so).

Per-item rows go to `{trait}/finetune/capability.csv`: run, coef, index, subject, answer,
scores (the per-choice values the prediction is the argmax of, JSON), pred, correct.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.io.csvio import write_csv_atomic
from persona_jax.io.distributed import writer_only
from persona_jax.method import capability as cap
from persona_jax.steering.spec import POSITIONS

CSV_COLUMNS = ("run", "coef", "index", "subject", "answer", "scores", "pred", "correct")


def items(source, cfg):
    """The multiple-choice items, or None when capability is off or there are none."""
    c = cfg.get("capability")
    if c is None or not c.enabled:
        return None
    from persona_jax.pipeline.capability_step import _items
    return _items(source, cfg) or None


def _row_scores(row: dict, scoring: str) -> list[float]:
    if scoring == "letter":
        return list(row["letter_logprobs"])
    if scoring == "choice_raw":
        return list(row["choice_logprobs"])
    return [s / n for s, n in zip(row["choice_logprobs"], row["choice_tokens"])]


class Recorder:
    """Scores models on the items and keeps their per-item rows for the CSV."""

    def __init__(self, its, cfg):
        self.items, self.c, self.rows = its, cfg.capability, []

    def score(self, model, run: str, vector=None, layer: Optional[int] = None, coefs: Sequence[float] = (0.0,),
              positions: str = "response", progress: bool = False) -> list[float]:
        """Percent correct per coefficient (one value unsteered); rows recorded under `run`."""
        c = self.c
        scoring = str(c.scoring)
        res = cap.evaluate(model, self.items, vector, [int(layer)] if vector is not None else (), coefs,
                           positions=positions if positions in POSITIONS else "response", scorings=(scoring,),
                           prompt_format=str(c.prompt_format), chat=bool(c.chat), batch_size=int(c.batch_size),
                           progress=progress)
        for r in res.rows:
            pred = r[f"{scoring}_pred"]
            self.rows.append({"run": run, "coef": r["coef"], "index": r["index"], "subject": r["subject"],
                              "answer": r["answer"], "scores": json.dumps(_row_scores(r, scoring)), "pred": pred,
                              "correct": int(pred == r["answer"])})
        return res.at(scoring)

    def write(self, path: str) -> None:
        _write(path, self.rows)


@writer_only
def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_csv_atomic(path, CSV_COLUMNS, rows)


def matched(curve: Sequence[dict], level: Optional[float]) -> Optional[dict]:
    """Post-hoc capability where the post-hoc curve (points in order of growing |coef|, the
    first at coef 0) first reaches trait <= `level`, linear in trait between the two points
    around it; None if it never does (or a value is missing)."""
    if level is None:
        return None
    pts = [p for p in curve if p["trait"] is not None and p["capability"] is not None]
    for i, p in enumerate(pts):
        if p["trait"] <= level:
            if i == 0 or pts[i - 1]["trait"] == p["trait"]:
                return {"coef": p["coef"], "capability": p["capability"], "coherence": p.get("coherence")}
            a = pts[i - 1]
            w = (a["trait"] - level) / (a["trait"] - p["trait"])  # 0 at a, 1 at p
            lerp = lambda x, y: None if x is None or y is None else x + w * (y - x)
            return {"coef": lerp(a["coef"], p["coef"]), "capability": lerp(a["capability"], p["capability"]),
                    "coherence": lerp(a.get("coherence"), p.get("coherence"))}
    return None


def summary(before: float, after: float, preventative: float, caft: float, posthoc: Sequence[dict],
            posthoc_caps: Sequence[float], trait_after, coherence_after, trait_preventative,
            posthoc_best_coef: Optional[float], scoring: str, n_items: int) -> dict:
    """`finetune.capability`. `posthoc`: the step's post-hoc points ({coef, trait, coherence}),
    `posthoc_caps`: capability at each of them; `posthoc_best_coef`: the coefficient of
    `posthoc_best` (None when no point is coherent)."""
    curve = [{"coef": 0.0, "trait": trait_after, "coherence": coherence_after, "capability": after}]
    curve += [{**p, "capability": c} for p, c in zip(posthoc, posthoc_caps)]
    best = next((p for p in curve[1:] if posthoc_best_coef is not None and p["coef"] == posthoc_best_coef), None)
    out = {"scoring": scoring, "n_items": n_items, "before": before, "after": after, "preventative": preventative,
           "caft": caft, "posthoc": None if best is None else best["capability"],
           "posthoc_coef": None if best is None else best["coef"], "posthoc_curve": curve}
    m = matched(curve, trait_preventative)
    if m is None:
        lowest = min((p["trait"] for p in curve if p["trait"] is not None), default=None)
        out["matched"] = None
        out["matched_note"] = (f"post-hoc steering never brings the trait down to the preventative level "
                               f"{_f(trait_preventative)} (lowest {_f(lowest)})")
    else:
        out["matched"] = {"trait_level": trait_preventative, "preventative": preventative,
                          "posthoc": m["capability"], "posthoc_coef": m["coef"], "posthoc_coherence": m["coherence"],
                          "difference": preventative - m["capability"]}
    return out


def _f(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def verdict(c: dict) -> str:
    """One sentence: the paper's claim at the matched trait level, as measured."""
    m = c.get("matched")
    if not m:
        return f"Preventative vs post-hoc at a matched trait level: not measurable ({c.get('matched_note', '')})."
    d = m["difference"]
    word = ("costs less capability than" if d > 0 else "costs more capability than" if d < 0
            else "costs the same capability as")
    return (f"At the preventative model's trait level ({_f(m['trait_level'])}), preventative steering "
            f"({_f(m['preventative'])}% correct) {word} post-hoc steering of the fine-tuned model "
            f"({_f(m['posthoc'])}% at coef {_f(m['posthoc_coef'], 2)}, interpolated; difference {d:+.1f} points).")


def markdown(c: dict) -> list[str]:
    """Report lines: the capability row and the matched comparison."""
    return ["", f"Capability ({c['scoring']}, {c['n_items']} items, percent correct):", "",
            "| before | after | preventative | CAFT | post-hoc (coef) |", "|---|---|---|---|---|",
            f"| {_f(c['before'])} | {_f(c['after'])} | {_f(c['preventative'])} | {_f(c['caft'])} | "
            f"{_f(c['posthoc'])} ({'n/a' if c['posthoc_coef'] is None else format(c['posthoc_coef'], 'g')}) |",
            "", "Post-hoc curve (coef: trait / capability): " + ", ".join(
                f"{p['coef']:g}: {_f(p['trait'])} / {_f(p['capability'])}" for p in c["posthoc_curve"]),
            "", verdict(c)]
