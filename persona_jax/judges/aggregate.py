"""Turn a judge's one-token top-logprobs into a score (METHOD.md 3), as the reference does.

Every function takes `top_logprobs`: {token text: log-probability} for the top-k (k=20)
candidates of the single generated token, and returns a float or None. None means the
judge refused or answered something unparseable; callers must never treat it as 0.

Reference quirks kept on purpose:
- a token counts as a number when Python's `int(token)` accepts it (so surrounding
  whitespace is tolerated) and the value is in range;
- the 0.25 threshold compares the *unnormalised* number mass;
- `0_10` and `binary` look up "REFUSAL", "YES", "NO" and the digits by exact token text;
- `binary` returns a probability in [0, 1], not 0..100.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

MIN_MASS = 0.25  # below this total probability on valid answers the score is missing
AGGREGATIONS = ("0_100", "0_10", "binary")


def _probs(top_logprobs: Mapping[str, float]) -> dict[str, float]:
    return {tok: math.exp(lp) for tok, lp in top_logprobs.items()}


def _as_int(token: str) -> Optional[int]:
    try:
        return int(token)
    except (ValueError, TypeError):
        return None


def _weighted_mean(probs: Mapping[str, float], hi: int) -> Optional[float]:
    total = 0.0
    weighted = 0.0
    for tok, p in probs.items():
        value = _as_int(tok)
        if value is None or value < 0 or value > hi:
            continue
        weighted += value * p
        total += p
    if total < MIN_MASS:
        return None
    return weighted / total


def aggregate_0_100(top_logprobs: Mapping[str, float]) -> Optional[float]:
    """Probability-weighted mean of integer tokens in 0..100, normalised by their mass.

    Args:
      top_logprobs: {token: logprob}, up to 20 entries.

    Returns:
      score in [0, 100], or None when the integer tokens hold less than 0.25 probability.
    """
    return _weighted_mean(_probs(top_logprobs), 100)


def aggregate_0_10(top_logprobs: Mapping[str, float]) -> Optional[float]:
    """Weighted mean of digit tokens 0..9; None if "REFUSAL" beats every digit "0".."9".

    Returns:
      score in [0, 9], or None (refusal, or digit mass below 0.25).
    """
    probs = _probs(top_logprobs)
    if "REFUSAL" in probs and probs["REFUSAL"] > max(probs.get(str(i), 0.0) for i in range(10)):
        return None
    return _weighted_mean(probs, 9)


def aggregate_binary(top_logprobs: Mapping[str, float]) -> Optional[float]:
    """P(YES) / (P(YES) + P(NO)).

    Returns:
      probability in [0, 1], or None when P(REFUSAL) exceeds both P(YES) and P(NO), or
      when P(YES) + P(NO) < 0.25.
    """
    probs = _probs(top_logprobs)
    yes = probs.get("YES", 0.0)
    no = probs.get("NO", 0.0)
    refusal = probs.get("REFUSAL", 0.0)
    if refusal > yes and refusal > no:
        return None
    if yes + no < MIN_MASS:
        return None
    return yes / (yes + no)


_BY_NAME = {"0_100": aggregate_0_100, "0_10": aggregate_0_10, "binary": aggregate_binary}


def aggregate(top_logprobs: Mapping[str, float], aggregation: str = "0_100") -> Optional[float]:
    """Dispatch on the aggregation name ("0_100", "0_10" or "binary")."""
    return get_aggregator(aggregation)(top_logprobs)


def get_aggregator(aggregation: str):
    """The aggregation function for a name; PersonaError for an unknown name."""
    if aggregation not in _BY_NAME:
        from persona_jax.errors import PersonaError

        raise PersonaError(
            f"unknown judge aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}."
        )
    return _BY_NAME[aggregation]
