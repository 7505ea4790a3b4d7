"""Run the persona pipeline up to its `steer` step (earlier finished steps are skipped).

python -m experiments.steer --config=configs/organism.py --workdir=DIR
"""
from experiments import _common
from persona_jax.pipeline import cli


def main(argv):
    del argv
    _common.run_steps(_common.steps_through("steer"))


if __name__ == "__main__":
    cli.run(main)
