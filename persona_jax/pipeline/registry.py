"""The pipeline's steps, in the order they run: the one registry.

Each step is a function (context, entry) -> its summary, where `entry` holds the
summaries of the trait's earlier steps; `run` fills one entry per trait in this order
and writes report.json / report.md. A single-step runner runs `steps_through(step)`:
the steps up to it (finished ones are resumed from their summaries).
"""
from __future__ import annotations

import dataclasses
import logging
import os

from persona_jax.errors import PersonaError
from persona_jax.judges.base import Judge
from persona_jax.pipeline import finetune_steps as ft
from persona_jax.pipeline import steps as core


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What every step of one trait gets."""

    model: object
    judge: Judge | None
    source: core.TraitSource
    trait: str
    cfg: object  # the run's ConfigDict (this layer is the one that reads configs)
    workdir: str
    progress: bool = True


def _extract(c: StepContext, entry):
    return core.step_extract(c.model, c.judge, c.source, c.trait, c.cfg, c.workdir, c.progress)


def _steer(c: StepContext, entry):
    return core.step_steer(c.model, c.judge, c.source, c.trait, c.cfg, c.workdir, c.progress)


def _monitor(c: StepContext, entry):
    return core.step_monitor(c.model, c.judge, c.source, c.trait, c.cfg, c.workdir, entry["layer"], c.progress)


def _control(c: StepContext, entry):
    from persona_jax.pipeline.control_step import step_control
    return step_control(c.model, c.judge, c.source, c.trait, c.cfg, c.workdir, entry, c.progress)


def _finetune(c: StepContext, entry):
    return ft.step_finetune(c.model, c.judge, c.source, c.trait, c.cfg, c.workdir, entry)


def _flagging(c: StepContext, entry):
    return ft.step_flagging(c.model, c.judge, c.source, c.trait, c.cfg, c.workdir, entry)


# step name -> (report key, function), in run order
STEPS = {
    "extract": ("extraction", _extract),
    "steer": ("steering", _steer),
    "monitor": ("monitoring", _monitor),
    "control": ("control", _control),
    "finetune": ("finetune", _finetune),
    "flagging": ("flagging", _flagging),
}


def steps_through(step: str) -> list[str]:
    """The steps a single-step runner runs: `step` and every earlier one."""
    order = list(STEPS)
    return order[: order.index(step) + 1]


def chosen_layer(cfg, entry, num_layers: int) -> int:
    """The layer later steps use: monitor.layer when set, else the steering step's choice,
    else the last layer."""
    if cfg.monitor.layer is not None:
        return int(cfg.monitor.layer)
    if "steering" in entry:
        return entry["steering"]["layer"]
    return num_layers


def run(model, judge, source, cfg, workdir: str, progress: bool = True) -> dict:
    """Run the configured steps for every trait; write report.json and report.md."""
    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown:
        raise PersonaError(f"unknown pipeline step(s) {unknown}; known: {', '.join(STEPS)}")
    os.makedirs(workdir, exist_ok=True)
    # the method's instructions are system prompts: say when the chat template folded
    # them into the first user turn (Gemma 2's template rejects a system role)
    report = {"model": model.name, "config": cfg.to_dict(),
              "folds_system_prompt": bool(getattr(model, "folds_system_prompt", False)), "traits": {}}
    for name in cfg.traits:
        logging.info("trait %s", name)
        ctx = StepContext(model, judge, source, name, cfg, workdir, progress)
        entry = {}
        for step, (key, fn) in STEPS.items():
            if step in cfg.steps:
                entry[key] = fn(ctx, entry)
            if step == "steer":  # later steps read the chosen layer
                entry["layer"] = chosen_layer(cfg, entry, model.num_layers)
        report["traits"][name] = entry
        core.write_summary(os.path.join(workdir, "report.json"), report)
    if "finetune" in cfg.steps:  # issue 18: every fine-tuned model on every trait (needs every trait's vector)
        from persona_jax.pipeline import cross_trait
        cross_trait.run(model, judge, source, cfg, workdir, report, progress)
        core.write_summary(os.path.join(workdir, "report.json"), report)
    core.write_markdown(report, os.path.join(workdir, "report.md"))
    return report
