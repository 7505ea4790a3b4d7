"""Run the persona pipeline up to its `control` step (earlier finished steps are skipped):
open- against closed-loop control (constant, conditional, guards, whitened) in two settings.

python -m experiments.control --config=configs/organism.py --workdir=DIR
"""
from experiments import _common
from persona_jax.pipeline import cli


def main(argv):
    del argv
    _common.run_steps(_common.steps_through("control"))


if __name__ == "__main__":
    cli.run(main)
