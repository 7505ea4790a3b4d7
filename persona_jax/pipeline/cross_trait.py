"""Cross-trait effects of fine-tuning (issue 18; METHOD.md 11): every fine-tuned model
scored on every trait of the config, and the fine-tuning shift along every trait's vector.

`registry.run` calls `run` once every trait's steps are done (the other traits' vectors and
layers exist only then). For each trait `t` with a finetune summary, the model fine-tuned on
`t`'s full dataset (its `prevent_dataset`; the finished checkpoint is restored, nothing is
retrained) answers every trait `u`'s evaluation questions with no system prompt, judged on
`u`'s rubric, into `{u}/finetune/eval_{dataset}.csv` (the file `u`'s own step writes for a
dataset it shares, so a shared dataset is generated and judged once). `traits.<t>.finetune`
gains:

* `cross_trait`: {u: judge mean of trait u} on that model;
* `cross_trait_before` {u: base score}, `cross_trait_change`, `cross_trait_coherence`;
* `cross_trait_shift` / `cross_trait_shift_response_avg`: {u: (mean activation of the
  fine-tuned - base model at u's layer) projected on u's unit vector}, the step's own
  shift, now for every trait;
* `cross_trait_dataset`: the dataset's label.

Each trait's result is also written to `{t}/cross_trait.json` (reused when the same traits
and dataset come back). `report["cross_trait"]` is the dataset x trait matrix: one row per
dataset scored on every trait (each trait's full dataset, and every dataset all traits
share, e.g. real datasets given as `finetune.datasets`), plus the base model's row; the
heatmap is `cross_trait.png` in the workdir, and report.md holds both matrices.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from persona_jax.io.distributed import writer_only
from persona_jax.method.shift import finetuning_shift
from persona_jax.pipeline import finetune_steps as fs
from persona_jax.pipeline import steps as pl

PNG = "cross_trait.png"


def _evaluate(model, judge, source, cfg, workdir, trait: str, label: str, layer: int, progress: bool) -> dict:
    """`finetune_steps.evaluate` of `model` on `trait`, CSV `{trait}/finetune/eval_{label}.csv`."""
    t = source.eval_trait(trait)
    d = os.path.join(workdir, trait, "finetune")
    os.makedirs(d, exist_ok=True)
    return fs.evaluate(model, judge, source, trait, pl.first_questions(t, cfg.finetune.n_questions), t.eval_prompt,
                       os.path.join(d, f"eval_{label}.csv"), cfg, layer, progress=progress)


def _one(model, judge, source, cfg, workdir, name: str, report: dict, base: dict, progress: bool) -> dict:
    """The cross-trait fields of trait `name` (see the module docstring)."""
    traits = list(cfg.traits)
    entries = report["traits"]
    ft = entries[name]["finetune"]
    label = ft["prevent_dataset"]
    out_path = os.path.join(workdir, name, "cross_trait.json")
    done = pl.done_summary(out_path)
    if done is not None and done.get("traits") == traits and done.get("cross_trait_dataset") == label:
        return done
    f = cfg.finetune
    datasets = source.finetune_datasets(name, os.path.join(workdir, name, "finetune", "data"), cfg)
    path = datasets[label][0]
    tuned = fs.finetune_model(model, path, cfg, fs.dataset_model_dir(workdir, label, path))  # restores
    res = {k: {} for k in ("cross_trait", "cross_trait_before", "cross_trait_change", "cross_trait_coherence",
                           "cross_trait_shift", "cross_trait_shift_response_avg")}
    for u in traits:
        layer = int(entries[u]["layer"])
        if u not in base:
            base[u] = _evaluate(model, judge, source, cfg, workdir, u, "base", layer, progress)
        r = _evaluate(tuned, judge, source, cfg, workdir, u, label, layer, progress)
        vector = pl.load_step_vector(workdir, u, f.reduction, model)
        shift = finetuning_shift({k: np.asarray(v) for k, v in base[u]["means"].items()},
                                 {k: np.asarray(v) for k, v in r["means"].items()}, vector, layer)
        res["cross_trait"][u] = r["trait"]
        res["cross_trait_before"][u] = base[u]["trait"]
        res["cross_trait_change"][u] = None if r["trait"] is None or base[u]["trait"] is None \
            else r["trait"] - base[u]["trait"]
        res["cross_trait_coherence"][u] = r["coherence"]
        res["cross_trait_shift"][u] = shift["prompt_last"]
        res["cross_trait_shift_response_avg"][u] = shift["response_avg"]
        logging.info("cross-trait: %s-tuned model (%s) on %s: trait %s, shift %.4g", name, label, u, r["trait"],
                     shift["prompt_last"])
    del tuned
    res.update({"cross_trait_dataset": label, "traits": traits})
    pl.write_summary(out_path, res)
    return res


def matrix(report: dict, traits) -> dict | None:
    """The dataset x trait matrices (score, shift) from the finetune summaries: rows are the
    datasets with a score on every trait, from the cross-trait fields or from a trait's own
    runs of a dataset it shares; first the base model's scores."""
    traits = list(traits)
    fts = {u: report["traits"].get(u, {}).get("finetune") for u in traits}
    if not all(fts.values()):
        return None
    cells: dict = {}  # label -> {u: (score, shift)}
    for u, ft in fts.items():
        for label, r in ft.get("datasets", {}).items():
            cells.setdefault(label, {})[u] = (r["trait"], r["shift_prompt_last"])
    for t, ft in fts.items():
        if "cross_trait" in ft:
            row = cells.setdefault(ft["cross_trait_dataset"], {})
            for u in traits:
                row[u] = (ft["cross_trait"][u], ft["cross_trait_shift"][u])
    rows = [label for label, row in cells.items() if all(u in row for u in traits)]
    if not rows:
        return None
    return {"traits": traits, "datasets": rows,
            "base": [fts[u]["trait_before"] for u in traits],
            "scores": [[cells[label][u][0] for u in traits] for label in rows],
            "shift_prompt_last": [[cells[label][u][1] for u in traits] for label in rows],
            "png": PNG}


@writer_only
def plot(m: dict, path: str) -> None:
    """Heatmaps: trait score (base row first) and fine-tuning shift, dataset x trait."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nan = lambda rows: np.array([[np.nan if v is None else v for v in r] for r in rows], float)
    scores = nan([m["base"]] + m["scores"])
    shifts = nan(m["shift_prompt_last"])
    n_t, n_d = len(m["traits"]), len(m["datasets"])
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.4 * n_t, 1.5 + 0.55 * (n_d + 1)), squeeze=False)
    lim = float(np.nanmax(np.abs(shifts))) if np.isfinite(shifts).any() else 1.0
    panels = ((axes[0, 0], scores, ["base (not fine-tuned)"] + m["datasets"], "trait score (judge mean)",
               dict(cmap="viridis", vmin=0, vmax=100), "{:.1f}"),
              (axes[0, 1], shifts, m["datasets"], "shift along the trait's vector",
               dict(cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1), "{:.3g}"))
    for ax, data, ylabels, title, kw, fmt in panels:
        im = ax.imshow(data, aspect="auto", **kw)
        ax.set_xticks(range(n_t), m["traits"])
        ax.set_yticks(range(len(ylabels)), ylabels)
        ax.set_xlabel("trait scored")
        ax.set_ylabel("fine-tuning dataset")
        ax.set_title(title, fontsize=10)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, "n/a" if np.isnan(data[i, j]) else fmt.format(data[i, j]), ha="center", va="center",
                        fontsize=8, color=_text_colour(data[i, j], kw))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _text_colour(v: float, kw: dict) -> str:
    """White on the dark end of each colour map, black elsewhere."""
    if np.isnan(v):
        return "black"
    if kw["cmap"] == "viridis":
        return "white" if v < 60 else "black"
    return "white" if abs(v) > 0.6 * kw["vmax"] else "black"


def markdown(m: dict) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.1f}"
    g = lambda x: "n/a" if x is None else f"{x:.3g}"
    head = "| fine-tuned on | " + " | ".join(m["traits"]) + " |"
    sep = "|---|" + "---|" * len(m["traits"])
    lines = ["## Cross-trait effects of fine-tuning", "",
             "Each model fine-tuned on one dataset, scored on every trait (judge mean over that trait's "
             "evaluation questions, no system prompt):", "", head, sep,
             "| base (not fine-tuned) | " + " | ".join(f(x) for x in m["base"]) + " |"]
    lines += [f"| {label} | " + " | ".join(f(x) for x in row) + " |" for label, row in zip(m["datasets"], m["scores"])]
    lines += ["", "Fine-tuning shift along each trait's vector (mean `prompt_last` activation of the fine-tuned "
                  "minus the base model at that trait's layer, projected on its unit vector):", "", head, sep]
    lines += [f"| {label} | " + " | ".join(g(x) for x in row) + " |"
              for label, row in zip(m["datasets"], m["shift_prompt_last"])]
    lines += ["", f"![cross-trait]({m['png']})"]
    return "\n".join(lines)


def run(model, judge, source, cfg, workdir: str, report: dict, progress: bool = True) -> None:
    """Fill `traits.<t>.finetune.cross_trait*` for every trait with a finetune summary, and
    `report["cross_trait"]` (matrix, markdown; heatmap in `cross_trait.png`)."""
    base: dict = {}  # trait -> the base model's evaluation (shared by every fine-tuned model)
    for name in cfg.traits:
        ft = report["traits"].get(name, {}).get("finetune")
        if ft:
            res = _one(model, judge, source, cfg, workdir, name, report, base, bool(progress))
            ft.update({k: v for k, v in res.items() if k != "traits"})
    m = matrix(report, cfg.traits)
    if m is not None:
        plot(m, os.path.join(workdir, PNG))
        m["markdown"] = markdown(m)
        report["cross_trait"] = m
