"""The organism as a pipeline `TraitSource`: artifacts, monitoring conditions, model path."""
from __future__ import annotations

import os

from persona_jax.errors import PersonaError
from persona_jax.monitor import Condition
from persona_jax.organism import artifacts
from persona_jax.traits import Trait

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


def organism_path() -> str:
    """The shipped, trained organism (HF layout: config.json, model.safetensors, tokenizer)."""
    if not os.path.exists(os.path.join(ASSETS, "model.safetensors")):
        raise PersonaError(f"the trained organism is missing from {ASSETS}; "
                           "train it with python -m experiments.train_organism --workdir=DIR --install")
    return ASSETS


class OrganismTraits:
    """Trait artifacts made by code; conditions = the system-prompt ladder + many-shot prompts."""

    def __init__(self, many_shots: int = 3):
        self.many_shots = many_shots

    def _trait(self, name: str, split: str) -> Trait:
        a = artifacts.trait_artifact(name, split)
        return Trait(name=name, instruction=a["instruction"], questions=a["questions"], eval_prompt=a["eval_prompt"])

    def extract_trait(self, name: str) -> Trait:
        return self._trait(name, "extract")

    def eval_trait(self, name: str) -> Trait:
        return self._trait(name, "eval")

    def conditions(self, name: str) -> list[Condition]:
        conds = [Condition(r.label, r.system) for r in artifacts.system_prompt_ladder(name)]
        conds.append(Condition("none"))
        if self.many_shots:
            q = self.eval_trait(name).questions[0]
            convs = artifacts.many_shot_prompts(name, q, max_shots=self.many_shots)
            conds += [Condition(f"{n}_shots", None, convs[n][:-1]) for n in range(1, self.many_shots + 1)]
        return conds

    def strongest_pos_system(self, name: str) -> str:
        return artifacts.system_prompt_ladder(name)[-1].system
