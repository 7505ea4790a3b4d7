"""Persona-vector extraction (METHOD.md 2-5): contrastive generation, judging, filtering,
capture, mean difference.

Files follow the reference: `{trait}_pos_instruct.csv`, `{trait}_neg_instruct.csv`
(rows aligned by question, pair and rollout) and `{trait}_{reduction}_diff.pt`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.io import vectors as vec_io
from persona_jax.runtime.capture import REDUCTIONS, capture
from persona_jax.io.csvio import read_csv
from persona_jax.errors import PersonaError
from persona_jax.judges.base import Judge
from persona_jax.method.responses import Sampling, Spec, sample_and_judge, scores
from persona_jax.method.traits import Trait, contrastive_prompts


@dataclasses.dataclass
class FilterRule:
    """Keep aligned pair i when pos trait >= threshold, neg trait < 100 - threshold and both
    coherences >= coherence_threshold (the reference's rule; 50/50 by default)."""

    threshold: float = 50.0
    coherence_threshold: float = 50.0

    def keep(self, pos_trait, neg_trait, pos_coh, neg_coh) -> bool:
        if None in (pos_trait, neg_trait, pos_coh, neg_coh):
            return False  # a missing score never counts as a pass (nor as 0)
        return (pos_trait >= self.threshold and neg_trait < 100 - self.threshold
                and pos_coh >= self.coherence_threshold and neg_coh >= self.coherence_threshold)


def csv_paths(workdir: str, trait: str) -> tuple[str, str]:
    return (os.path.join(workdir, f"{trait}_pos_instruct.csv"),
            os.path.join(workdir, f"{trait}_neg_instruct.csv"))


def contrastive_specs(model, trait: Trait, n_per_question: int, antonym: str = "helpful",
                      questions: Optional[Sequence[str]] = None,
                      assistant_names: Optional[dict] = None) -> dict[str, list[Spec]]:
    """Specs for both sides, aligned row by row (question, pair, rollout); assistant_names:
    this trait's {"pos": name, "neg": name} (see `traits.contrastive_prompts`)."""
    out = {"pos": [], "neg": []}
    for row in contrastive_prompts(trait, antonym, questions, assistant_names):
        prompt = model.render_chat([{"role": "system", "content": row.system},
                                    {"role": "user", "content": row.question}])
        for r in range(n_per_question):
            out[row.side].append(Spec(row.question, prompt, row.question_id))
    return out


def sample_contrastive(model, judge: Judge, trait: Trait, workdir: str, sampling: Sampling, n_per_question: int,
                       antonym: str = "helpful", questions=None, progress=True,
                       assistant_names: Optional[dict] = None) -> tuple[list[dict], list[dict]]:
    """Generate and judge both sides into their response CSVs (resumable); returns the
    aligned (pos_rows, neg_rows). Greedy when n_per_question == 1 (METHOD.md 2)."""
    if n_per_question == 1:
        sampling = dataclasses.replace(sampling, temperature=0.0)
    specs = contrastive_specs(model, trait, n_per_question, antonym, questions, assistant_names)
    pos_csv, neg_csv = csv_paths(workdir, trait.name)
    return tuple(sample_and_judge(model, specs[side], path, trait.name, sampling, judge, trait.eval_prompt,
                                  progress=progress)
                 for side, path in (("pos", pos_csv), ("neg", neg_csv)))


def filter_pairs(pos_rows, neg_rows, trait: str, rule: FilterRule, where: str = "") -> np.ndarray:
    """Indices of aligned rows that pass `rule`."""
    if len(pos_rows) != len(neg_rows):
        raise PersonaError(f"{where}: pos and neg CSVs have {len(pos_rows)} and {len(neg_rows)} rows; they must be aligned row by row")
    pt, nt = scores(pos_rows, trait, where), scores(neg_rows, trait, where)
    pc, nc = scores(pos_rows, "coherence", where), scores(neg_rows, "coherence", where)
    return np.asarray([i for i in range(len(pos_rows)) if rule.keep(pt[i], nt[i], pc[i], nc[i])], int)


def mean_difference(pos: dict, neg: dict) -> dict[str, np.ndarray]:
    """{reduction: [L+1, D]} = mean over pos samples - mean over neg samples, float32."""
    return {r: (pos[r].astype(np.float64).mean(0) - neg[r].astype(np.float64).mean(0)).astype(np.float32)
            for r in REDUCTIONS}


def vectors_from_csvs(model, pos_csv: str, neg_csv: str, trait: str, rule: FilterRule = FilterRule(),
                      batch_size: int = 16, progress=True) -> tuple[dict[str, np.ndarray], dict]:
    """Filter aligned CSV rows, capture kept pos and neg samples, return the three vectors.

    Returns ({reduction: [L+1, D]}, stats {n_pairs, n_kept, kept_fraction}).
    """
    need = ("prompt", "answer", trait, "coherence")
    _, pos_rows = read_csv(pos_csv, required=need)
    _, neg_rows = read_csv(neg_csv, required=need)
    return vectors_from_rows(model, pos_rows, neg_rows, trait, rule, batch_size, progress, where=f"{pos_csv} / {neg_csv}")


def vectors_from_rows(model, pos_rows, neg_rows, trait: str, rule: FilterRule = FilterRule(),
                      batch_size: int = 16, progress=True, where: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """`vectors_from_csvs` on judged rows already in memory (the pipeline's extract step)."""
    kept = filter_pairs(pos_rows, neg_rows, trait, rule, where=where)
    if kept.size == 0:
        raise PersonaError(
            f"every one of the {len(pos_rows)} {trait} pairs was filtered out (rule: pos >= {rule.threshold}, "
            f"neg < {100 - rule.threshold}, coherence >= {rule.coherence_threshold}); lower the threshold or "
            "check the judge and the instructions")
    caps = {}
    for side, rows in (("pos", pos_rows), ("neg", neg_rows)):
        caps[side] = capture(model, [rows[i]["prompt"] for i in kept], [rows[i]["answer"] for i in kept],
                             batch_size=batch_size, progress=progress)
    stats = {"n_pairs": len(pos_rows), "n_kept": int(kept.size), "kept_fraction": kept.size / len(pos_rows),
             "n_captured_pos": int(caps["pos"]["kept"].size), "n_captured_neg": int(caps["neg"]["kept"].size)}
    logging.info("%s: kept %d of %d pairs", trait, kept.size, len(pos_rows))
    return mean_difference(caps["pos"], caps["neg"]), stats


def save_vectors(vectors: dict[str, np.ndarray], workdir: str, trait: str, model_id: str, n_kept: int,
                 config: Optional[dict] = None) -> dict[str, str]:
    """Write `{trait}_{reduction}_diff.pt` (reference layout) and an Orbax checkpoint per reduction."""
    paths = {}
    for r, arr in vectors.items():
        pt = os.path.join(workdir, vec_io.vector_filename(trait, r, ".pt"))
        vec_io.export_pt(arr, pt)
        vec_io.save_vector(vec_io.PersonaVector(arr, trait=trait, reduction=r, model_id=model_id,
                                                n_kept=n_kept, config=config or {}),
                           os.path.join(workdir, "vectors", f"{trait}_{r}"), overwrite=True)
        paths[r] = pt
    return paths
