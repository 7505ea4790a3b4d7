"""The organism across training and across models (issue 26): train from scratch with
dense checkpoints, trace all traits, steer the fine-tuned organism with early vectors,
transfer vectors between two organisms both ways. Resumable.

python -m experiments.organism_trace --config=configs/organism_trace.py --workdir=/tmp/organism_trace
"""
from experiments import _common
from persona_jax.pipeline import cli


def main(argv):
    del argv
    from persona_jax.pipeline import setup as runner
    from persona_jax.pipeline import trace_study

    cfg = _common.CONFIG.value
    _, judge, source = runner.setup(cfg, _common.WORKDIR.value, need_model=False)
    study = trace_study.run(cfg, _common.WORKDIR.value, judge, source, progress=cfg.progress)
    print("\n".join(trace_study.summary_rows(study)))
    print(f"study: {_common.WORKDIR.value}/study.md")


if __name__ == "__main__":
    cli.run(main)
