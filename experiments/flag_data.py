"""Flag training samples before training (METHOD.md 9): projection difference per sample.

python -m experiments.flag_data --model=DIR --data=train.jsonl \
    --vector=evil_response_avg_diff.pt --layer=20 --workdir=/tmp/flag [--drop_fraction=0.1]
Writes flagged.csv (one row per sample: delta, dataset and base projections, the label
when --labels is given, base response), cleaned.jsonl (without the top-delta samples),
report.json and report.md.
"""
import json
import os

from absl import flags

from persona_jax.pipeline import cli

_MODEL = flags.DEFINE_string("model", None, "base model checkpoint")
_DATA = flags.DEFINE_string("data", None, "reference JSONL to screen")
_VECTOR = flags.DEFINE_string("vector", None, ".pt / .npy / Orbax persona vector")
_LAYER = flags.DEFINE_integer("layer", None, "hidden-state index to project at")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory")
_DROP = flags.DEFINE_float("drop_fraction", 0.1, "fraction of samples with the largest delta to drop")
_THRESHOLD = flags.DEFINE_float("threshold", None, "drop samples with delta above this instead")
_LABELS = flags.DEFINE_string("labels", None, "optional JSON list of 0/1 (1 = trait sample): reports AUROC")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 1000, "length of the base model's own responses")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "float32 | bfloat16")
_BATCH = flags.DEFINE_integer("batch_size", 32, "generation and capture batch size")
flags.mark_flags_as_required(["model", "data", "vector", "layer", "workdir"])


def main(argv):
    del argv
    from persona_jax.method import flagging as fl
    from persona_jax.errors import PersonaError
    from persona_jax.model import load_model
    from persona_jax.method.projection import read_jsonl_conversations
    from persona_jax.io.reports import write_json, write_text
    from persona_jax.io.vectors import load_any
    from persona_jax.method import stats

    os.makedirs(_WORKDIR.value, exist_ok=True)
    records = read_jsonl_conversations(_DATA.value)
    labels = None
    if _LABELS.value:  # checked before the base model generates anything
        with open(_LABELS.value) as f:
            labels = json.load(f)
        if not isinstance(labels, list) or len(labels) != len(records) or any(x not in (0, 1) for x in labels):
            raise PersonaError(f"--labels must be a JSON list of {len(records)} 0/1 values, one per sample of {_DATA.value}")
    model = load_model(_MODEL.value, dtype=_DTYPE.value)
    vector = load_any(_VECTOR.value).array
    res = fl.projection_difference(model, records, vector, _LAYER.value, max_new_tokens=_MAX_NEW.value,
                                   batch_size=_BATCH.value)
    kept = fl.filter_jsonl(_DATA.value, os.path.join(_WORKDIR.value, "cleaned.jsonl"), res,
                           threshold=_THRESHOLD.value, drop_fraction=None if _THRESHOLD.value is not None else _DROP.value)
    report = {"n": len(records), "mean_delta": res.mean_delta, "layer": _LAYER.value,
              "dropped": kept["dropped"], "kept": kept["kept"]}
    if labels is not None:
        report["auroc"] = stats.auroc(res.delta, labels)
        report["auroc_raw_projection"] = stats.auroc(res.dataset_proj, labels)
    # every file is written by process 0 only (the others wait at each writer's barrier)
    fl.write_flagged_csv(os.path.join(_WORKDIR.value, "flagged.csv"), res, labels)
    write_json(os.path.join(_WORKDIR.value, "report.json"), report)
    write_text(os.path.join(_WORKDIR.value, "report.md"),
               "# Data flagging\n\n" + "\n".join(f"- {k}: {v}" for k, v in report.items()) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    cli.run(main)
