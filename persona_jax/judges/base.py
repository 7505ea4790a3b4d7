"""The judge interface: score (question, answer) pairs for trait expression and coherence.

Scores are floats in [0, 100] or None (refusal / unparseable / too little probability
mass on valid answers, METHOD.md 3). None is never to be read as 0.
"""
from __future__ import annotations

import abc
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.errors import PersonaError

Score = Optional[float]


class Judge(abc.ABC):
    """Scores answers with a rubric.

    Implementations: `OpenAIJudge` (any OpenAI-compatible endpoint), a local-model judge,
    and exact judges for synthetic test languages.

    `collective`: True when scoring is a computation every JAX process must join (a judge
    model sharded over the global mesh). Otherwise, on several processes, `judge_csv`
    asks the judge on process 0 only, so an API is not sent the same request per host.
    """

    collective: bool = False

    @abc.abstractmethod
    def trait_scores(
        self,
        trait: str,
        eval_prompt: str,
        questions: Sequence[str],
        answers: Sequence[str],
    ) -> list[Score]:
        """Trait-expression scores.

        Args:
          trait: trait name (e.g. "evil"); judges may use it for caching/logging only.
          eval_prompt: the trait's rubric template with `{question}` and `{answer}`.
          questions: [n] question texts.
          answers: [n] answer texts, aligned with `questions`.

        Returns:
          [n] scores in [0, 100] or None.
        """

    @abc.abstractmethod
    def coherence_scores(
        self, questions: Sequence[str], answers: Sequence[str]
    ) -> list[Score]:
        """Coherence scores with the fixed coherence rubric (`rubrics.COHERENCE_PROMPT`).

        Args:
          questions: [n] question texts.
          answers: [n] answer texts.

        Returns:
          [n] scores in [0, 100] or None.
        """


def check_aligned(questions: Sequence[str], answers: Sequence[str]) -> None:
    """Raise PersonaError if questions and answers differ in length."""
    from persona_jax.errors import PersonaError

    if len(questions) != len(answers):
        raise PersonaError(
            f"judge got {len(questions)} questions but {len(answers)} answers; "
            "pass one answer per question."
        )


def judge_csv(
    judge: Judge,
    csv_path,
    trait: str,
    eval_prompt: str,
    *,
    chunk_size: int = 256,
    coherence: bool = True,
    progress: bool = True,
) -> dict:
    """Fill the `<trait>` and `coherence` columns of a reference response CSV in place.

    For a CSV on disk (a runner judging a file); the pipeline's steps judge their rows
    in memory with `judge_rows`. Returns {"rows": n, "judged": rows sent to the judge
    now, "trait_missing": empty trait cells after the run, "coherence_missing": same for
    coherence (0 when coherence=False)}.
    """
    from persona_jax.io.csvio import read_csv

    fieldnames, rows = read_csv(csv_path, required=("question", "answer"))
    fieldnames, rows, judged = _judge_rows(judge, fieldnames, rows, csv_path, trait, eval_prompt,
                                           chunk_size, coherence, progress)
    return {**_missing(fieldnames, rows, trait, coherence), "judged": judged}


def judge_rows(
    judge: Judge,
    fieldnames: list[str],
    rows: list[dict],
    csv_path,
    trait: str,
    eval_prompt: str,
    *,
    chunk_size: int = 256,
    coherence: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Judge the empty `<trait>` / `coherence` cells of response rows held in memory,
    rewriting `csv_path` (columns `fieldnames`) atomically after each chunk.

    Only rows whose cell is empty are judged, `chunk_size` rows at a time: a kill loses at
    most the chunk in flight and a rerun continues where it stopped. A None score is an
    empty cell, so a rerun asks again for those rows (free with a cached judge). Returns
    the rows with their scores (on several hosts with an API judge, process 0 asks and
    the others read the CSV it wrote).

    Args:
      judge: any `Judge`.
      fieldnames, rows: the response rows (`question`, `answer`, ...) and their CSV columns;
        score columns are added (in reference order) when absent.
      trait: name of the trait column; eval_prompt: the trait rubric ({question}, {answer}).
    """
    return _judge_rows(judge, list(fieldnames), rows, csv_path, trait, eval_prompt, chunk_size, coherence,
                       progress)[1]


def _judge_rows(judge, fieldnames, rows, csv_path, trait, eval_prompt, chunk_size, coherence, progress):
    import jax

    from persona_jax.io.csvio import RESPONSE_COLUMNS

    if trait in RESPONSE_COLUMNS or trait == "coherence" or not trait:
        raise PersonaError(
            f"trait name {trait!r} for {csv_path} collides with a fixed CSV column; "
            "use the trait's own name such as 'evil'."
        )
    if chunk_size < 1:
        raise PersonaError(f"judge chunk_size={chunk_size} is invalid; use 1 or more.")
    args = (judge, fieldnames, rows, csv_path, trait, eval_prompt, chunk_size, coherence, progress)
    if jax.process_count() == 1 or judge.collective:
        return _fill_scores(*args)
    # several hosts, a judge that needs no collective: process 0 asks, the others wait
    # at the barrier and read the filled CSV
    from jax.experimental import multihost_utils

    from persona_jax.io.csvio import read_csv
    from persona_jax.io.distributed import writer_only

    done = writer_only(_fill_scores)(*args)
    judged = int(multihost_utils.broadcast_one_to_all(np.int32(done[2] if done else 0)))
    fieldnames, rows = read_csv(csv_path, required=("question", "answer"))
    return fieldnames, rows, judged


def _empty(r, col) -> bool:
    return not r[col].strip()


def _missing(fieldnames, rows, trait: str, coherence: bool) -> dict:
    """Row count and empty score cells of a response CSV's rows (a missing column: all)."""
    return {
        "rows": len(rows),
        "trait_missing": sum(_empty(r, trait) if trait in fieldnames else 1 for r in rows),
        "coherence_missing": (sum(_empty(r, "coherence") if "coherence" in fieldnames else 1 for r in rows)
                              if coherence else 0),
    }


def _fill_scores(judge, fieldnames, rows, csv_path, trait, eval_prompt, chunk_size, coherence, progress):
    """The work on one process: judge the empty cells, rewrite the CSV per chunk.
    Returns (fieldnames, rows, rows judged now)."""
    from tqdm.auto import tqdm

    from persona_jax.io.csvio import format_score, write_csv_atomic

    score_cols = [trait] + (["coherence"] if coherence else [])
    for col in score_cols:
        if col not in fieldnames:
            fieldnames.append(col)
            for r in rows:
                r[col] = ""

    pending = [i for i, r in enumerate(rows) if any(_empty(r, c) for c in score_cols)]
    bar = tqdm(total=len(pending), desc=f"judge {os.path.basename(str(csv_path))}",
               disable=not progress)
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start:start + chunk_size]
        for col in score_cols:
            idx = [i for i in chunk if _empty(rows[i], col)]
            if not idx:
                continue
            qs = [rows[i]["question"] for i in idx]
            ans = [rows[i]["answer"] for i in idx]
            if col == trait:
                scores = judge.trait_scores(trait, eval_prompt, qs, ans)
            else:
                scores = judge.coherence_scores(qs, ans)
            if len(scores) != len(idx):
                raise RuntimeError(f"judge returned {len(scores)} scores for {len(idx)} answers")
            for i, s in zip(idx, scores):
                rows[i][col] = format_score(s)
        write_csv_atomic(csv_path, fieldnames, rows)
        bar.update(len(chunk))
    bar.close()
    return fieldnames, rows, len(pending)
