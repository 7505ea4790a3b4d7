"""Flags shared by the pipeline runners: --config (ml_collections file) and --workdir."""
from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/organism.py")
WORKDIR = flags.DEFINE_string("workdir", None, "directory for every artifact of the run")
flags.mark_flags_as_required(["config", "workdir"])


def run_steps(steps):
    """Run the given pipeline steps (None = the config's own list)."""
    from persona_jax.pipeline import registry
    from persona_jax.pipeline import setup as runner

    cfg = CONFIG.value
    if steps is not None:
        with cfg.unlocked():
            cfg.steps = tuple(steps)
    model, judge, source = runner.setup(cfg, WORKDIR.value)
    return registry.run(model, judge, source, cfg, WORKDIR.value, progress=cfg.progress)


def steps_through(step):
    """A single-step runner also runs the earlier steps it depends on (finished ones are skipped)."""
    from persona_jax.pipeline import registry

    return registry.steps_through(step)
