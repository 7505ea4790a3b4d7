"""The pipeline's `control` step (issue 27): open- against closed-loop control of the
trait at the chosen layer (`method/control_eval.py`), in both settings, with capability.

Reads `cfg.control`; the coefficient defaults to the steering step's best negative
coefficient (the constant arm is then the paper's negative steering), else its best
positive one. Writes `{trait}/control/` (one CSV per arm and setting, the whitening
arrays, control.png) and `{trait}/control.json`.
"""
from __future__ import annotations

import os

from persona_jax.errors import PersonaError
from persona_jax.method import control_eval as ce
from persona_jax.pipeline import steps as core


@core.resumable_step("control.json")
def step_control(model, judge, source, name: str, cfg, workdir: str, entry: dict, progress=True) -> dict:
    c = cfg.control
    trait = source.eval_trait(name)
    questions = core.first_questions(trait, c.n_questions)
    vector = core.load_step_vector(workdir, name, c.reduction, model)
    layer = int(entry["layer"])
    coef = c.coef
    if coef is None:
        st = entry.get("steering") or {}
        coef = abs(st.get("negative_coef") or 0.0) or abs(st.get("best_coef") or 0.0)
        if not coef:
            raise PersonaError("the control step needs a coefficient: set control.coef, or run the steer step first "
                               "(its best negative coefficient is the default)")
    from persona_jax.pipeline import capability_step
    items, cap_kw = None, None
    if c.capability and cfg.get("capability") is not None and cfg.capability.enabled:
        items = capability_step._items(source, cfg)
        k = cfg.capability
        cap_kw = {"scorings": (str(k.scoring),), "prompt_format": str(k.prompt_format), "chat": bool(k.chat),
                  "batch_size": int(k.batch_size)}
    out_dir = os.path.join(workdir, name, "control")
    summary = ce.evaluate(
        model, judge, trait, vector, layer, float(coef), questions, source.strongest_pos_system(name), out_dir,
        core.sampling_from(c, cfg.seed + 3), int(c.n_per_question), percentiles=tuple(float(p) for p in c.percentiles),
        ridge=float(c.ridge) if c.whiten else None, items=items or None, cap_kw=cap_kw,
        timing=bool(c.timing),
        positions=str(cfg.steer.positions), progress=progress)
    ce.plot(summary, os.path.join(out_dir, "control.png"), name)
    summary["markdown"] = "### Control\n\n" + ce.markdown(name, summary, f"{name}/control/control.png")
    return summary
