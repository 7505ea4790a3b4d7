"""Generate responses into a reference-format CSV, resumably.

Every experiment (extraction, steering sweeps, monitoring) is "a list of prompts ->
sampled answers -> judged scores". Rows are produced in a fixed order, in chunks, and the
CSV is rewritten atomically after each chunk, so a crash loses at most the chunk in
flight and a rerun continues after the last row written (checked against the specs, so
a changed config is an error rather than a silently mixed file).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Optional, Sequence

from persona_jax.io.csvio import parse_score, read_csv, write_csv_atomic
from persona_jax.judges.base import judge_rows
from persona_jax.errors import PersonaError
from persona_jax.runtime.generate import generate
from persona_jax.steering.spec import Steering


@dataclasses.dataclass
class Spec:
    """One response to produce: the rendered prompt and what identifies it."""

    question: str
    prompt: str
    question_id: str
    extra: dict = dataclasses.field(default_factory=dict)  # extra CSV columns (layer, coef, ...)


@dataclasses.dataclass
class Sampling:
    max_new_tokens: int = 1000
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 1
    seed: int = 0
    batch_size: int = 32
    chunk_size: int = 256


def columns(trait: str, extra: Sequence[str] = ()) -> list[str]:
    return ["question", "prompt", "answer", "question_id", *extra, trait, "coherence"]


def generate_to_csv(model, specs: Sequence[Spec], csv_path: str, trait: str, sampling: Sampling,
                    steering_for: Optional[Callable[[Sequence[Spec]], Optional[Sequence[Steering]]]] = None,
                    progress: bool = True, control_for: Optional[Callable[[Sequence[Spec]], dict]] = None) -> list[dict]:
    """Append answers for `specs` to `csv_path` (resuming after rows already there).

    steering_for(chunk) -> steerings for that chunk's rows (per-row coefficients follow the
    chunk order), or None. control_for(chunk) -> {"monitor": pj.Monitor, "guard": ...} for
    `generate` (closed-loop control); each row then fills the spec's extra columns
    `guard_fired` (share of its tokens at which a guard acted), `token_proj` (JSON list of
    the monitor's first layer per token) and `prompt_last_proj` where the spec has them.
    Returns all rows of the CSV.
    """
    if not specs:
        raise PersonaError(f"nothing to generate for {csv_path}: the list of prompts is empty")
    extra = list(specs[0].extra)
    cols = columns(trait, extra)
    rows: list[dict] = []
    if os.path.exists(csv_path):
        _, rows = read_csv(csv_path, required=("question", "prompt", "answer", "question_id"))
        if len(rows) > len(specs):
            raise PersonaError(f"{csv_path} has {len(rows)} rows but this run makes {len(specs)}; use a new workdir")
        for i, r in enumerate(rows):
            if r["question_id"] != specs[i].question_id or r["prompt"] != specs[i].prompt:
                raise PersonaError(f"{csv_path} row {i + 2} was made with other settings than this run; use a new workdir or delete the file")
        if rows:
            logging.info("%s: resuming after %d of %d rows", csv_path, len(rows), len(specs))
    from tqdm.auto import tqdm
    bar = tqdm(total=len(specs), initial=len(rows), desc=f"generate {os.path.basename(csv_path)}",
               disable=not progress)
    for start in range(len(rows), len(specs), sampling.chunk_size):
        chunk = specs[start:start + sampling.chunk_size]
        answers = generate(
            model, [s.prompt for s in chunk], sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p,
            min_new_tokens=sampling.min_new_tokens, seed=sampling.seed * 1_000_003 + start,
            steering=steering_for(chunk) if steering_for else None, batch_size=sampling.batch_size,
            **(control_for(chunk) if control_for else {}))
        records = [{} for _ in chunk]
        if not isinstance(answers, list):  # a Generation: the control's records per row
            records = [_control_cells(answers, i) for i in range(len(chunk))]
            answers = answers.texts
        for s, a, rec in zip(chunk, answers, records):
            extra = {**s.extra, **{k: v for k, v in rec.items() if k in s.extra}}
            rows.append({"question": s.question, "prompt": s.prompt, "answer": a,
                         "question_id": s.question_id, **extra, trait: "", "coherence": ""})
        write_csv_atomic(csv_path, cols, rows)
        bar.update(len(chunk))
    bar.close()
    return rows


def _control_cells(gen, i: int) -> dict:
    """A row's closed-loop cells from a `Generation` (see `generate_to_csv`)."""
    import json
    cells = {}
    if gen.guard_fired is not None and gen.guard_fired[i].shape[1]:
        cells["guard_fired"] = f"{float(gen.guard_fired[i].any(axis=1).mean()):.4f}"
    if gen.projections is not None and gen.projections[i].shape[1]:
        cells["token_proj"] = json.dumps([round(float(x), 4) for x in gen.projections[i][:, 0]])
        cells["prompt_last_proj"] = f"{float(gen.prompt_projections['prompt_last'][i, 0]):.6g}"
    return cells


def sample_and_judge(model, specs: Sequence[Spec], csv_path: str, trait: str, sampling: Sampling, judge,
                     eval_prompt: str, steering_for=None, progress: bool = True, control_for=None) -> list[dict]:
    """Generate the answers for `specs` and judge them: the rows of `csv_path`, made once.

    The CSV is written as the work goes (resumable: generation after the last row
    written, judging of the empty score cells) and the rows come back filled, so a step
    reads nothing back. `steering_for` as in `generate_to_csv`.
    """
    rows = generate_to_csv(model, specs, csv_path, trait, sampling, steering_for, progress=progress,
                           control_for=control_for)
    return judge_rows(judge, columns(trait, list(specs[0].extra)), rows, csv_path, trait, eval_prompt,
                      progress=progress)


def scores(rows: Sequence[dict], column: str, where: str) -> list[Optional[float]]:
    return [parse_score(r.get(column), f"{where} column {column}") for r in rows]


def mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


__all__ = ["Spec", "Sampling", "generate_to_csv", "sample_and_judge", "scores", "mean", "columns"]
