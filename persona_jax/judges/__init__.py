"""Judges: score answers for trait expression and coherence (METHOD.md 3)."""
from persona_jax.judges.base import Judge, Score, judge_csv
from persona_jax.judges.rubrics import COHERENCE_PROMPT, render
from persona_jax.judges.aggregate import (
    aggregate,
    aggregate_0_100,
    aggregate_0_10,
    aggregate_binary,
)


def __getattr__(name):
    # Lazy so importing the interface does not pull in the openai SDK or asyncio setup.
    if name == "OpenAIJudge":
        from persona_jax.judges.openai_judge import OpenAIJudge

        return OpenAIJudge
    raise AttributeError(name)


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
    "judge_csv",
]
