"""Per-token and per-turn monitoring of conversations on a persona vector.

python -m experiments.token_monitor --model=DIR --vector=evil_response_avg_diff.pt --layer=20 \
    --input=chats.jsonl --out=DIR
Input: a JSONL of {"messages": [...]} (any number of turns) or a response CSV (question,
answer[, prompt]). Writes DIR/token_projections.csv (one row per token),
DIR/turn_projections.csv (one row per turn) and DIR/token_monitor.html (tokens shaded by
their projection, a per-turn plot, the vector and layer named; no external assets).
Only process 0 writes.
"""
from absl import flags

from persona_jax.pipeline import cli

_MODEL = flags.DEFINE_string("model", None, "checkpoint directory or hub id in the HF cache ('organism': the shipped one)")
_VECTOR = flags.DEFINE_string("vector", None, ".pt / .npy vector file or Orbax vector directory, [L+1, hidden]")
_LAYER = flags.DEFINE_integer("layer", None, "hidden-state index to project at (0..L)")
_INPUT = flags.DEFINE_string("input", None, "conversations: .jsonl of {\"messages\": [...]} or a response .csv")
_OUT = flags.DEFINE_string("out", None, "output directory")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
_BATCH = flags.DEFINE_integer("batch_size", 4, "conversations per forward call")
_CENTRE = flags.DEFINE_string("centre", "median", "white of the colour scale: median | zero | a number")
_MAX_HTML = flags.DEFINE_integer("max_html", 50, "conversations drawn on the HTML page (the CSVs hold all)")
_TITLE = flags.DEFINE_string("title", "", "page title (default: names the vector and layer)")
flags.mark_flags_as_required(["model", "vector", "layer", "input", "out"])


def main(argv):
    del argv
    import os

    from persona_jax.errors import PersonaError
    from persona_jax.io.vectors import load_any
    from persona_jax.method import token_monitor as tm
    from persona_jax.model import load_model

    if _CENTRE.value not in ("median", "zero"):
        try:
            float(_CENTRE.value)
        except ValueError:
            raise PersonaError(f"--centre={_CENTRE.value!r} is not median, zero or a number") from None
    if _MAX_HTML.value < 1:
        raise PersonaError(f"--max_html must be 1 or more, got {_MAX_HTML.value}")
    if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
        raise PersonaError(f"--out={_OUT.value} is a file; pass a directory")
    conversations = tm.read_conversations(_INPUT.value)
    vector = load_any(_VECTOR.value).array
    path = _MODEL.value
    if path == "organism":
        from persona_jax.organism.provider import organism_path
        path = organism_path()
    model = load_model(path, dtype=_DTYPE.value)
    traces = tm.token_projections(model, vector, _LAYER.value, conversations, batch_size=_BATCH.value)
    centre = _CENTRE.value if _CENTRE.value in ("median", "zero") else float(_CENTRE.value)
    out = _OUT.value
    tm.write_csvs(traces, os.path.join(out, "token_projections.csv"), os.path.join(out, "turn_projections.csv"))
    tm.write_html(traces[: _MAX_HTML.value], os.path.join(out, "token_monitor.html"),
                  vector_name=os.path.basename(os.path.normpath(_VECTOR.value)), model_name=_MODEL.value,
                  centre=centre, title=_TITLE.value)
    print(os.path.join(out, "token_monitor.html"))


if __name__ == "__main__":
    cli.run(main)
