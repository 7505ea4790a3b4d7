"""Projections on persona vectors (METHOD.md 7, 9, 10).

proj(a) = a . v[l] / |v[l]|. Columns written into CSV / JSONL files use the reference's
names `{model_basename}_{vector_stem}_{proj|prompt_last_proj|cos_sim}_layer{l}`, where
`proj` projects `response_avg`, `prompt_last_proj` projects `prompt_last`, and `cos_sim`
is the cosine between `response_avg` and v[l].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from persona_jax.runtime.capture import capture
from persona_jax.io.csvio import read_csv, write_csv_atomic
from persona_jax.io import jsonl
from persona_jax.errors import PersonaError
from persona_jax.io.vectors import PersonaVector, check_vector_shape


def project(acts: np.ndarray, v: np.ndarray) -> np.ndarray:
    """acts [N, D], v [D] -> [N] scalar projections on the unit vector (float64)."""
    n = np.linalg.norm(v)
    if n == 0:
        raise PersonaError("cannot project on a zero vector")
    return acts.astype(np.float64) @ (v.astype(np.float64) / n)


def cos_sim(acts: np.ndarray, v: np.ndarray) -> np.ndarray:
    a = acts.astype(np.float64)
    return project(a, v) / np.maximum(np.linalg.norm(a, axis=-1), 1e-12)


def column_name(model_name: str, vector_stem: str, kind: str, layer: int) -> str:
    return f"{os.path.basename(os.path.normpath(model_name))}_{vector_stem}_{kind}_layer{layer}"


KINDS = ("proj", "prompt_last_proj", "cos_sim")


def check_kinds(kinds) -> tuple[str, ...]:
    """`kinds` ("all", one kind, or a sequence of them) -> the tuple of kinds, checked."""
    if kinds is None or kinds == "all":
        return KINDS
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise PersonaError(f"projection type {', '.join(bad) or '(none)'} is unknown; use one of: "
                           f"{', '.join(KINDS)} or all")
    return kinds


def projection_columns(model, prompts: Sequence[str], answers: Sequence[str], vectors: dict[str, np.ndarray],
                       layers: Sequence[int], batch_size: int = 16, progress: bool = True,
                       kinds="all", skip: Sequence[str] = ()) -> dict[str, list]:
    """{column name: [N] values (None where the answer was empty)} for every vector, layer and
    projection kind (`kinds`: "all" or some of proj / prompt_last_proj / cos_sim); columns
    named in `skip` are not computed (nothing is captured when every column is skipped)."""
    kinds = check_kinds(kinds)
    for stem, v in vectors.items():
        check_vector_shape(v, model.num_layers, model.hidden_size, stem)
    for l in layers:
        if not 0 <= l <= model.num_layers:
            raise PersonaError(f"layer {l} is outside 0..{model.num_layers} for this model")
    wanted = [(stem, l, kind) for stem in vectors for l in layers for kind in kinds
              if column_name(model.name, stem, kind, l) not in set(skip)]
    if not wanted:
        return {}
    caps = capture(model, list(prompts), list(answers), batch_size=batch_size, progress=progress)
    kept = caps["kept"]
    cols = {}
    for stem, v in vectors.items():
        for l in layers:
            for kind, acts, fn in (("proj", caps["response_avg"], project),
                                   ("prompt_last_proj", caps["prompt_last"], project),
                                   ("cos_sim", caps["response_avg"], cos_sim)):
                if (stem, l, kind) not in wanted:
                    continue
                vals: list = [None] * len(prompts)
                for i, x in zip(kept, fn(acts[:, l], v[l])):
                    vals[i] = float(x)
                cols[column_name(model.name, stem, kind, l)] = vals
    return cols


def read_jsonl_conversations(path: str) -> list[dict]:
    """Reference training JSONL: one {"messages": [...]} per line, the last an assistant turn.

    The records as written (extra keys kept), read by the project's one reader
    (`persona_jax.io.jsonl`)."""
    return [rec for _, rec, _ in jsonl.read_conversations(path)]


def prompts_answers(model, path: str):
    """(records, prompts, answers, kind) of a response CSV or a training JSONL."""
    if str(path).endswith(".jsonl"):
        recs = read_jsonl_conversations(path)
        prompts = [model.render_chat(r["messages"][:-1], add_generation_prompt=True) for r in recs]
        return recs, prompts, [r["messages"][-1]["content"] for r in recs], "jsonl"
    fields, rows = read_csv(path, required=("prompt", "answer"))
    return (fields, rows), [r["prompt"] for r in rows], [r["answer"] for r in rows], "csv"


def project_file(model, path: str, vectors: dict[str, np.ndarray], layers: Sequence[int], out_path: str | None = None,
                 batch_size: int = 16, progress: bool = True, kinds="all", overwrite: bool = True) -> str:
    """Add projection columns to a CSV or JSONL file (in place unless out_path is given).

    kinds: "all" or some of proj / prompt_last_proj / cos_sim. overwrite=False keeps a
    column the file already has (in every JSONL record) and computes only the others."""
    data, prompts, answers, kind = prompts_answers(model, path)
    existing: set = set()
    if not overwrite:
        if kind == "csv":
            existing = set(data[0])
        else:
            existing = set.intersection(*(set(r) for r in data)) - {"messages"}
    cols = projection_columns(model, prompts, answers, vectors, layers, batch_size, progress,
                              kinds=kinds, skip=sorted(existing))
    out_path = out_path or path
    if not cols and os.path.abspath(out_path) == os.path.abspath(path):
        return out_path  # every column is there already: the file stays as it is
    if kind == "csv":
        fields, rows = data
        for name, vals in cols.items():
            if name not in fields:
                fields.append(name)
            for r, v in zip(rows, vals):
                r[name] = "" if v is None else repr(v)
        write_csv_atomic(out_path, fields, rows)
    else:
        for i, rec in enumerate(data):
            for name, vals in cols.items():
                rec[name] = vals[i]
        jsonl.write_jsonl(out_path, data)
    return out_path


def vectors_by_stem(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Load vector files / Orbax dirs keyed by their file stem (the column-name part)."""
    from persona_jax.io.vectors import load_any
    return {Path(p).stem if not os.path.isdir(p) else Path(p).name: load_any(p).array for p in paths}


__all__ = ["project", "cos_sim", "column_name", "projection_columns", "project_file", "PersonaVector",
           "read_jsonl_conversations", "vectors_by_stem"]
