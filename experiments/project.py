"""Add projection columns to a response CSV or a training JSONL (METHOD.md 7, 10), the
reference's cal_projection.py.

python -m experiments.project --model=DIR --vectors=evil_response_avg_diff.pt --layers=20 \
    --input=responses.csv [--output=out.csv] [--projection=proj] [--overwrite] \
    [--mesh_data=-1 --mesh_model=1 --dtype=bfloat16]
Columns: {model_basename}_{vector_stem}_{proj|prompt_last_proj|cos_sim}_layer{l}; a column
the file already has is kept (not recomputed) unless --overwrite. The file is written by
process 0 only.
"""
import types

from absl import flags

from persona_jax.pipeline import cli

_MODEL = flags.DEFINE_string("model", None, "checkpoint directory or hub id in the HF cache")
_VECTORS = flags.DEFINE_list("vectors", None, ".pt / .npy files or Orbax vector directories")
_LAYERS = flags.DEFINE_list("layers", None, "hidden-state indices to project at")
_INPUT = flags.DEFINE_string("input", None, "response CSV (prompt, answer columns) or training JSONL")
_OUTPUT = flags.DEFINE_string("output", None, "output file (default: rewrite the input)")
_PROJECTION = flags.DEFINE_enum("projection", "all", ["all", "proj", "prompt_last_proj", "cos_sim"],
                                "which projection column(s) to add: proj (response_avg), prompt_last_proj, "
                                "cos_sim, or all")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "recompute columns the file already has")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
_BATCH = flags.DEFINE_integer("batch_size", 16, "capture batch size")
_MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "devices on the batch axis (-1: all the model axis leaves)")
_MESH_MODEL = flags.DEFINE_integer("mesh_model", 1, "tensor-parallel width")
_DISTRIBUTED = flags.DEFINE_boolean("distributed", False, "multi-host: call jax.distributed.initialize() first")
flags.mark_flags_as_required(["model", "vectors", "layers", "input"])


def main(argv):
    del argv
    from persona_jax.errors import PersonaError
    from persona_jax.method.projection import project_file, vectors_by_stem
    from persona_jax.model import load_model
    from persona_jax.model.sharding import maybe_initialize_distributed
    from persona_jax.pipeline import setup as runner

    try:
        layers = [int(x) for x in _LAYERS.value]
    except ValueError:
        raise PersonaError(f"--layers must be integers; got {_LAYERS.value}") from None
    vectors = vectors_by_stem(_VECTORS.value)
    maybe_initialize_distributed(_DISTRIBUTED.value)
    mesh = runner.mesh_from(types.SimpleNamespace(mesh=types.SimpleNamespace(data=_MESH_DATA.value,
                                                                             model=_MESH_MODEL.value)))
    model = load_model(_MODEL.value, dtype=_DTYPE.value, mesh=mesh)
    out = project_file(model, _INPUT.value, vectors, layers, _OUTPUT.value, batch_size=_BATCH.value,
                       kinds=_PROJECTION.value, overwrite=_OVERWRITE.value)
    print(out)


if __name__ == "__main__":
    cli.run(main)
