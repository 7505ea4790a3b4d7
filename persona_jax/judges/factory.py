"""Build the judge a config asks for."""
from __future__ import annotations

import os

from persona_jax.errors import PersonaError


def make_judge(cfg, workdir: str):
    """cfg: the `judge` ConfigDict (kind = openai | local | organism)."""
    if cfg.kind == "openai":
        from persona_jax.judges.openai_judge import OpenAIJudge
        return OpenAIJudge(cfg.model, base_url=cfg.base_url or None, api_key_env=cfg.api_key_env,
                           aggregation=cfg.aggregation, max_concurrency=int(cfg.max_concurrency),
                           cache_path=os.path.join(workdir, "judge_cache.sqlite"))
    if cfg.kind == "local":
        from persona_jax.judges.local_judge import LocalJudge
        from persona_jax.models import load_model
        if not cfg.local_model:
            raise PersonaError("judge.kind=local needs judge.local_model (a checkpoint directory)")
        return LocalJudge(load_model(cfg.local_model, dtype=cfg.local_dtype), aggregation=cfg.aggregation)
    if cfg.kind == "organism":
        from persona_jax.organism.judge import OrganismJudge
        return OrganismJudge()
    raise PersonaError(f"unknown judge kind {cfg.kind!r}; use openai, local or organism")
