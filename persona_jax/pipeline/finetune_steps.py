"""Pipeline steps of METHOD.md 8-9: fine-tuning shift, preventative steering, CAFT,
post-hoc mitigation, and flagging data before training.

`pipeline/registry.py` runs them after extract, steer and monitor (the `finetune` and
`flagging` steps of a config). Datasets and the content metric come from the trait source
(`finetune_datasets`, `flagging_dataset`, `content_metric`), so the organism and real
models share this code. Every run writes a `{trait}/finetune.json` / `flagging.json`
summary, so a killed pipeline resumes at the first unfinished step; each training run
checkpoints under its own workdir and resumes too. The plain fine-tune on a dataset trains
in `{workdir}/finetune_models/` (`dataset_model_dir`), shared by every trait: a dataset
several traits use is trained once. Capability of every run: `finetune_capability.py`;
every fine-tuned model scored on every trait: `cross_trait.py` (after all traits).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.method import flagging as fl
from persona_jax.method import screening as sc
from persona_jax.io.jsonl import write_jsonl
from persona_jax.pipeline import steps as pl
from persona_jax.io.distributed import writer_only
from persona_jax.errors import PersonaError
from persona_jax.finetune import data as fdata
from persona_jax.pipeline import setup
from persona_jax.finetune.trainer import train
from persona_jax.model.checkpoint import Model
from persona_jax.method.stats import auroc, pearson, spearman
from persona_jax.method.projection import read_jsonl_conversations
from persona_jax.method.responses import Spec, mean, sample_and_judge, scores
from persona_jax.method.shift import finetuning_shift, mean_activations
from persona_jax.method.steer_eval import conversation
from persona_jax.steering.spec import Steering, every_layer, incremental_steering


def evaluate(model, judge, source, name: str, questions: Sequence[str], eval_prompt: str, csv_path: str, cfg,
             layer: int, steering: Optional[Sequence[Steering]] = None, progress=True) -> dict:
    """No-system-prompt answers to the evaluation questions: mean trait, coherence, content
    metric, and mean activations at `layer` (for the fine-tuning shift)."""
    f = cfg.finetune
    specs = [Spec(q, model.render_chat(conversation(q)), f"{name}_{i}_{r}")
             for i, q in enumerate(questions) for r in range(int(f.eval_n_per_question))]
    sampling = dataclasses.replace(pl.sampling_from(f, cfg.seed + 3), batch_size=int(f.batch_size_generate))
    rows = sample_and_judge(model, specs, csv_path, name, sampling, judge, eval_prompt,
                            (lambda chunk: steering) if steering else None, progress=progress)
    qs, ans = [r["question"] for r in rows], [r["answer"] for r in rows]
    means = mean_activations(model, [r["prompt"] for r in rows], ans, layer)
    return {"trait": mean(scores(rows, name, csv_path)), "coherence": mean(scores(rows, "coherence", csv_path)),
            "content": source.content_metric(qs, ans), "means": {k: v.tolist() for k, v in means.items()}}


def finetune_model(model: Model, jsonl: str, cfg, workdir: str, steerings=None) -> Model:
    """Fine-tune (full or LoRA, per cfg.finetune.method) on a reference JSONL; returns the tuned Model."""
    f = cfg.finetune
    examples, stats = fdata.load_jsonl(jsonl, model.require_tokenizer(), max_length=int(f.max_length),
                                       overflow=f.overflow)
    if stats.n_truncated or stats.n_dropped:
        logging.warning("%s: %d truncated, %d dropped (max_length %d)", jsonl, stats.n_truncated, stats.n_dropped,
                        f.max_length)
    result = train(model.config, model.params, examples, setup.train_config(f, cfg.seed), lora=setup.lora_config(f),
                   steerings=steerings, mesh=model.mesh, workdir=workdir, pad_id=model.pad_token_id)
    return dataclasses.replace(model, params=result.merged_params(), name=f"{model.name}+{os.path.basename(workdir)}")


def dataset_model_dir(workdir: str, label: str, path: str) -> str:
    """Training directory of the plain fine-tune on one dataset, shared by every trait:
    `{workdir}/finetune_models/{label}-{content hash}`, so a dataset several traits use is
    trained once (a later trait's step restores the finished checkpoint)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return os.path.join(workdir, "finetune_models", f"{label}-{h.hexdigest()[:12]}")


def preventative_steerings(f, vector, layer: int, num_layers: int) -> tuple[list, list, list[int]]:
    """(preventative steering, CAFT ablation, their layers) of the finetune config `f`, the
    variants of `experiments/finetune.py`: the chosen layer, `preventative_layers` (a tuple
    of hidden-state indices) or every layer 1..L (`preventative_all_layers`), with the
    increments v[l] - v[l-1] when `preventative_incremental` (the paper's appendix J.3).
    Both act at every position while training."""
    layers = (every_layer(num_layers) if f.get("preventative_all_layers", False)
              else sorted({int(x) for x in (f.get("preventative_layers") or ())}) or [int(layer)])
    bad = [l for l in layers if not 1 <= l <= num_layers]
    if bad:
        raise PersonaError(f"finetune.preventative_layers {bad} are outside 1..{num_layers}, the hidden states "
                           "after each block")
    at = layers if len(layers) > 1 else layers[0]
    coef = float(f.preventative_coef)
    if f.get("preventative_incremental", False):
        prevent = incremental_steering(vector, layers, coef, positions="all")
    else:
        prevent = Steering(vector, at, coef, positions="all")
    return [prevent], [Steering(vector, at, 1.0, positions="all", kind="ablate")], layers


@pl.resumable_step("finetune.json")
def step_finetune(model, judge, source, name, cfg, workdir, entry) -> dict:
    """Base eval, one fine-tune per dataset (shift vs trait change), preventative steering
    and CAFT on the most trait-heavy dataset, post-hoc steering of that fine-tuned model;
    with capability items (`capability.data` or the source's own task), `capability`:
    percent correct before, after, preventative, CAFT and post-hoc (`finetune_capability`)."""
    f = cfg.finetune
    d = os.path.join(workdir, name, "finetune")
    os.makedirs(d, exist_ok=True)
    layer = int(entry["layer"])
    vector = pl.load_step_vector(workdir, name, f.reduction, model)
    trait = source.eval_trait(name)
    questions = pl.first_questions(trait, f.n_questions)
    datasets = source.finetune_datasets(name, os.path.join(d, "data"), cfg)  # {label: (path, fraction)}
    ev = lambda m, label, steering=None: evaluate(m, judge, source, name, questions, trait.eval_prompt,
                                                  os.path.join(d, f"eval_{label}.csv"), cfg, layer, steering,
                                                  progress=bool(cfg.progress))
    prev_steer, caft_steer, prev_layers = preventative_steerings(f, vector, layer, model.num_layers)
    named = str(f.get("prevent_dataset", "") or "")
    if named and named not in datasets:
        raise PersonaError(f"finetune.prevent_dataset {named!r} is not one of the datasets ({', '.join(datasets)})")
    base = ev(model, "base")
    base_means = {k: np.asarray(v) for k, v in base["means"].items()}
    from persona_jax.pipeline import finetune_capability as fcap  # issue 18: capability of every model
    cap_items = fcap.items(source, cfg)
    recorder = fcap.Recorder(cap_items, cfg) if cap_items else None
    progress = bool(cfg.progress)
    caps = {"before": recorder.score(model, "before", progress=progress)[0]} if recorder else {}
    runs = {}
    tuned_full, full_label = None, None
    for label, (path, fraction) in datasets.items():
        tuned = finetune_model(model, path, cfg, dataset_model_dir(workdir, label, path))
        r = ev(tuned, label)
        shift = finetuning_shift(base_means, {k: np.asarray(v) for k, v in r["means"].items()}, vector, layer)
        runs[label] = {"fraction": _none_if_nan(fraction), "trait": r["trait"], "coherence": r["coherence"],
                       "content": r["content"], "trait_change": _diff(r["trait"], base["trait"]),
                       "shift_prompt_last": shift["prompt_last"], "shift_response_avg": shift["response_avg"]}
        if full_label is None or _prefer(label, runs, datasets, named, full_label):
            tuned_full, full_label = tuned, label  # only the chosen model is kept in memory
        del tuned
    full = runs[full_label]
    full_path = datasets[full_label][0]

    m = finetune_model(model, full_path, cfg, os.path.join(d, "train_preventative"), prev_steer)
    prevented = ev(m, "preventative")
    if recorder:
        caps["preventative"] = recorder.score(m, "preventative", progress=progress)[0]
    m = finetune_model(model, full_path, cfg, os.path.join(d, "train_caft"), caft_steer)
    caft = ev(m, "caft")
    if recorder:
        caps["caft"] = recorder.score(m, "caft", progress=progress)[0]
    del m

    # Post-hoc: steer the fine-tuned model against the vector while generating.
    posthoc = []
    for c in f.posthoc_coefs:
        r = ev(tuned_full, f"posthoc_{c:g}", [Steering(vector, layer, -float(c), positions=f.posthoc_positions)])
        posthoc.append({"coef": -float(c), "trait": r["trait"], "coherence": r["coherence"]})
    ok = [p["trait"] for p in posthoc if p["coherence"] is not None and p["coherence"] >= float(f.coherence_floor)
          and p["trait"] is not None]
    if recorder:  # the fine-tuned model at coefficient 0 ("after") and at every post-hoc coefficient
        sweep = recorder.score(tuned_full, "posthoc", vector, layer, [0.0] + [p["coef"] for p in posthoc],
                               positions=str(f.posthoc_positions), progress=progress)
        best_coef = next((p["coef"] for p in posthoc if ok and p["trait"] == min(ok) and p["coherence"] is not None
                          and p["coherence"] >= float(f.coherence_floor)), None)
        capability = fcap.summary(caps["before"], sweep[0], caps["preventative"], caps["caft"], posthoc, sweep[1:],
                                  full["trait"], full["coherence"], prevented["trait"], best_coef,
                                  str(cfg.capability.scoring), len(cap_items))
        recorder.write(os.path.join(d, "capability.csv"))
    rise = _diff(full["trait"], base["trait"])
    rise = 0.0 if rise is None else rise
    labels = [k for k in runs if runs[k]["trait_change"] is not None]
    summary = {
        "layer": layer, "reduction": f.reduction, "method": f.method,
        "prevent_dataset": full_label,
        "prevent_dataset_rule": ("named in the config" if named else "highest trait fraction"
                                 if _all_known(datasets) else "highest measured trait"),
        "trait_before": base["trait"], "coherence_before": base["coherence"], "content_before": base["content"],
        "trait_after": full["trait"], "content_metric": full["content"], "coherence_after": full["coherence"],
        "trait_after_preventative": prevented["trait"], "content_metric_preventative": prevented["content"],
        "coherence_preventative": prevented["coherence"], "preventative_coef": float(f.preventative_coef),
        "preventative_layers": prev_layers, "preventative_incremental": bool(f.get("preventative_incremental", False)),
        "prevented_fraction": None if rise <= 0 or prevented["trait"] is None else (full["trait"] - prevented["trait"]) / rise,
        "trait_after_caft": caft["trait"], "content_metric_caft": caft["content"], "coherence_caft": caft["coherence"],
        "caft_prevented_fraction": None if rise <= 0 or caft["trait"] is None else (full["trait"] - caft["trait"]) / rise,
        "posthoc": posthoc, "posthoc_best": min(ok) if ok else None,
        "datasets": runs,
        "shift_trait_r": pearson([runs[k]["shift_prompt_last"] for k in labels], [runs[k]["trait_change"] for k in labels]),
        "shift_trait_r_response_avg": pearson([runs[k]["shift_response_avg"] for k in labels],
                                              [runs[k]["trait_change"] for k in labels]),
    }
    if recorder:
        summary["capability"] = capability
    summary["markdown"] = _markdown(name, summary)
    return summary


def _none_if_nan(x):
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def _diff(a, b):
    return None if a is None or b is None else a - b


def _all_known(datasets) -> bool:
    return all(not np.isnan(fr) for _, fr in datasets.values())


def _prefer(label, runs, datasets, named, current) -> bool:
    """Whether `label` replaces `current` as the dataset for prevention / post-hoc: the one
    named in the config; else the highest trait fraction (or level) when every dataset has
    one; else the highest measured trait after fine-tuning (a missing trait never wins)."""
    if named:
        return label == named
    if _all_known(datasets):
        return datasets[label][1] > datasets[current][1]
    new, cur = runs[label]["trait"], runs[current]["trait"]
    return new is not None and (cur is None or new > cur)


# Files of the flagging step: written by process 0 only, the others wait (multi-host rule).
_write_flagged_csv = writer_only(fl.write_flagged_csv)
_filter_jsonl = writer_only(fl.filter_jsonl)


@pl.resumable_step("flagging.json")
def step_flagging(model, judge, source, name, cfg, workdir, entry) -> dict:
    """Projection difference per sample of the flagging dataset: `flagged.csv` (the scores),
    the ranking by delta, `cleaned.jsonl` without the top samples, AUROC when the source
    gives labels; after the finetune step, the dataset-level ranking of its datasets.

    The screening filters of `experiments/screen_data.py` (METHOD.md 9, the paper's
    appendix K), from the `flagging` config: `delta` = prompt_last scores without
    generating; `reference` (a clean JSONL) calibrates the thresholds at its `percentile`
    unless `delta_threshold` / `judge_threshold` are given; `judge_filter` scores each
    dataset response with the trait's rubric. Each filter writes `filtered_{filter}.jsonl`
    (judge, delta, combined) and its counts (precision and recall with labels)."""
    f = cfg.flagging
    d = os.path.join(workdir, name, "flagging")
    os.makedirs(d, exist_ok=True)
    layer = int(entry["layer"])
    vector = pl.load_step_vector(workdir, name, f.reduction, model)
    path, labels = source.flagging_dataset(name, d, cfg)
    records = read_jsonl_conversations(path)
    if labels is not None and len(labels) != len(records):
        raise PersonaError(f"{len(labels)} flagging labels for the {len(records)} samples of {path}; give one 0/1 per sample")
    delta_kind = str(f.get("delta", "response_avg"))
    if delta_kind not in ("response_avg", "prompt_last"):
        raise PersonaError(f"flagging.delta must be response_avg or prompt_last; got {delta_kind!r}")
    reference = None
    if f.get("reference"):
        if not os.path.isfile(f.reference):
            raise PersonaError(f"flagging.reference {f.reference} is not a file; give a clean JSONL of conversations")
        reference = read_jsonl_conversations(f.reference)
    kw = dict(max_new_tokens=int(f.max_new_tokens), temperature=float(f.temperature), seed=cfg.seed,
              batch_size=int(f.batch_size))
    kw["progress"] = bool(cfg.progress)

    def screen(recs):
        if delta_kind == "prompt_last":
            return fl.prompt_last_difference(model, recs, vector, layer, batch_size=kw["batch_size"],
                                             progress=kw["progress"])
        return fl.projection_difference(model, recs, vector, layer, **kw)

    def chosen(r):
        return np.asarray(r.delta if delta_kind == "response_avg" else r.delta_prompt_last, float)

    res = screen(records)
    delta = chosen(res)
    order = np.argsort(-np.nan_to_num(delta, nan=-np.inf), kind="stable")
    summary = {"layer": layer, "dataset": path, "n": len(records), "delta": delta_kind,
               "mean_delta": float(np.nanmean(delta)) if np.isfinite(delta).any() else None,
               "ranking": [int(i) for i in order],  # sample indices, largest projection difference first
               "flagged_csv": os.path.join(d, "flagged.csv"), "cleaned_jsonl": os.path.join(d, "cleaned.jsonl")}
    if labels is not None:
        summary.update({"n_flagged": int(sum(labels)), "auroc": auroc(delta, labels),
                        "auroc_raw_projection": auroc(res.dataset_proj, labels)})
    # the judge filter: the trait rubric's score of each dataset response
    scores_ = None
    if f.get("judge_filter", False):
        trait = source.eval_trait(name)
        scores_ = sc.judge_scores(judge, name, trait.eval_prompt, records)
    thresholds = {"delta": f.get("delta_threshold"), "judge": f.get("judge_threshold")}
    if reference is not None:
        percentile = float(f.get("percentile", 95.0))
        ref_delta = chosen(screen(reference))
        summary["reference"] = {"path": f.reference, "n": len(reference), "percentile": percentile,
                                "mean_delta": float(np.nanmean(ref_delta))}
        if thresholds["delta"] is None:
            thresholds["delta"] = sc.calibrate_threshold(ref_delta, percentile, "reference projection differences")
        if scores_ is not None and thresholds["judge"] is None:
            ref_scores = sc.judge_scores(judge, name, source.eval_trait(name).eval_prompt, reference)
            thresholds["judge"] = sc.calibrate_threshold(ref_scores, percentile, "reference judge scores")
    masks = sc.filter_masks(delta, scores_, thresholds["delta"], thresholds["judge"])
    if masks:
        summary["thresholds"] = thresholds
        summary["filters"] = sc.filter_summary(masks)
        for key, m in masks.items():
            summary["filters"][key]["jsonl"] = os.path.join(d, f"filtered_{key}.jsonl")
            write_jsonl(summary["filters"][key]["jsonl"],
                        [{"messages": r["messages"]} for r, drop in zip(records, m) if not drop])
            if labels is not None:
                y = np.asarray(labels, bool)
                summary["filters"][key].update(precision=float(y[m].mean()) if m.any() else None,
                                               recall=float(m[y].mean()) if y.any() else None)
    if scores_ is not None:
        summary["mean_judge"] = float(np.nanmean(scores_)) if np.isfinite(scores_).any() else None
    _write_flagged_csv(summary["flagged_csv"], res, labels)  # per sample, for inspection
    drop = float(np.mean(labels)) if labels is not None else float(f.get("drop_fraction", 0.1))
    cleaned = _filter_jsonl(path, summary["cleaned_jsonl"], dataclasses.replace(res, delta=delta),
                            drop_fraction=drop)
    if cleaned is not None:  # process 0 (the one that writes the summary)
        summary["filter"] = {k: v for k, v in cleaned.items() if k != "dropped_indices"}
        summary["filter"]["drop_fraction"] = drop
        if labels is not None:
            summary["filter"]["precision"] = (float(np.mean([labels[i] for i in cleaned["dropped_indices"]]))
                                              if cleaned["dropped"] else None)
    # Dataset level: mean projection difference of each fine-tuning dataset vs its trait after fine-tuning.
    ft = entry.get("finetune")
    if ft:
        datasets = source.finetune_datasets(name, os.path.join(workdir, name, "finetune", "data"), cfg)
        means, after = [], []
        for label, (p, _) in datasets.items():
            recs = read_jsonl_conversations(p)[: int(f.dataset_samples)]
            means.append(float(np.nanmean(chosen(screen(recs)))))
            after.append(ft["datasets"][label]["trait"])
        summary["dataset_mean_delta"] = dict(zip(datasets, means))
        summary["dataset_rank_spearman"] = spearman(means, [np.nan if a is None else a for a in after])
    summary["markdown"] = _flag_markdown(name, summary)
    return summary


def _flag_markdown(name, s) -> str:
    mean = "n/a" if s["mean_delta"] is None else f"{s['mean_delta']:.4g}"
    lines = [f"### {name}: flagging `{s['dataset']}` (layer {s['layer']}, {s['n']} samples, "
             f"{s.get('delta', 'response_avg')} delta)", "",
             f"Mean projection difference {mean}; per-sample scores in `{name}/flagging/flagged.csv`; "
             f"top samples by delta: {', '.join(str(i) for i in s['ranking'][:10])}."]
    if "filter" in s:
        lines.append(f"`{name}/flagging/cleaned.jsonl` keeps {s['filter']['kept']} of {s['n']} "
                     f"(the top {s['filter']['drop_fraction']:.0%} by delta dropped).")
    for key, r in (s.get("filters") or {}).items():
        th = (s.get("thresholds") or {}).get("judge" if key == "judge" else "delta")
        at = "" if key == "combined" or th is None else f" (threshold {th:.4g})"
        lines.append(f"Filter `{key}`{at}: {r['removed']} removed, {r['kept']} kept in "
                     f"`{os.path.basename(r['jsonl'])}`.")
    if "auroc" in s:
        lines.append(f"AUROC against the labels: {s['auroc']:.3f} (raw projection {s['auroc_raw_projection']:.3f}).")
    return "\n".join(lines)


def _markdown(name, s) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.1f}"
    lines = [f"### {name}: fine-tuning (layer {s['layer']}, {s['method']})", "",
             "| run | trait | coherence | content |", "|---|---|---|---|",
             f"| base | {f(s['trait_before'])} | {f(s['coherence_before'])} | {f(s['content_before'])} |",
             f"| fine-tuned | {f(s['trait_after'])} | {f(s['coherence_after'])} | {f(s['content_metric'])} |",
             f"| + preventative (coef {s['preventative_coef']:g}) | {f(s['trait_after_preventative'])} | "
             f"{f(s['coherence_preventative'])} | {f(s['content_metric_preventative'])} |",
             f"| + CAFT ablation | {f(s['trait_after_caft'])} | {f(s['coherence_caft'])} | {f(s['content_metric_caft'])} |",
             "", f"Post-hoc best (coherence >= floor): {f(s['posthoc_best'])}; "
             f"shift vs trait change r = {s['shift_trait_r']:.3f}"]
    if s.get("prevent_dataset") is not None:
        lines += ["", f"Preventative steering, CAFT and post-hoc steering used dataset `{s['prevent_dataset']}` "
                      f"({s.get('prevent_dataset_rule', '')}).", "",
                  "| dataset | fraction / level | trait after | trait change | shift (prompt_last) | shift (response_avg) |",
                  "|---|---|---|---|---|---|"]
        g = lambda x: "n/a" if x is None else f"{x:.3g}"
        lines += [f"| {k} | {g(r['fraction'])} | {f(r['trait'])} | {f(r['trait_change'])} | "
                  f"{g(r['shift_prompt_last'])} | {g(r['shift_response_avg'])} |" for k, r in s["datasets"].items()]
    if s.get("capability"):
        from persona_jax.pipeline.finetune_capability import markdown
        lines += markdown(s["capability"])
    return "\n".join(lines)

