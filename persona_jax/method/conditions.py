"""Monitoring conditions for any trait (METHOD.md 7 and 11), built by code from its artifacts.

- `graded_ladder(trait)`: system prompts from firmly discouraging to firmly encouraging
  the trait, made from the trait's own pos/neg instruction pair with intensity words and
  discouraging forms (the organism's ladder does the same in its own language). The
  wording is this project's.
- `many_shot_conditions(examples)`: 0/5/10/15/20 example exchanges that show the trait
  before the question; the examples are the extraction step's kept pos responses
  (`kept_pos_examples`: the rows of `{trait}_pos_instruct.csv` whose aligned pair passed
  the filter rule), no system prompt.
- `file_trait_conditions(trait, ...)`: both families, as the pipeline's FileTraits uses them.

Every condition carries a `group` ("ladder" / "many_shot") and a nominal `level` (the
intended strength, -1 .. 1, or the shot count), so results can be read per family.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.io.csvio import read_csv
from persona_jax.method.extract import FilterRule, filter_pairs
from persona_jax.method.monitor import Condition
from persona_jax.method.traits import Trait, a_or_an, system_prompt

NEUTRAL_SYSTEM = "You are a helpful assistant."
SHOTS = (0, 5, 10, 15, 20)  # the paper's many-shot counts

_FULLY = "Keep to this in every sentence, as fully as you can."


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text[-1:] in ".!?" else text + "."


def graded_ladder(trait: Trait, antonym: str = "helpful", pair: int = 0) -> list[Condition]:
    """11 conditions from discouraging to encouraging the trait, ascending nominal level.

    Made from instruction pair `pair` of the trait: the neg instruction with and without
    an insistence sentence, three discouraging forms after the neutral prompt (from
    "do not be at all" to "try not to be"), the neutral prompt, no system prompt,
    the pos instruction under "slightly" and "somewhat" hedges, the reference's pos
    prompt, and the pos instruction with an insistence sentence.
    """
    if not 0 <= pair < len(trait.instruction):
        raise PersonaError(f"ladder pair {pair} is out of range for trait {trait.name!r} "
                           f"({len(trait.instruction)} instruction pairs); use 0..{len(trait.instruction) - 1}.")
    name = trait.name
    pos = _sentence(trait.instruction[pair]["pos"])
    neg = _sentence(trait.instruction[pair]["neg"])
    rungs = [
        ("neg_insist", -1.0, f"{system_prompt(name, antonym, neg)} {_FULLY}"),
        ("neg", -0.8, system_prompt(name, antonym, neg)),
        ("not_at_all", -0.6, f"{NEUTRAL_SYSTEM} Do not be {name} at all, not even slightly."),
        ("avoid", -0.4, f"{NEUTRAL_SYSTEM} Avoid being {name}."),
        ("try_not", -0.2, f"{NEUTRAL_SYSTEM} Try not to be {name}."),
        ("neutral", 0.0, NEUTRAL_SYSTEM),
        ("none", 0.0, None),
        ("slightly", 0.25, f"You are a slightly {name} assistant. Lean only a little this way: {pos}"),
        ("somewhat", 0.5, f"You are a somewhat {name} assistant. Follow this in part: {pos}"),
        ("pos", 0.8, system_prompt(name, name, pos)),
        ("pos_insist", 1.0, f"You are {a_or_an('extremely')} extremely {name} assistant. {pos} {_FULLY}"),
    ]
    return [Condition(label, system, group="ladder", level=level) for label, level, system in rungs]


def kept_pos_examples(pos_csv: str, neg_csv: str, trait: str, rule: FilterRule = FilterRule()) -> list[dict]:
    """[{question, answer}] of the pos rows whose aligned pair passed `rule` (file order)."""
    need = ("question", "answer", trait, "coherence")
    _, pos_rows = read_csv(pos_csv, required=need)
    _, neg_rows = read_csv(neg_csv, required=need)
    kept = filter_pairs(pos_rows, neg_rows, trait, rule, where=f"{pos_csv} / {neg_csv}")
    return [{"question": pos_rows[i]["question"], "answer": pos_rows[i]["answer"]} for i in kept]


def choose_examples(examples: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
    """n examples in a seeded order that spreads them over distinct questions first.

    Questions are shuffled, then taken round-robin (one answer per question per round,
    answers of a question shuffled too), so 20 shots from 20 questions use each once.
    """
    rng = np.random.default_rng(seed)
    by_q: dict[str, list[dict]] = {}
    for e in examples:
        by_q.setdefault(e["question"], []).append(e)
    queues = [[group[i] for i in rng.permutation(len(group))] for group in by_q.values()]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    out: list[dict] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def many_shot_conditions(examples: Sequence[dict], shots: Sequence[int] = SHOTS, seed: int = 0) -> list[Condition]:
    """One condition per shot count: the first n chosen examples as user/assistant turns
    (the same examples, nested: 10 shots extend the 5), no system prompt.

    Shot counts larger than the number of examples are dropped with a warning.
    """
    shots = sorted({int(n) for n in shots})
    if any(n < 0 for n in shots):
        raise PersonaError(f"many-shot counts must be >= 0; got {shots}.")
    fit = [n for n in shots if n <= len(examples)]
    if len(fit) < len(shots):
        logging.warning("many-shot: only %d kept pos examples, dropping shot counts %s",
                        len(examples), [n for n in shots if n > len(examples)])
    chosen = choose_examples(examples, max(fit, default=0), seed)
    conds = []
    for n in fit:
        prefix = [m for e in chosen[:n] for m in ({"role": "user", "content": e["question"]},
                                                  {"role": "assistant", "content": e["answer"]})]
        conds.append(Condition(f"{n}_shots", None, prefix, group="many_shot", level=float(n)))
    return conds


@dataclasses.dataclass(frozen=True)
class ManyShotSource:
    """Where many-shot examples come from: the extraction step's aligned response CSVs and
    the filter rule it used; `shots` the counts, `seed` the example order."""

    pos_csv: str
    neg_csv: str
    rule: FilterRule = dataclasses.field(default_factory=FilterRule)
    shots: Sequence[int] = SHOTS
    seed: int = 0


def file_trait_conditions(trait: Trait, antonym: str = "helpful", many_shot: Optional[ManyShotSource] = None,
                          pair: int = 0) -> list[Condition]:
    """The graded ladder, then the many-shot conditions when `many_shot` is given, its
    counts are not empty and its CSVs exist (otherwise the ladder alone, with a warning)."""
    conds = graded_ladder(trait, antonym, pair)
    if many_shot is None or not tuple(many_shot.shots):
        return conds
    missing = [p for p in (many_shot.pos_csv, many_shot.neg_csv) if not os.path.exists(p)]
    if missing:
        logging.warning("many-shot conditions skipped for %s: %s missing (run the extract step)",
                        trait.name, ", ".join(missing))
        return conds
    examples = kept_pos_examples(many_shot.pos_csv, many_shot.neg_csv, trait.name, many_shot.rule)
    return conds + many_shot_conditions(examples, many_shot.shots, many_shot.seed)
