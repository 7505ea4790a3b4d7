"""Train the persona organism from scratch (same seed -> same loss curve).

python -m experiments.train_organism --workdir=DIR [--install] [--config.train.num_steps=N]
(the default --config is configs/organism_train.py, the record of the shipped run)
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from persona_jax.pipeline import cli
from persona_jax.organism import train as otrain

_CONFIG = config_flags.DEFINE_config_file("config", "configs/organism_train.py", "the organism's training record")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics.jsonl and model/ go")
_INSTALL = flags.DEFINE_bool("install", False, "copy the trained model into persona_jax/organism/assets")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    cfg = _CONFIG.value
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "organism_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    result, model_dir = otrain.train_organism(
        cfg.arch.to_dict(), cfg.corpus.to_dict(), cfg.train.to_dict(), _WORKDIR.value)
    last = result.history[-1]
    print(f"trained {result.step} steps: loss {last['loss']:.4f}, eval_loss {last.get('eval_loss', float('nan')):.4f}")
    print(f"model: {model_dir}")
    if _INSTALL.value:
        otrain.install(model_dir)
        print("installed into the package assets")


if __name__ == "__main__":
    cli.run(main)
