"""Add projection columns to a response CSV or a training JSONL (METHOD.md 7, 10).

python -m experiments.project --model=DIR --vectors=evil_response_avg_diff.pt --layers=20 \
    --input=responses.csv [--output=out.csv]
Columns: {model_basename}_{vector_stem}_{proj|prompt_last_proj|cos_sim}_layer{l}.
"""
from absl import flags

from persona_jax.pipeline import cli

_MODEL = flags.DEFINE_string("model", None, "checkpoint directory or hub id in the HF cache")
_VECTORS = flags.DEFINE_list("vectors", None, ".pt / .npy files or Orbax vector directories")
_LAYERS = flags.DEFINE_list("layers", None, "hidden-state indices to project at")
_INPUT = flags.DEFINE_string("input", None, "response CSV (prompt, answer columns) or training JSONL")
_OUTPUT = flags.DEFINE_string("output", None, "output file (default: rewrite the input)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
_BATCH = flags.DEFINE_integer("batch_size", 16, "capture batch size")
flags.mark_flags_as_required(["model", "vectors", "layers", "input"])


def main(argv):
    del argv
    from persona_jax.errors import PersonaError
    from persona_jax.model import load_model
    from persona_jax.method.projection import project_file, vectors_by_stem

    try:
        layers = [int(x) for x in _LAYERS.value]
    except ValueError:
        raise PersonaError(f"--layers must be integers; got {_LAYERS.value}") from None
    vectors = vectors_by_stem(_VECTORS.value)
    model = load_model(_MODEL.value, dtype=_DTYPE.value)
    out = project_file(model, _INPUT.value, vectors, layers, _OUTPUT.value, batch_size=_BATCH.value)
    print(out)


if __name__ == "__main__":
    cli.run(main)
