"""Screen training data as the paper does (METHOD.md 9, 11; its appendices F, I, K).

python -m experiments.screen_data --model=DIR --data=train.jsonl --vector=evil_response_avg_diff.pt \
    --layer=20 --workdir=/tmp/screen [--reference=clean.jsonl --percentile=95] \
    [--trait=evil --trait_dir=data_generation --judge=openai] \
    [--corpus --max_prompt_tokens=512 --k=1000] [--delta=prompt_last] \
    [--shift_datasets=normal=a.jsonl,evil_ii=b.jsonl --shifts=finetune.json]

Per sample of --data: the projection difference (the dataset response's response_avg
projection minus the base model's own response's, at --layer) and its cheap stand-in
without generation (minus the last prompt token's projection), and their correlation.
--delta picks the one that filters and ranks (prompt_last: nothing is generated).

Filters, with thresholds at the --percentile of the clean --reference set (or given with
--delta_threshold / --judge_threshold): by the trait judge's score of each dataset
response (--judge with --trait), by the projection difference, and by both (dropped when
either flags). Each filter's kept samples go to filtered_<filter>.jsonl.

--corpus: --data is a real chat corpus: each conversation is cut to its first user
message and first assistant reply, prompts over --max_prompt_tokens tokens are dropped;
--k writes top_<k>.jsonl, bottom_<k>.jsonl, random_<k>.jsonl by projection difference.

--shift_datasets with --shifts (a {label: shift} JSON, the pipeline's finetune.json or
report.json; --shift_key picks the field): each dataset's mean projection difference
against its measured fine-tuning shift, with Pearson r.

Writes screened.csv (one row per sample), the JSONL files above, histogram.png,
report.json and report.md (and judge_data.json / judge_reference.json, the judge scores); bad input is one `error:` line, exit status 2, nothing written.
"""
import json
import os
import types

from absl import flags

from persona_jax.pipeline import cli

_MODEL = flags.DEFINE_string("model", None, "base model checkpoint")
_DATA = flags.DEFINE_string("data", None, "JSONL to screen ({\"messages\": [...]} per line)")
_VECTOR = flags.DEFINE_string("vector", None, ".pt / .npy / Orbax persona vector")
_LAYER = flags.DEFINE_integer("layer", None, "hidden-state index to project at")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory")
_DELTA = flags.DEFINE_enum("delta", "response_avg", ["response_avg", "prompt_last"],
                           "the projection difference that filters and ranks: against the base model's own "
                           "response (generated), or against the last prompt token (no generation)")
_REFERENCE = flags.DEFINE_string("reference", None, "clean reference JSONL: thresholds at its --percentile")
_PERCENTILE = flags.DEFINE_float("percentile", 95.0, "calibration percentile of the reference set")
_DELTA_THR = flags.DEFINE_float("delta_threshold", None, "drop samples whose projection difference exceeds this")
_JUDGE_THR = flags.DEFINE_float("judge_threshold", None, "drop samples whose judged trait score exceeds this")
_CORPUS = flags.DEFINE_boolean("corpus", False, "--data is a chat corpus: first two turns, prompt length cap")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", 512, "--corpus: drop prompts longer than this (tokens)")
_K = flags.DEFINE_integer("k", 0, "write the top / bottom / random k samples by projection difference (0: none)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random k and of sampling")
_TRAIT = flags.DEFINE_string("trait", None, "trait whose judge rubric scores the dataset responses")
_TRAIT_DIR = flags.DEFINE_string("trait_dir", "data_generation", "holds trait_data_eval/<trait>.json")
_JUDGE = flags.DEFINE_enum("judge", "none", ["none", "openai", "local"], "judge kind (none: no judge filter)")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "gpt-4.1-mini-2025-04-14", "judge model name (openai)")
_JUDGE_URL = flags.DEFINE_string("judge_base_url", "", "OpenAI-compatible endpoint (empty: api.openai.com)")
_JUDGE_KEY = flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "environment variable with the API key")
_JUDGE_LOCAL = flags.DEFINE_string("judge_local_model", "", "judge=local: checkpoint of the judging model")
_JUDGE_TIMEOUT = flags.DEFINE_float("judge_timeout", 60.0, "seconds per judge request before it is retried")
_JUDGE_RETRIES = flags.DEFINE_integer("judge_max_retries", 6, "retries per judge request before the run stops")
_AGGREGATION = flags.DEFINE_enum("aggregation", "0_100", ["0_100", "0_10", "binary"], "trait score aggregation")
_LABELS = flags.DEFINE_string("labels", None, "optional JSON list of 0/1 per sample of --data (1 = trait "
                              "sample): AUROC of each score and precision / recall of each filter")
_SHIFT_DATA = flags.DEFINE_list("shift_datasets", [], "label=path.jsonl datasets for the dataset-level comparison")
_SHIFTS = flags.DEFINE_string("shifts", None, "JSON of measured fine-tuning shifts per dataset label")
_SHIFT_KEY = flags.DEFINE_string("shift_key", "shift_response_avg", "field of a fine-tuning summary to read")
_SHIFT_TRAIT = flags.DEFINE_string("shift_trait", None, "trait of a pipeline report.json to read shifts of")
_SHIFT_SAMPLES = flags.DEFINE_integer("shift_samples", 0, "samples per shift dataset (0: all)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 1000, "length of the base model's own responses")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature of the base responses")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "float32 | bfloat16")
_BATCH = flags.DEFINE_integer("batch_size", 32, "generation and capture batch size")
flags.mark_flags_as_required(["model", "data", "vector", "layer", "workdir"])


def _labelled(items):
    """["label=path" | "path", ...] -> {label: path} (label defaults to the file stem)."""
    from persona_jax.errors import PersonaError
    out = {}
    for it in items:
        label, _, path = it.rpartition("=") if "=" in it else ("", "", it)
        label = label or os.path.splitext(os.path.basename(path))[0]
        if label in out:
            raise PersonaError(f"--shift_datasets names {label!r} twice; give each dataset its own label=path")
        out[label] = path
    return out


def main(argv):
    del argv
    import numpy as np

    from persona_jax.errors import PersonaError
    from persona_jax.io.csvio import write_csv_atomic
    from persona_jax.io.distributed import writer_only
    from persona_jax.io.jsonl import write_jsonl
    from persona_jax.io.reports import write_json, write_text
    from persona_jax.io.vectors import check_vector_shape, load_any
    from persona_jax.method import flagging as fl
    from persona_jax.method import screening as sc
    from persona_jax.method import stats
    from persona_jax.method.projection import read_jsonl_conversations
    from persona_jax.model import load_model
    from persona_jax.pipeline import setup as runner

    # --- everything a user can get wrong is checked before the model loads --------------
    wd = _WORKDIR.value
    if _K.value < 0 or _MAX_PROMPT.value < 1 or _BATCH.value < 1 or _MAX_NEW.value < 1:
        raise PersonaError("--k must be >= 0, --max_prompt_tokens, --batch_size and --max_new_tokens >= 1")
    if not 0.0 < _PERCENTILE.value <= 100.0:
        raise PersonaError(f"--percentile must be in (0, 100]; got {_PERCENTILE.value}")
    read = (lambda p: sc.first_two_turns(p)) if _CORPUS.value else (lambda p: (read_jsonl_conversations(p), None))
    records, corpus_stats = read(_DATA.value)
    reference = read(_REFERENCE.value)[0] if _REFERENCE.value else None
    labels = None
    if _LABELS.value:
        if _CORPUS.value:
            raise PersonaError("--labels cannot follow --corpus (the prompt-length cap drops samples); label a prepared file")
        try:
            with open(_LABELS.value) as f:
                labels = json.load(f)
        except (OSError, ValueError) as e:
            raise PersonaError(f"--labels {_LABELS.value} cannot be read as JSON ({e})") from None
        if not isinstance(labels, list) or len(labels) != len(records) or any(x not in (0, 1) for x in labels):
            raise PersonaError(f"--labels must be a JSON list of {len(records)} 0/1 values, one per sample of {_DATA.value}")
    trait = None
    if _JUDGE.value != "none":
        if not _TRAIT.value:
            raise PersonaError("--judge needs --trait (whose rubric scores the dataset responses)")
        from persona_jax.method import traits as tr
        trait = tr.load_trait(tr.trait_paths(_TRAIT_DIR.value, _TRAIT.value)[1], name=_TRAIT.value)
    elif _JUDGE_THR.value is not None:
        raise PersonaError("--judge_threshold needs a judge (--judge=openai or local, with --trait)")
    shift_sets, shifts = {}, None
    if _SHIFT_DATA.value or _SHIFTS.value:
        if not (_SHIFT_DATA.value and _SHIFTS.value):
            raise PersonaError("--shift_datasets and --shifts go together (datasets and their measured shifts)")
        shifts = sc.read_shifts(_SHIFTS.value, _SHIFT_KEY.value, _SHIFT_TRAIT.value)
        for label, path in _labelled(_SHIFT_DATA.value).items():
            recs = read_jsonl_conversations(path)
            shift_sets[label] = recs[:_SHIFT_SAMPLES.value] if _SHIFT_SAMPLES.value > 0 else recs
        if not set(shift_sets) & set(shifts):
            raise PersonaError(f"no --shift_datasets label ({', '.join(shift_sets)}) has a shift in {_SHIFTS.value} "
                               f"({', '.join(shifts)})")
    vector = load_any(_VECTOR.value).array

    model = load_model(_MODEL.value, dtype=_DTYPE.value)
    check_vector_shape(vector, model.num_layers, model.hidden_size, _VECTOR.value)
    if not 0 <= _LAYER.value <= model.num_layers:
        raise PersonaError(f"--layer {_LAYER.value} is outside 0..{model.num_layers} for this model")
    report = {"data": _DATA.value, "layer": _LAYER.value, "delta": _DELTA.value, "n_read": len(records)}
    if _CORPUS.value:
        counts = sc.prompt_token_counts(model, records)
        keep = counts <= _MAX_PROMPT.value
        records = [r for r, k in zip(records, keep) if k]
        report["corpus"] = {**corpus_stats, "n_two_turns": int(keep.size), "max_prompt_tokens": _MAX_PROMPT.value,
                            "n_prompt_too_long": int((~keep).sum()), "n_kept": len(records)}
        if reference is not None:
            reference = [r for r, c in zip(reference, sc.prompt_token_counts(model, reference))
                         if c <= _MAX_PROMPT.value]
        if not records or (reference is not None and not reference):
            raise PersonaError(f"no conversation of {_DATA.value if not records else _REFERENCE.value} has a prompt "
                               f"of at most {_MAX_PROMPT.value} tokens; raise --max_prompt_tokens")
    if _K.value > len(records):
        raise PersonaError(f"--k={_K.value} but {_DATA.value} has {len(records)} usable samples; lower --k")
    judge = None
    if trait is not None:
        os.makedirs(wd, exist_ok=True)  # the judge's cache lives there
        judge = runner.make_judge(types.SimpleNamespace(
            kind=_JUDGE.value, model=_JUDGE_MODEL.value, base_url=_JUDGE_URL.value, api_key_env=_JUDGE_KEY.value,
            aggregation=_AGGREGATION.value, max_concurrency=32, local_model=_JUDGE_LOCAL.value,
            local_dtype=_DTYPE.value, timeout=_JUDGE_TIMEOUT.value, max_retries=_JUDGE_RETRIES.value), wd)

    def screen(recs):
        kw = dict(batch_size=_BATCH.value, progress=True)
        if _DELTA.value == "prompt_last":
            return fl.prompt_last_difference(model, recs, vector, _LAYER.value, **kw)
        return fl.projection_difference(model, recs, vector, _LAYER.value, max_new_tokens=_MAX_NEW.value,
                                        temperature=_TEMPERATURE.value, seed=_SEED.value, **kw)

    def chosen(res):
        return res.delta if _DELTA.value == "response_avg" else res.delta_prompt_last

    res = screen(records)
    delta = chosen(res)
    report["mean_delta"] = float(np.nanmean(delta))
    report["mean_delta_prompt_last"] = float(np.nanmean(res.delta_prompt_last))
    if _DELTA.value == "response_avg":
        ok = np.isfinite(res.delta) & np.isfinite(res.delta_prompt_last)
        report["approximation"] = {"pearson_r": stats.pearson(res.delta, res.delta_prompt_last),
                                   "spearman": stats.spearman(res.delta[ok], res.delta_prompt_last[ok])}
    def judged(recs, name):
        """Judge scores [N]: process 0 asks the judge and writes them to the workdir, every
        process reads them back (an API is not sent the same requests once per host)."""
        path = os.path.join(wd, f"judge_{name}.json")
        writer_only(lambda: write_json(path, sc.judge_scores(judge, trait.name, trait.eval_prompt, recs).tolist()))()
        with open(path) as f:
            return np.asarray(json.load(f), float)

    scores = judged(records, "data") if judge is not None else None

    # --- thresholds (the reference set's percentile unless given) and filters ----------
    thresholds = {"delta": _DELTA_THR.value, "judge": _JUDGE_THR.value}
    ref_delta = None
    if reference is not None:
        ref_delta = chosen(screen(reference))
        report["reference"] = {"path": _REFERENCE.value, "n": len(reference), "percentile": _PERCENTILE.value,
                               "mean_delta": float(np.nanmean(ref_delta))}
        if thresholds["delta"] is None:
            thresholds["delta"] = sc.calibrate_threshold(ref_delta, _PERCENTILE.value, "reference projection differences")
        if judge is not None and thresholds["judge"] is None:
            thresholds["judge"] = sc.calibrate_threshold(judged(reference, "reference"),
                                                         _PERCENTILE.value, "reference judge scores")
    masks = sc.filter_masks(delta, scores, thresholds["delta"], thresholds["judge"])
    report["thresholds"] = thresholds
    report["filters"] = sc.filter_summary(masks)
    if scores is not None:
        report["mean_judge"] = float(np.nanmean(scores)) if np.isfinite(scores).any() else None
        report["judge_delta_pearson_r"] = stats.pearson(scores, delta)

    if labels is not None:
        y = np.asarray(labels, bool)
        scored = {"delta_response_avg": res.delta} if _DELTA.value == "response_avg" else {}
        scored.update({"delta_prompt_last": res.delta_prompt_last, "dataset_proj": res.dataset_proj})
        if scores is not None:
            scored["judge"] = scores
        report["labels"] = {"n_trait": int(y.sum()), "auroc": {k: stats.auroc(v, labels) for k, v in scored.items()},
                            "filters": {k: {"precision": float(y[m].mean()) if m.any() else None,
                                            "recall": float(m[y].mean()) if y.any() else None}
                                        for k, m in masks.items()}}

    # --- dataset level (appendix F) -------------------------------------------------------
    if shift_sets:
        means = {label: float(np.nanmean(chosen(screen(recs)))) for label, recs in shift_sets.items()}
        report["shift"] = {**sc.shift_correlation(means, shifts), "key": _SHIFT_KEY.value,
                           "all_mean_delta": means}

    sets = sc.rank_sets(delta, _K.value, _SEED.value) if _K.value else None  # may refuse: before any file

    # --- files (process 0) -----------------------------------------------------------------
    os.makedirs(wd, exist_ok=True)
    for name, m in masks.items():
        write_jsonl(os.path.join(wd, f"filtered_{name}.jsonl"),
                    [{"messages": r["messages"]} for r, drop in zip(records, m) if not drop])
    if sets is not None:
        report["sets"] = {name: {"path": p, "mean_delta": float(np.mean(delta[sets[name]])),
                                 "indices": sets[name].tolist()}
                          for name, p in sc.write_sets(records, sets, wd).items()}
        if labels is not None:
            for name, rec in report["sets"].items():
                rec["trait_share"] = float(np.mean([labels[i] for i in rec["indices"]]))
    elif _CORPUS.value:
        write_jsonl(os.path.join(wd, "prepared.jsonl"), [{"messages": r["messages"]} for r in records])
    cols = ["index", "delta", "delta_prompt_last", "dataset_proj", "base_proj", "prompt_last_proj"]
    cols += ["judge"] if scores is not None else []
    cols += [f"dropped_{k}" for k in masks] + ["base_response"]
    rows = []
    for i in range(len(records)):
        row = {"index": i, "delta": float(delta[i]), "delta_prompt_last": float(res.delta_prompt_last[i]),
               "dataset_proj": float(res.dataset_proj[i]), "base_proj": float(res.base_proj[i]),
               "prompt_last_proj": float(res.prompt_last_proj[i]),
               "base_response": res.base_responses[i] if res.base_responses else ""}
        if scores is not None:
            row["judge"] = None if np.isnan(scores[i]) else float(scores[i])
        row.update({f"dropped_{k}": int(m[i]) for k, m in masks.items()})
        rows.append(row)
    write_csv_atomic(os.path.join(wd, "screened.csv"), cols, rows)
    sc.plot_histograms(os.path.join(wd, "histogram.png"), delta, masks, thresholds, ref_delta,
                       title=f"projection difference ({_DELTA.value}, layer {_LAYER.value})")
    write_json(os.path.join(wd, "report.json"), report)
    write_text(os.path.join(wd, "report.md"), markdown(report))
    print(json.dumps({k: report[k] for k in ("mean_delta", "filters") if k in report}))


def markdown(r: dict) -> str:
    g = lambda x: "n/a" if x is None or (isinstance(x, float) and x != x) else f"{x:.4g}"
    lines = [f"# Data screening: `{r['data']}` (layer {r['layer']}, delta = {r['delta']})", ""]
    if "corpus" in r:
        c = r["corpus"]
        lines.append(f"Corpus: {c['n_read']} conversations read, {c['n_no_exchange']} without a user/assistant "
                     f"exchange, {c['n_prompt_too_long']} with prompts over {c['max_prompt_tokens']} tokens; "
                     f"{c['n_kept']} screened.")
    lines.append(f"Mean projection difference {g(r['mean_delta'])} (prompt_last stand-in {g(r['mean_delta_prompt_last'])}).")
    if "approximation" in r:
        lines.append(f"Generated vs prompt_last projection difference: Pearson r = {g(r['approximation']['pearson_r'])}, "
                     f"Spearman = {g(r['approximation']['spearman'])}.")
    if r.get("filters"):
        th = r["thresholds"]
        lines += ["", f"Thresholds: delta {g(th['delta'])}, judge {g(th['judge'])}"
                  + (f" ({r['reference']['percentile']:g}th percentile of `{r['reference']['path']}`)"
                     if "reference" in r else ""), "",
                  "| filter | removed | kept | removed fraction |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['removed']} | {v['kept']} | {v['removed_fraction']:.3f} |" for k, v in r["filters"].items()]
    if "labels" in r:
        lab = r["labels"]
        lines += ["", f"Against the labels ({lab['n_trait']} trait samples): AUROC "
                  + ", ".join(f"{k} {g(v)}" for k, v in lab["auroc"].items()) + "."]
        if lab["filters"]:
            lines += ["", "| filter | precision | recall |", "|---|---|---|"]
            lines += [f"| {k} | {g(v['precision'])} | {g(v['recall'])} |" for k, v in lab["filters"].items()]
    if "sets" in r:
        lines += ["", "| set | mean delta | trait share (labels) | file |", "|---|---|---|---|"]
        lines += [f"| {k} | {g(v['mean_delta'])} | {g(v.get('trait_share'))} | `{os.path.basename(v['path'])}` |"
                  for k, v in r["sets"].items()]
    if "shift" in r:
        s = r["shift"]
        lines += ["", f"Dataset mean projection difference vs fine-tuning shift (`{s['key']}`): "
                      f"Pearson r = {g(s['pearson_r'])} over {len(s['labels'])} datasets.", "",
                  "| dataset | mean delta | shift |", "|---|---|---|"]
        lines += [f"| {k} | {g(x)} | {g(y)} |" for k, x, y in zip(s["labels"], s["mean_delta"], s["shift"])]
    lines += ["", "![histogram](histogram.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
