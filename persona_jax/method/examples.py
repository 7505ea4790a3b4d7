"""Extraction and projection from in-memory examples (no judge, no CSV files).

`extract` is the method's last two steps (METHOD.md 5) on contrastive pairs the user
already has: capture both sides, then the mean difference per hidden state. `project`
is METHOD.md 7's projection of a response's activations on a vector. Both run on
`capture`, so a steered model (`pj.steer`) is captured steered.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.io.vectors import PersonaVector
from persona_jax.method.extract import mean_difference
from persona_jax.method.projection import project as project_rows
from persona_jax.runtime.capture import REDUCTIONS, capture


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def prompt_and_answer(example, where: str) -> tuple:
    """One example -> (prompt string or chat without the answer, answer string).

    An example is a chat conversation whose last message is the assistant's answer, or
    a (prompt, answer) pair whose prompt is a rendered string or a chat."""
    if _is_chat(example):
        *head, last = example
        if last.get("role") != "assistant" or not head:
            raise PersonaError(f"{where} is a conversation whose last message is not an assistant answer "
                               "after at least one other message; end it with the answer, or give (prompt, answer)")
        return list(head), last.get("content", "")
    if isinstance(example, (list, tuple)) and len(example) == 2 and isinstance(example[1], str) \
            and (isinstance(example[0], str) or _is_chat(example[0])):
        return example[0], example[1]
    raise PersonaError(f"{where} is a {type(example).__name__}; give (prompt or chat, answer) or a chat "
                       "whose last message is the assistant's answer")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise PersonaError(f"unknown reduction {reduction!r}; use one of: {', '.join(REDUCTIONS)}")
    return reduction


def extract(model, examples: Sequence, reduction: str = "response_avg", trait: str = "trait",
            batch_size: int = 16, progress: bool = False) -> PersonaVector:
    """A persona vector from contrastive examples in memory.

    examples: a list of (positive, negative) pairs (e.g. `zip(pos, neg)`), each side a
      chat conversation ending with the assistant's answer, or a (prompt, answer) pair
      whose prompt is a rendered string or a chat without the answer (rendered with the
      chat template and its generation prompt). Like repeng's / steering-vectors' pairs,
      but the split into prompt and answer is kept, since the method reads the answer.
    reduction: "response_avg" (the mean over the answer's tokens, the paper's choice),
      "prompt_last" or "prompt_avg".

    Returns a `PersonaVector` [L+1, D]: mean over positive sides - mean over negative
    sides of hidden state l, for every l (float32). A pair is used only when both of its
    answers add tokens (`n_kept`).
    """
    check_reduction(reduction)
    if isinstance(examples, (str, dict)):
        raise PersonaError("extract expects a list of (positive, negative) pairs")
    examples = list(examples)
    if not examples:
        raise PersonaError("extract got an empty list of examples")
    sides = {"pos": [], "neg": []}
    for i, pair in enumerate(examples):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or _is_chat(pair) or isinstance(pair[1], str):
            raise PersonaError(f"example {i} is not a (positive, negative) pair (each side a (prompt, answer) "
                               "or a chat ending with the answer)")
        for side, ex in zip(("pos", "neg"), pair):
            sides[side].append(prompt_and_answer(ex, f"the {side} side of example {i}"))
    caps = {side: capture(model, [p for p, _ in rows], [a for _, a in rows], batch_size=batch_size,
                          progress=progress)
            for side, rows in sides.items()}
    both = np.intersect1d(caps["pos"]["kept"], caps["neg"]["kept"])  # the pairs both of whose answers count
    if both.size == 0:
        raise PersonaError("extract: no example has a non-empty answer on both sides")
    pick = {side: {r: c[r][np.searchsorted(c["kept"], both)] for r in REDUCTIONS} for side, c in caps.items()}
    diff = mean_difference(pick["pos"], pick["neg"])[reduction]
    return PersonaVector(diff, trait=trait, reduction=reduction, model_id=model.name, n_kept=int(both.size),
                         config={"source": "pj.extract", "n_pairs": len(examples)})


def project(model, prompts_or_chats: Sequence, answers: Sequence[str] | None, vector, layer: int | None = None,
            reduction: str = "response_avg", batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """Projections of each (prompt, answer)'s activations on `vector`: a . v[l] / |v[l]|.

    prompts_or_chats: rendered prompts or chats (without the answer); with answers=None,
      each item is a chat ending with the assistant's answer or a (prompt, answer) pair.
    vector: a `PersonaVector`, an [L+1, D] array, or one [D] direction (used at every layer).
    layer: a hidden-state index 0..L, or None for every layer.
    reduction: the activations projected (METHOD.md 7: "response_avg" is the reference's
      `proj` column, "prompt_last" its `prompt_last_proj`).

    Returns float64 [N] (one layer) or [N, L+1] (every layer); NaN for an input whose
    answer adds no tokens, and at layers where the vector's row is zero.
    """
    check_reduction(reduction)
    if isinstance(prompts_or_chats, (str, dict)):
        raise PersonaError("project expects a list of prompts or conversations, not a single one")
    items = list(prompts_or_chats)
    if answers is None:
        pairs = [prompt_and_answer(x, f"input {i}") for i, x in enumerate(items)]
        items, answers = [p for p, _ in pairs], [a for _, a in pairs]
    v = np.asarray(getattr(vector, "array", vector), np.float32)
    L1, D = model.num_layers + 1, model.hidden_size
    if v.shape == (D,):
        v = np.broadcast_to(v, (L1, D))
    if v.shape != (L1, D):
        raise PersonaError(f"project: the vector has shape {tuple(v.shape)} but this model needs ({L1}, {D}) "
                           f"or ({D},)")
    if layer is not None and not 0 <= int(layer) <= model.num_layers:
        raise PersonaError(f"project: layer {layer} is outside 0..{model.num_layers} for this model")
    layers = range(L1) if layer is None else [int(layer)]
    if layer is not None and not np.any(v[layers[0]]):
        raise PersonaError(f"project: row {layer} of the vector is zero; projection on it is undefined")
    caps = capture(model, items, list(answers), batch_size=batch_size, progress=progress)
    out = np.full((len(items), len(layers)), np.nan)
    for j, l in enumerate(layers):
        if np.any(v[l]):
            out[caps["kept"], j] = project_rows(caps[reduction][:, l], v[l])
    return out[:, 0] if layer is not None else out
