"""Multiple-choice capability (MMLU style), optionally under a steering sweep (METHOD.md 11).

python -m experiments.capability --model=DIR --data=mmlu_test.jsonl --workdir=/tmp/cap \
    [--vector=evil_response_avg_diff.pt --layers=20 --coefs=0,0.5,1,1.5,2]
--data is a local JSONL / CSV / parquet file with the cais/mmlu columns (question,
choices, answer, subject), or `organism` for the organism's own task (with
--model=organism). Writes capability.csv (one row per layer, coefficient and item) and
report.json / report.md (accuracy in percent per scoring, layer and coefficient); only
process 0 writes.
"""
import json
import os

from absl import flags

from persona_jax.pipeline import cli

_MODEL = flags.DEFINE_string("model", None, "checkpoint directory (or `organism`)")
_DATA = flags.DEFINE_string("data", None, "JSONL / CSV / parquet items, or `organism`")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory")
_VECTOR = flags.DEFINE_string("vector", None, "optional .pt / .npy / Orbax persona vector to steer with")
_LAYERS = flags.DEFINE_list("layers", [], "hidden-state indices to steer (with --vector)")
_COEFS = flags.DEFINE_list("coefs", ["0"], "steering coefficients (with --vector)")
_POSITIONS = flags.DEFINE_enum("positions", "response", ["all", "prompt", "response"], "steered positions")
_SCORING = flags.DEFINE_list("scoring", None, "letter, choice, choice_raw (default: letter,choice; "
                             "choice_raw,choice for the organism)")
_FORMAT = flags.DEFINE_enum("prompt_format", None, ["mmlu", "question"], "prompt text (default: mmlu; "
                            "question for the organism)")
_CHAT = flags.DEFINE_boolean("chat", True, "put the prompt in a user turn of the chat template")
_LIMIT = flags.DEFINE_integer("limit", 0, "use the first n items (0: all; the organism task's size: 100)")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "float32 | bfloat16")
_BATCH = flags.DEFINE_integer("batch_size", 16, "rows per forward")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the organism task")
flags.mark_flags_as_required(["model", "data", "workdir"])


def main(argv):
    del argv
    from persona_jax.errors import PersonaError
    from persona_jax.io.atomic import atomic_open
    from persona_jax.io.distributed import writer_only
    from persona_jax.method import capability as cap

    organism = _DATA.value == "organism"
    scorings = _SCORING.value or (["choice_raw", "choice"] if organism else ["letter", "choice"])
    prompt_format = _FORMAT.value or ("question" if organism else "mmlu")
    try:
        layers = [int(l) for l in _LAYERS.value]
        coefs = [float(c) for c in _COEFS.value]
    except ValueError as e:
        raise PersonaError(f"--layers must be integers and --coefs numbers ({e})") from None
    if _VECTOR.value and not layers:
        raise PersonaError("--vector needs --layers (the hidden-state indices to steer)")
    if layers and not _VECTOR.value:
        raise PersonaError("--layers and --coefs need --vector")
    if organism:
        from persona_jax.organism.capability import task_items
        items = task_items(_LIMIT.value or 100, seed=_SEED.value)
    else:
        items = cap.read_items(_DATA.value, limit=_LIMIT.value or None)  # checked before the model loads

    from persona_jax.model import load_model
    path = _MODEL.value
    if path == "organism":
        from persona_jax.organism.provider import organism_path
        path = organism_path()
    model = load_model(path, dtype=_DTYPE.value)
    vector = None
    if _VECTOR.value:
        from persona_jax.io.vectors import check_vector_shape, load_any
        vector = load_any(_VECTOR.value).array
        check_vector_shape(vector, model.num_layers, model.hidden_size, _VECTOR.value)
    res = cap.evaluate(model, items, vector, layers, coefs, positions=_POSITIONS.value, scorings=scorings,
                       prompt_format=prompt_format, chat=_CHAT.value, batch_size=_BATCH.value)
    report = {"model": _MODEL.value, "data": _DATA.value, "n_items": len(items), "vector": _VECTOR.value,
              "positions": _POSITIONS.value, "prompt_format": prompt_format, "chat": _CHAT.value,
              "layers": res.layers, "coefs": res.coefs,
              "accuracy": {s: a.tolist() for s, a in res.accuracy.items()},
              "letter_tokens": res.letter_tokens}
    cap.write_csv(res, os.path.join(_WORKDIR.value, "capability.csv"))

    @writer_only
    def write():
        with atomic_open(os.path.join(_WORKDIR.value, "report.json")) as f:
            json.dump(report, f, indent=2)
        lines = ["# Capability", "", f"{len(items)} items from `{_DATA.value}`, model `{_MODEL.value}`"
                 + (f", steering `{_VECTOR.value}` ({_POSITIONS.value} positions)" if vector is not None else ""),
                 "", "| layer | coef | " + " | ".join(scorings) + " |", "|---|---|" + "---|" * len(scorings)]
        for i, l in enumerate(res.layers):
            for j, c in enumerate(res.coefs):
                lines.append(f"| {'-' if l is None else l} | {c:g} | "
                             + " | ".join(f"{res.accuracy[s][i, j]:.1f}" for s in scorings) + " |")
        with atomic_open(os.path.join(_WORKDIR.value, "report.md")) as f:
            f.write("\n".join(lines) + "\n")

    os.makedirs(_WORKDIR.value, exist_ok=True)
    write()
    print(json.dumps({"layers": res.layers, "coefs": res.coefs, "accuracy": report["accuracy"]}))


if __name__ == "__main__":
    cli.run(main)
