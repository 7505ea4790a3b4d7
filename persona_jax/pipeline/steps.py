"""The persona pipeline as library steps: extract -> steer -> monitor (-> finetune, flag).

Each step writes its artifacts and a `{trait}/{step}.json` summary under the workdir;
a step whose summary exists is skipped, so a killed pipeline resumes where it stopped
(and the generation/judging inside a step resume row by row). `report.json` and
`report.md` are assembled from the step summaries, so they hold exactly what was measured.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Optional, Protocol

import numpy as np

from persona_jax.method import extract as ex
from persona_jax.method import monitor as mon
from persona_jax.method import stats
from persona_jax.method import steer_eval as se
from persona_jax.io.atomic import atomic_open
from persona_jax.errors import PersonaError
from persona_jax.judges.base import Judge
from persona_jax.method.responses import Sampling
from persona_jax.method.traits import Trait, load_trait, system_prompt, trait_paths
from persona_jax.io.distributed import writer_only


class TraitSource(Protocol):
    """Where a pipeline gets everything trait-specific: artifacts, monitoring conditions,
    fine-tuning and flagging datasets, and the content metric of fine-tuning runs
    (`FileTraits` for the reference's files, `OrganismTraits` for the organism)."""

    def extract_trait(self, name: str) -> Trait: ...
    def eval_trait(self, name: str) -> Trait: ...
    def conditions(self, name: str, many_shot=None) -> list[mon.Condition]: ...
    def strongest_pos_system(self, name: str) -> str: ...
    # {label: (jsonl path, trait level or NaN when unknown)}; written under out_dir when made by code
    def finetune_datasets(self, name: str, out_dir: str, cfg) -> dict: ...
    # (jsonl path, per-sample 0/1 labels or None for an unlabelled corpus)
    def flagging_dataset(self, name: str, out_dir: str, cfg) -> tuple: ...
    # a 0..100 measure of what fine-tuning teaches besides the trait (None when there is none)
    def content_metric(self, questions, answers) -> Optional[float]: ...


def first_questions(trait: Trait, n) -> list[str]:
    """The first `n` questions of a trait's split; all of them when n is 0 (the configs' default)."""
    return list(trait.questions)[: int(n)] if n else list(trait.questions)


@dataclasses.dataclass
class FileTraits:
    """Reference layout: `{root}/trait_data_extract/{name}.json`, `{root}/trait_data_eval/{name}.json`.

    Monitoring conditions (`method.conditions`): the graded ladder made from instruction
    pair 0, and many-shot prompts from the extraction step's kept pos responses.
    """

    root: str
    antonym: str = "helpful"

    def extract_trait(self, name):
        return load_trait(trait_paths(self.root, name)[0], name=name)

    def eval_trait(self, name):
        return load_trait(trait_paths(self.root, name)[1], name=name)

    def conditions(self, name, many_shot=None):
        from persona_jax.method.conditions import file_trait_conditions
        return file_trait_conditions(self.extract_trait(name), self.antonym, many_shot)

    def strongest_pos_system(self, name):
        t = self.extract_trait(name)
        return system_prompt(name, name, t.instruction[0]["pos"])

    def finetune_datasets(self, name, out_dir, cfg):
        """{label: (path, level)} from cfg.finetune.dataset_dir (the reference's layout
        `dataset/<name>/{normal,misaligned_1,misaligned_2}.jsonl`, levels 0, 1, 2, in that
        order) and cfg.finetune.datasets ({label: path}, level unknown: NaN)."""
        f = cfg.finetune
        out = {}
        if f.get("dataset_dir", ""):
            out.update(reference_datasets(f.dataset_dir))
        for label, path in dict(f.datasets).items():
            if label in out:
                raise PersonaError(f"finetune.datasets label {label!r} is also a file of finetune.dataset_dir "
                                   f"{f.dataset_dir}; rename it")
            if not os.path.isfile(path):
                raise PersonaError(f"finetune.datasets[{label!r}] = {path} is not a file; give a training JSONL")
            out[label] = (path, float("nan"))
        if not out:
            raise PersonaError("the finetune step needs finetune.dataset_dir (dataset/<name>/ with normal.jsonl, "
                               "misaligned_1.jsonl, misaligned_2.jsonl) or finetune.datasets = {label: path.jsonl}")
        return out

    def flagging_dataset(self, name, out_dir, cfg):
        """cfg.flagging.dataset (JSONL) and, optionally, cfg.flagging.labels (a JSON list of
        0/1, one per sample); (path, None) for an unlabelled corpus."""
        fc = cfg.flagging
        if not fc.dataset:
            raise PersonaError("the flagging step needs flagging.dataset (a JSONL of conversations to screen)")
        if not os.path.isfile(fc.dataset):
            raise PersonaError(f"flagging.dataset {fc.dataset} is not a file; give a JSONL of conversations")
        if not fc.labels:
            return fc.dataset, None
        try:
            with open(fc.labels) as fh:
                labels = json.load(fh)
        except (OSError, ValueError) as e:
            raise PersonaError(f"flagging.labels {fc.labels} is not a readable JSON list ({e})") from None
        if not isinstance(labels, list) or any(x not in (0, 1) for x in labels):
            raise PersonaError(f"flagging.labels {fc.labels} must be a JSON list of 0/1 values, one per sample")
        return fc.dataset, labels

    def content_metric(self, questions, answers):
        return None  # no task-specific content metric for real traits


REFERENCE_DATASET_FILES = ("normal", "misaligned_1", "misaligned_2")  # levels 0, 1, 2


def reference_datasets(directory: str) -> dict:
    """{label: (path, level)} of the reference's `dataset/<name>/` directory, by level."""
    if not os.path.isdir(directory):
        raise PersonaError(f"finetune.dataset_dir {directory} is not a directory; give dataset/<name>/ holding "
                           f"{', '.join(f + '.jsonl' for f in REFERENCE_DATASET_FILES)}")
    paths = {label: os.path.join(directory, f"{label}.jsonl") for label in REFERENCE_DATASET_FILES}
    missing = [os.path.basename(p) for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise PersonaError(f"finetune.dataset_dir {directory} lacks {', '.join(missing)}; the reference's layout is "
                           f"dataset/<name>/{{{','.join(REFERENCE_DATASET_FILES)}}}.jsonl")
    return {label: (path, float(level)) for level, (label, path) in enumerate(paths.items())}


def sampling_from(cfg, seed: int) -> Sampling:
    return Sampling(max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                    top_p=float(cfg.top_p), seed=seed, batch_size=int(cfg.batch_size),
                    chunk_size=int(cfg.chunk_size))


def done_summary(path: str) -> Optional[dict]:
    """The summary a finished step left at `path` (the step is then skipped), or None."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


@writer_only
def write_summary(path: str, data: dict):
    """Write a step summary / report atomically (process 0 only)."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, default=_jsonable)


def resumable_step(filename: str):
    """Make `fn(model, judge, source, name, cfg, workdir, ...) -> summary` a resumable step.

    The step writes its summary to `workdir/<trait>/<filename>` when it finishes and is
    skipped (the summary read back) when that file exists, so a killed run resumes at the
    first unfinished step; `workdir/<trait>/` exists when `fn` runs.
    """
    def wrap(fn):
        @functools.wraps(fn)
        def step(model, judge, source, name, cfg, workdir, *args, **kwargs):
            out = os.path.join(workdir, name, filename)
            if (done := done_summary(out)) is not None:
                return done
            os.makedirs(os.path.join(workdir, name), exist_ok=True)
            summary = fn(model, judge, source, name, cfg, workdir, *args, **kwargs)
            write_summary(out, summary)
            return summary
        return step
    return wrap


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


def _nan_to_none(values):
    return [None if (v is None or (isinstance(v, float) and np.isnan(v))) else float(v) for v in values]


@resumable_step("extract.json")
def step_extract(model, judge: Judge, source: TraitSource, name: str, cfg, workdir: str, progress=True) -> dict:
    d = os.path.join(workdir, name)
    trait = source.extract_trait(name)
    e = cfg.extract
    pos_rows, neg_rows = ex.sample_contrastive(model, judge, trait, d, sampling_from(e, cfg.seed),
                                               int(e.n_per_question), antonym=cfg.antonym, progress=progress)
    vectors, stats = ex.vectors_from_rows(model, pos_rows, neg_rows, name,
                                          ex.FilterRule(float(e.threshold), float(e.coherence_threshold)),
                                          batch_size=int(e.capture_batch_size), progress=progress,
                                          where=" / ".join(ex.csv_paths(d, name)))
    paths = ex.save_vectors(vectors, d, name, model.name, stats["n_kept"], config=e.to_dict())
    return {**stats, "vectors": paths,
            "vector_norms": {r: np.linalg.norm(v, axis=-1).round(4).tolist() for r, v in vectors.items()}}


def load_step_vector(workdir, name, reduction, model):
    """The `{trait}_{reduction}_diff.pt` the extract step wrote, checked against the model."""
    from persona_jax.io.vectors import check_vector_shape, import_pt, vector_filename
    v = import_pt(os.path.join(workdir, name, vector_filename(name, reduction, ".pt")))
    check_vector_shape(v, model.num_layers, model.hidden_size, f"{name} {reduction} vector")
    return v


@resumable_step("steer.json")
def step_steer(model, judge: Judge, source: TraitSource, name: str, cfg, workdir: str, progress=True) -> dict:
    s = cfg.steer
    d = os.path.join(workdir, name)
    trait = source.eval_trait(name)
    questions = first_questions(trait, s.n_questions)
    vector = load_step_vector(workdir, name, s.reduction, model)
    sampling = sampling_from(s, cfg.seed + 1)
    layers = [int(l) for l in s.layers] or list(range(1, model.num_layers + 1))
    coefs = sorted(float(c) for c in s.coefs)
    if 0.0 not in coefs:
        coefs = [0.0] + coefs
    kw = dict(judge=judge, trait=name, eval_prompt=trait.eval_prompt, sampling=sampling,
              n_per_question=int(s.n_per_question), positions=s.positions, progress=progress)
    grid = se.sweep(model, vector, questions, layers, coefs, csv_path=os.path.join(d, "steer_sweep.csv"), **kw)
    baseline = float(np.nanmean(grid.trait[:, coefs.index(0.0)]))
    layer, best_coef, gain = grid.best(baseline, float(s.coherence_floor))
    if layer is None:  # nothing coherent enough: report the layer with the highest trait anyway
        i = int(np.nanargmax(np.nanmax(grid.trait, axis=1)))
        layer, best_coef, gain = layers[i], coefs[int(np.nanargmax(grid.trait[i]))], float("nan")
    li = layers.index(layer)
    from persona_jax.pipeline import capability_step  # issue 18: capability at the chosen layer
    capability = capability_step.steering_capability(model, source, name, cfg, workdir, vector, layer, coefs, progress)
    se.plot_sweep(grid, os.path.join(d, "steering.png"), f"{name} ({s.reduction})",
                  capability=(layer, capability["capability"]) if capability else None)

    # Controls at the chosen layer: a random vector of the same norm, and negative steering
    # under the strongest pos system prompt.
    rand = se.sweep(model, se.random_like(vector, cfg.seed), questions, [layer], [best_coef],
                    csv_path=os.path.join(d, "steer_random.csv"), **kw)
    neg_coefs = [0.0] + [-c for c in coefs if c > 0]
    neg = se.sweep(model, vector, questions, [layer], sorted(neg_coefs, reverse=True),
                   csv_path=os.path.join(d, "steer_negative.csv"), system=source.strongest_pos_system(name), **kw)
    # monotonicity over coefficients 0 .. the largest whose coherence stays above the floor
    coherent = [j for j, h in enumerate(grid.coherence[li]) if h >= float(s.coherence_floor)]
    upto = list(range(max(coherent) + 1)) if coherent else []
    monotone = (stats.spearman([coefs[j] for j in upto], [grid.trait[li, j] for j in upto])
                if len(upto) >= 3 else float("nan"))
    neg_base = float(neg.trait[0, 0])
    _, neg_coef, neg_gain = neg.best(neg_base, float(s.coherence_floor), sign=-1.0)
    return {
        "reduction": s.reduction,
        "layer": int(layer),
        "baseline": baseline,
        "coefs": coefs,
        "trait_scores": _nan_to_none(grid.trait[li]),
        "coherence": _nan_to_none(grid.coherence[li]),
        "best_coef": best_coef,
        "best_gain": None if np.isnan(gain) else float(gain),
        "monotone_spearman": None if np.isnan(monotone) else monotone,
        "n_coherent_coefs": len(upto),
        "coherence_floor": float(s.coherence_floor),
        "grid": {"layers": layers, "trait": grid.trait.tolist(), "coherence": grid.coherence.tolist()},
        "random_vector_delta": float(rand.trait[0, 0] - baseline),
        "random_vector_coherence": float(rand.coherence[0, 0]),
        "negative": {"system": source.strongest_pos_system(name), "coefs": neg.coefs,
                     "trait_scores": _nan_to_none(neg.trait[0]), "coherence": _nan_to_none(neg.coherence[0])},
        "negative_delta": None if neg_coef is None else -float(neg_gain),
        "negative_coef": neg_coef,
        **capability,
    }


@resumable_step("monitor.json")
def step_monitor(model, judge: Judge, source: TraitSource, name: str, cfg, workdir: str, layer: int,
                 progress=True) -> dict:
    m = cfg.monitor
    d = os.path.join(workdir, name)
    trait = source.eval_trait(name)
    questions = first_questions(trait, m.n_questions)
    vector = load_step_vector(workdir, name, m.reduction, model)
    from persona_jax.method.conditions import SHOTS, ManyShotSource
    rule = ex.FilterRule(float(cfg.extract.threshold), float(cfg.extract.coherence_threshold))
    many_shot = ManyShotSource(*ex.csv_paths(d, name), rule, tuple(m.get("shots", SHOTS)), int(cfg.seed))
    result = mon.run_conditions(model, vector, layer, source.conditions(name, many_shot), questions, judge, name,
                                trait.eval_prompt, os.path.join(d, "monitor.csv"), sampling_from(m, cfg.seed + 2),
                                int(m.n_per_question), progress=progress)
    mon.plot_monitor(result, os.path.join(d, "monitoring.png"), name)
    return result


def _fmt(x, nd=1):
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


@writer_only
def write_markdown(report: dict, path: str):
    lines = ["# Persona pipeline report", "", f"Model: `{report['model']}`", ""]
    if report.get("folds_system_prompt"):
        lines += ["The model's chat template rejects a system role: every system prompt (the contrastive "
                  "instructions included) was folded into the first user turn.", ""]
    lines += ["| trait | kept pairs | layer | baseline | best gain (coef) | random delta | negative delta | monitor r (n) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, e in report["traits"].items():
        ext, st, mo = e.get("extraction", {}), e.get("steering", {}), e.get("monitoring", {})
        lines.append(
            f"| {name} | {_fmt(100 * ext['kept_fraction'], 0) + '%' if ext else 'n/a'} | {e.get('layer')} | "
            f"{_fmt(st.get('baseline'))} | {_fmt(st.get('best_gain'))} ({st.get('best_coef', 'n/a')}) | "
            f"{_fmt(st.get('random_vector_delta'))} | {_fmt(st.get('negative_delta'))} | "
            f"{_fmt(mo.get('pearson_r'), 3)} ({mo.get('n_conditions', 'n/a')}) |")
    for name, e in report["traits"].items():
        st = e.get("steering")
        lines += ["", f"## {name}", ""]
        if st:
            from persona_jax.pipeline.capability_step import markdown_column
            cap = markdown_column(st)  # capability (percent correct) per coefficient, when measured
            lines += [f"Steering with the `{st['reduction']}` vector at layer {st['layer']}, no system prompt:", "",
                      "| coef | trait | coherence |" + (" capability |" if cap else ""),
                      "|---|---|---|" + ("---|" if cap else "")]
            lines += [f"| {c:g} | {_fmt(t)} | {_fmt(h)} |" + (f" {cap[j]} |" if cap else "")
                      for j, (c, t, h) in enumerate(zip(st["coefs"], st["trait_scores"], st["coherence"]))]
            lines += ["", f"![steering]({name}/steering.png)"]
        if e.get("monitoring"):
            mo = e["monitoring"]
            lines += ["", f"Monitoring at layer {mo['layer']}: Pearson r of the last-prompt-token projection and the "
                      f"trait score over condition means {_fmt(mo.get('pearson_r'), 3)}, over (condition, question) "
                      f"points {_fmt(mo.get('pearson_r_points'), 3)}, within a condition (mean) "
                      f"{_fmt(mo.get('pearson_r_within'), 3)}.",
                      "", f"![monitoring]({name}/monitoring.png)"]
        for step in e:
            if step not in ("extraction", "steering", "monitoring", "layer") and isinstance(e[step], dict) and "markdown" in e[step]:
                lines += ["", e[step]["markdown"]]
    if report.get("cross_trait"):  # the dataset x trait matrix (pipeline/cross_trait.py)
        lines += ["", report["cross_trait"]["markdown"]]
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")
