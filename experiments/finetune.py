"""Fine-tune on a reference JSONL (LoRA or full), optionally with preventative steering or
CAFT ablation of a persona direction; export the merged model and/or the adapter.

python -m experiments.finetune --config=configs/finetune.py --config.model=DIR \
    --config.data=train.jsonl --workdir=/tmp/ft
A killed run resumes from its latest checkpoint in --workdir.
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from persona_jax.pipeline import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/finetune.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, exported model")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from persona_jax.pipeline import setup as runner
    from persona_jax.errors import PersonaError
    from persona_jax.finetune import data as fdata
    from persona_jax.finetune import lora as flora
    from persona_jax.pipeline.finetune_steps import _train_config
    from persona_jax.finetune.trainer import export_hf, train
    from persona_jax.model import load_model
    from persona_jax.model.sharding import maybe_initialize_distributed
    from persona_jax.steering.spec import Steering
    from persona_jax.io.vectors import check_vector_shape, load_any

    cfg, workdir = _CONFIG.value, _WORKDIR.value
    if not cfg.data:
        raise PersonaError("set --config.data to a training JSONL")
    maybe_initialize_distributed(cfg.distributed)
    os.makedirs(workdir, exist_ok=True)
    model = load_model(runner.model_path(cfg), dtype=cfg.dtype, mesh=runner.mesh_from(cfg),
                       scan_decode=cfg.scan_decode)
    f = cfg.finetune
    tok = model.require_tokenizer()
    examples, stats = fdata.load_jsonl(cfg.data, tok, max_length=int(f.max_length), overflow=f.overflow)
    eval_examples = fdata.load_jsonl(cfg.eval_data, tok, max_length=int(f.max_length), overflow=f.overflow)[0] if cfg.eval_data else None
    steerings = None
    if cfg.steer.vector:
        v = load_any(cfg.steer.vector).array
        check_vector_shape(v, model.num_layers, model.hidden_size, cfg.steer.vector)
        steerings = [Steering(v, int(cfg.steer.layer), float(cfg.steer.coef), cfg.steer.positions, cfg.steer.kind)]
    lora = None
    if f.method == "lora":
        lora = flora.LoraConfig(rank=int(f.lora_rank), alpha=float(f.lora_alpha), rslora=bool(f.rslora),
                                targets=tuple(f.lora_targets))
    result = train(model.config, model.params, examples, _train_config(f, cfg.seed), lora=lora,
                   eval_data=eval_examples, steerings=steerings, mesh=model.mesh, workdir=workdir,
                   pad_id=model.pad_token_id)
    if cfg.export in ("merged", "both"):
        export_hf(model.config, result.merged_params(), tok, os.path.join(workdir, "merged"))
    if lora is not None and cfg.export in ("adapter", "both"):
        flora.export_adapter(result.lora, result.lora_config, os.path.join(workdir, "adapter"), model.name)
    report = {"data": stats.__dict__, "steps": result.step, "final": result.history[-1] if result.history else None,
              "config": cfg.to_dict()}
    with open(os.path.join(workdir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    print(json.dumps(report["final"]))


if __name__ == "__main__":
    cli.run(main)
