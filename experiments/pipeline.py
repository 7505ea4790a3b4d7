"""Run every step of the persona pipeline into one --workdir (finished steps are skipped).

python -m experiments.pipeline --config=configs/organism.py --workdir=/tmp/organism_run
"""
from experiments import _common
from persona_jax.pipeline import cli


def main(argv):
    del argv
    _common.run_steps(None)


if __name__ == "__main__":
    cli.run(main)
