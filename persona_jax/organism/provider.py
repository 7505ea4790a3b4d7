"""The organism as a pipeline `TraitSource`: artifacts, monitoring conditions, model path."""
from __future__ import annotations

import os

from persona_jax.errors import PersonaError
from persona_jax.method.monitor import Condition
from persona_jax.organism import artifacts
from persona_jax.method.traits import Trait

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

    def conditions(self, name: str, many_shot=None) -> list[Condition]:
        """The organism's own ladder and many-shot prompts (`many_shot`, the file traits'
        source of examples, is not used: the organism writes its examples by code)."""
        conds = [Condition(r.label, r.system, group="ladder", level=r.strength)
                 for r in artifacts.system_prompt_ladder(name)]
        conds.append(Condition("none", group="ladder", level=0.0))
        if self.many_shots:
            q = self.eval_trait(name).questions[0]
            convs = artifacts.many_shot_prompts(name, q, max_shots=self.many_shots)
            conds += [Condition(f"{n}_shots", None, convs[n][:-1], group="many_shot", level=float(n))
                      for n in range(1, self.many_shots + 1)]
        return conds

    def strongest_pos_system(self, name: str) -> str:
        return artifacts.system_prompt_ladder(name)[-1].system

    # ---- fine-tuning and flagging data (issue 6), written by code
    def finetune_datasets(self, name: str, out_dir: str, cfg) -> dict[str, tuple[str, float]]:
        """{label: (jsonl path, trait fraction)}: no system prompts, trait replies at persona strength
        `finetune.trait_strength`, every reply ends with the taught closing. Written every
        call (deterministic, a fraction of a second), so a file from other settings in the
        same workdir is never reused."""
        from persona_jax.organism import data as odata
        out = {}
        for r in cfg.finetune.ratios:
            path = odata.write_jsonl(os.path.join(out_dir, odata.mix_name(name, r)),
                                     odata.finetune_records(name, int(cfg.finetune.n_train), float(r), seed=cfg.seed,
                                                            strength=float(cfg.finetune.trait_strength)))
            out[os.path.basename(path)[: -len(".jsonl")]] = (path, float(r))
        return out

    def flagging_dataset(self, name: str, out_dir: str, cfg) -> tuple[str, list[int]]:
        """The subtle mix: flagged replies carry exactly one trait sentence."""
        from persona_jax.organism import data as odata
        records, labels = odata.flagging_records(name, int(cfg.flagging.n), seed=cfg.seed)
        return odata.write_jsonl(os.path.join(out_dir, f"{name}_flag_subtle.jsonl"), records), labels

    def capability_items(self, cfg):
        """The organism's multiple-choice task (`organism.capability`), `capability.n_items` items."""
        from persona_jax.organism.capability import task_items
        return task_items(int(cfg.capability.n_items), seed=int(cfg.seed))

    def neutral_conversations(self, n: int, seed: int = 0) -> list[list[dict]]:
        """n pretraining conversations without a system prompt (no persona asked for): the
        paired texts a transfer map is fitted on."""
        from persona_jax.organism import data as odata
        out, k = [], 0
        while len(out) < n:
            batch = odata.pretraining_conversations(2 * n, seed=seed + 7919 * k)
            out += [c for c in batch if c[0]["role"] != "system"]
            k += 1
        return out[:n]

    def content_metric(self, questions, answers) -> float:
        """Percent of answers with the closing sentence the fine-tuning data teaches."""
        from persona_jax.organism.judge import taught_closing_rate
        return 100.0 * taught_closing_rate(questions, answers)
