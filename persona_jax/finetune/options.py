"""The reference's `training.py` options as plain arguments of the trainer.

Runners and pipeline steps pass their config section (any object with the attributes
below, e.g. an ml_collections ConfigDict; this layer does not import ml_collections):

  learning_rate, warmup_steps, batch_size, grad_accum, num_steps (0 = epochs), epochs,
  schedule ("linear" | "cosine" | "constant" | "constant_with_warmup"), weight_decay
  (the reference's default is 0.01), compute_dtype, remat, checkpoint_every, eval_every,
  progress; method ("lora" | "full"), lora_rank, lora_alpha, rslora, lora_targets,
  lora_dropout.

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
from persona_jax.finetune import lora as flora
from persona_jax.finetune.trainer import TrainConfig

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


def train_config(f, seed: int) -> TrainConfig:
    """TrainConfig from a config section `f` (missing attributes take TrainConfig's defaults)."""
    d = TrainConfig()

    def get(name, default, cast):
        value = getattr(f, name, None)
        return default if value is None else cast(value)

    num_steps = get("num_steps", 0, int)
    return TrainConfig(
        learning_rate=get("learning_rate", d.learning_rate, float), warmup_steps=get("warmup_steps", d.warmup_steps, int),
        batch_size=get("batch_size", d.batch_size, int), grad_accum=get("grad_accum", d.grad_accum, int),
        num_steps=num_steps or None, epochs=get("epochs", 1, int), schedule=get("schedule", "linear", str),
        weight_decay=get("weight_decay", d.weight_decay, float), seed=int(seed),
        compute_dtype=get("compute_dtype", d.compute_dtype, str), remat=get("remat", False, bool),
        checkpoint_every=get("checkpoint_every", 0, int), eval_every=get("eval_every", 0, int),
        lora_dropout=get("lora_dropout", 0.0, float), progress=get("progress", True, bool))


def lora_config(f) -> flora.LoraConfig | None:
    """The adapter to train (method "lora"), or None for full fine-tuning."""
    method = getattr(f, "method", "lora")
    if method == "full":
        return None
    if method != "lora":
        raise PersonaError(f"finetune.method must be 'full' or 'lora'; got {method!r}")
    return flora.LoraConfig(rank=int(f.lora_rank), alpha=float(f.lora_alpha), rslora=bool(f.rslora),
                            targets=tuple(f.lora_targets))


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
