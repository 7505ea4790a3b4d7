"""Flagging training data before training (METHOD.md 9): projection difference.

For each (prompt, response) of a candidate dataset:
  delta = proj(response_avg of the dataset response) - proj(response_avg of the base
          model's own response to the same prompt)
at the chosen layer, projections on the unit persona vector. The dataset mean of delta
predicts how much fine-tuning on it will grow the trait; per sample, delta ranks samples.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from persona_jax.runtime.capture import capture
from persona_jax.io.csvio import write_csv_atomic
from persona_jax.io.jsonl import write_jsonl
from persona_jax.errors import PersonaError
from persona_jax.runtime.generate import generate
from persona_jax.method.projection import project, read_jsonl_conversations
from persona_jax.io.vectors import check_vector_shape


@dataclasses.dataclass
class FlagResult:
    delta: np.ndarray  # [N] projection difference (NaN where a response was empty)
    dataset_proj: np.ndarray  # [N] raw projection of the dataset responses
    base_proj: np.ndarray  # [N] projection of the base model's own responses
    base_responses: list[str]
    # [N] projection of the last prompt token (same capture as dataset_proj): the cheap
    # stand-in for the base model's response that needs no generation (paper, appendix I)
    prompt_last_proj: Optional[np.ndarray] = None

    @property
    def mean_delta(self) -> float:
        return float(np.nanmean(self.delta))

    @property
    def delta_prompt_last(self) -> np.ndarray:
        """[N] dataset_proj - prompt_last_proj: the projection difference without generation."""
        if self.prompt_last_proj is None:
            raise PersonaError("this flagging result holds no prompt_last projections")
        return self.dataset_proj - self.prompt_last_proj


def _check(model, vector, layer):
    check_vector_shape(vector, model.num_layers, model.hidden_size, "flagging vector")
    if not 0 <= layer <= model.num_layers:
        raise PersonaError(f"layer {layer} is outside 0..{model.num_layers} for this model")


def _projections(model, prompts, answers, vector, layer, batch_size, progress):
    """([N] proj of response_avg, [N] proj of prompt_last), NaN where the answer adds no token."""
    caps = capture(model, prompts, list(answers), batch_size=batch_size, progress=progress)
    out = []
    for key in ("response_avg", "prompt_last"):
        proj = np.full(len(prompts), np.nan)
        proj[caps["kept"]] = project(caps[key][:, layer], vector[layer])
        out.append(proj)
    return out


def prompt_last_difference(model, records: Sequence[dict], vector: np.ndarray, layer: int, batch_size: int = 32,
                           progress: bool = True) -> FlagResult:
    """The projection difference without generation (the paper's appendix I): the last prompt
    token's projection stands in for the base model's response; one capture, no sampling.
    `base_proj` and `prompt_last_proj` both hold it; `base_responses` is empty."""
    _check(model, vector, layer)
    prompts = [model.render_chat(r["messages"][:-1], add_generation_prompt=True) for r in records]
    answers = [r["messages"][-1]["content"] for r in records]
    proj, last = _projections(model, prompts, answers, vector, layer, batch_size, progress)
    return FlagResult(proj - last, proj, last, [], last)


def projection_difference(model, records: Sequence[dict], vector: np.ndarray, layer: int, max_new_tokens: int = 256,
                          temperature: float = 0.0, seed: int = 0, batch_size: int = 32,
                          base_responses: Optional[Sequence[str]] = None, progress: bool = True) -> FlagResult:
    """Projection difference of every conversation in `records` ({"messages": [...]});
    the result also holds the prompt_last projections (`delta_prompt_last`)."""
    _check(model, vector, layer)
    prompts = [model.render_chat(r["messages"][:-1], add_generation_prompt=True) for r in records]
    answers = [r["messages"][-1]["content"] for r in records]
    if base_responses is None:
        base_responses = generate(model, prompts, max_new_tokens, temperature=temperature, seed=seed,
                                  batch_size=batch_size, progress=progress)
    dataset, last = _projections(model, prompts, answers, vector, layer, batch_size, progress)
    base = _projections(model, prompts, list(base_responses), vector, layer, batch_size, progress)[0]
    return FlagResult(dataset - base, dataset, base, list(base_responses), last)



def write_flagged_csv(path: str, result: FlagResult, labels: Optional[Sequence[int]] = None) -> str:
    """One row per sample: index, delta, dataset_proj, base_proj, [label,] base_response."""
    n = len(result.delta)
    if labels is not None and len(labels) != n:
        raise PersonaError(f"{len(labels)} labels for {n} flagged samples")
    cols = ["index", "delta", "dataset_proj", "base_proj"] + (["label"] if labels is not None else []) + ["base_response"]
    rows = []
    for i in range(n):
        row = {"index": i, "delta": float(result.delta[i]), "dataset_proj": float(result.dataset_proj[i]),
               "base_proj": float(result.base_proj[i]),
               # prompt_last scores generate nothing: no base response to show
               "base_response": result.base_responses[i] if result.base_responses else ""}
        if labels is not None:
            row["label"] = int(labels[i])
        rows.append(row)
    write_csv_atomic(path, cols, rows)  # process 0; text escaped as every response CSV
    return path


def filter_jsonl(path: str, out_path: str, result: FlagResult, threshold: Optional[float] = None,
                 drop_fraction: Optional[float] = None) -> dict:
    """Write `path` without its most trait-teaching samples; returns what was dropped.

    Drop samples with delta > threshold, or the top `drop_fraction` by delta.
    """
    records = read_jsonl_conversations(path)
    if len(records) != len(result.delta):
        raise PersonaError(f"{path} has {len(records)} samples but the flagging result has {len(result.delta)}")
    d = np.nan_to_num(result.delta, nan=-np.inf)
    if threshold is not None:
        drop = d > threshold
    elif drop_fraction is not None:
        k = int(round(drop_fraction * len(d)))
        drop = np.zeros(len(d), bool)
        drop[np.argsort(-d, kind="stable")[:k]] = True
    else:
        raise PersonaError("filter_jsonl needs a threshold or a drop_fraction")
    write_jsonl(out_path, [{"messages": rec["messages"]} for rec, dr in zip(records, drop) if not dr])
    return {"n": len(records), "dropped": int(drop.sum()), "kept": int((~drop).sum()),
            "dropped_indices": np.flatnonzero(drop).tolist()}
