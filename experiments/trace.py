"""A persona vector at every checkpoint of one training run (issue 26): cosines to the
final and previous checkpoints' vectors, steering share and monitoring r on a target.

python -m experiments.trace --config=configs/base.py --workdir=DIR \
  --config.trace.checkpoints='(RUN_DIR,)' [--config.trace.target=MODEL]
Writes trace.json, trace.md, trace.png and trace_vectors/ (Orbax) into DIR; resumable.
"""
from experiments import _common
from persona_jax.pipeline import cli


def main(argv):
    del argv
    from persona_jax.pipeline import setup as runner
    from persona_jax.pipeline import trace_step

    cfg = _common.CONFIG.value
    _, judge, source = runner.setup(cfg, _common.WORKDIR.value, need_model=False,
                                    check=lambda: trace_step.resolve(cfg))
    report = trace_step.run(cfg, _common.WORKDIR.value, judge, source, progress=cfg.progress)
    for name, t in report["traits"].items():
        fc, fs = t["first_cosine"], t["first_share"]
        print(f"{name}: cosine >= {report['cosine_threshold']} first at {fc['name'] or 'never'}; "
              f"steering share >= {report['share_threshold']} first at {fs['name'] or 'never'}")
    print(f"trace: {_common.WORKDIR.value}/trace.md")


if __name__ == "__main__":
    cli.run(main)
