"""The reference's `training.py` data options as plain arguments of the trainer (the
config section's optimisation and LoRA fields become a `TrainConfig` and a `LoraConfig`
in `persona_jax.pipeline.setup`, the layer that reads configs).

Training data: one reference JSONL or several (the reference's list of training files,
concatenated in order); without an eval file the reference holds out 10% of the
training conversations (`train_test_split(test_size=0.1)`), which `split_eval` does
deterministically from the seed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.finetune import data as fdata

REFERENCE_WEIGHT_DECAY = 0.01
REFERENCE_EVAL_FRACTION = 0.1


def training_files(value) -> list[str]:
    """A comma-separated string or a sequence of paths -> [path, ...] (at least one)."""
    if isinstance(value, str):
        paths = [p.strip() for p in value.split(",") if p.strip()]
    else:
        paths = [str(p).strip() for p in (value or ()) if str(p).strip()]
    if not paths:
        raise PersonaError("no training file given; pass one JSONL path or a comma-separated list of them")
    return paths


def load_training_files(paths: Sequence[str], tokenizer, max_length: int | None = None,
                        overflow: str = "truncate") -> tuple[list[fdata.Example], fdata.DataStats]:
    """Every conversation of every file, in order, and the summed loading stats."""
    examples: list[fdata.Example] = []
    total = fdata.DataStats(source=",".join(paths))
    for p in paths:
        ex, st = fdata.load_jsonl(p, tokenizer, max_length=max_length, overflow=overflow)
        examples += ex
        for field in dataclasses.fields(fdata.DataStats):
            if field.name != "source":
                setattr(total, field.name, getattr(total, field.name) + getattr(st, field.name))
    return examples, total


def split_eval(examples: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) with ceil(fraction * N) held-out examples drawn by `seed`
    (the count of `datasets`' `train_test_split(test_size=fraction)`); file order kept
    within each part."""
    n = len(examples)
    if not 0.0 < fraction < 1.0:
        raise PersonaError(f"the held-out fraction must be between 0 and 1; got {fraction}")
    n_eval = math.ceil(fraction * n)
    if n - n_eval < 1:
        raise PersonaError(f"holding out {fraction:g} of {n} conversations leaves none to train on; "
                           "give an eval file or more data")
    held = np.sort(np.random.default_rng([int(seed), 10]).permutation(n)[:n_eval])
    mask = np.zeros(n, bool)
    mask[held] = True
    return [e for e, m in zip(examples, mask) if not m], [e for e, m in zip(examples, mask) if m]
