"""Judges: score answers for trait expression and coherence (METHOD.md 3)."""
from persona_jax.judges.base import Judge, Score, judge_csv
from persona_jax.judges.rubrics import COHERENCE_PROMPT, render
from persona_jax.judges.aggregate import (
    aggregate,
    aggregate_0_100,
    aggregate_0_10,
    aggregate_binary,
)


_LAZY = ("OpenAIJudge", "JudgeCache", "run_sync")


def __getattr__(name):
    # Lazy so importing the interface does not pull in the openai SDK and tqdm.
    if name in _LAZY:
        from persona_jax.judges import openai_judge

        return getattr(openai_judge, name)
    raise AttributeError(f"module 'persona_jax.judges' has no attribute {name!r}")


__all__ = [
    "Judge",
    "Score",
    "COHERENCE_PROMPT",
    "render",
    "aggregate",
    "aggregate_0_100",
    "aggregate_0_10",
    "aggregate_binary",
    "OpenAIJudge",
    "JudgeCache",
    "run_sync",
    "judge_csv",
]
