"""A persona vector from one model applied to another (issue 26): direct for the same
width and depth, else through a map fitted on neutral texts; its cosine to the target's
own vector and its steering share on the target (--config.model).

python -m experiments.transfer --config=configs/base.py --workdir=DIR --config.model=TARGET \
  --config.transfer.source=SOURCE --config.transfer.source_workdir=SOURCE_RUN [--config.transfer.kind=ridge]
Writes transfer.json, transfer.md, vectors/<trait>_<reduction>_mapped and transfer_map/ into DIR.
"""
from experiments import _common
from persona_jax.pipeline import cli


def main(argv):
    del argv
    from persona_jax.pipeline import setup as runner
    from persona_jax.pipeline import transfer_step

    cfg = _common.CONFIG.value
    target, judge, source = runner.setup(cfg, _common.WORKDIR.value, check=lambda: transfer_step.check(cfg))  # before anything is written
    report = transfer_step.run(cfg, _common.WORKDIR.value, judge, source, target, progress=cfg.progress)
    for name, e in report["traits"].items():
        s = e.get("steering") or {}
        print(f"{name}: cosine to the target's own vector {e['cosine_at_layer']:.3f} at layer {e['layer']}; "
              f"steering share {s.get('share')}")
    print(f"transfer: {_common.WORKDIR.value}/transfer.md")


if __name__ == "__main__":
    cli.run(main)
