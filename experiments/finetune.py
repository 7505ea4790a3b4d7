"""Fine-tune on reference JSONL (LoRA or full), optionally with preventative steering or
CAFT ablation of a persona direction at one or more layers; export the merged model
and/or the adapter.

python -m experiments.finetune --config=configs/finetune.py --config.model=DIR \
    --config.data=train.jsonl[,more.jsonl] --workdir=/tmp/ft
Options of the reference's training.py: several training files, a held-out 10% for the
eval loss when no --config.eval_data is given (eval_fraction), epochs, linear / cosine /
constant schedules, weight decay 0.01, lora_dropout, a list of steering layers.
A killed run resumes from its latest checkpoint in --workdir. Every file (exports,
report.json) is written by process 0 only.
"""
import os

from absl import flags
from ml_collections import config_flags

from persona_jax.pipeline import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/finetune.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, exported model")
flags.mark_flags_as_required(["config", "workdir"])


def steer_layers(steer) -> list[int]:
    """The steering layers of a config's `steer` section: `layers` when set, else `layer`."""
    layers = getattr(steer, "layers", None) or ()
    if isinstance(layers, (int, float)):
        layers = (layers,)
    if isinstance(layers, str):
        layers = [x for x in layers.replace("(", "").replace(")", "").split(",") if x.strip()]
    try:
        return [int(x) for x in layers] or [int(steer.layer)]
    except (TypeError, ValueError):
        from persona_jax.errors import PersonaError
        raise PersonaError(f"steer.layers must be integers; got {layers!r}") from None


def main(argv):
    del argv
    import jax

    from persona_jax.errors import PersonaError
    from persona_jax.finetune import lora as flora
    from persona_jax.finetune import options
    from persona_jax.finetune.trainer import export_hf, train
    from persona_jax.io.distributed import writer_only
    from persona_jax.io.reports import write_json
    from persona_jax.io.vectors import check_vector_shape, load_any
    from persona_jax.model import load_model
    from persona_jax.model.sharding import maybe_initialize_distributed
    from persona_jax.pipeline import setup as runner
    from persona_jax.steering.spec import Steering

    cfg, workdir = _CONFIG.value, _WORKDIR.value
    if not cfg.data:
        raise PersonaError("set --config.data to a training JSONL (or a comma-separated list of them)")
    paths = options.training_files(cfg.data)
    f = cfg.finetune
    lora = runner.lora_config(f)  # bad LoRA options fail before the model loads
    tc = runner.train_config(f, cfg.seed)
    tc.validate()
    maybe_initialize_distributed(cfg.distributed)
    model = load_model(runner.model_path(cfg), dtype=cfg.dtype, mesh=runner.mesh_from(cfg),
                       scan_decode=bool(cfg.get("scan_decode", False)))
    tok = model.require_tokenizer()
    examples, stats = options.load_training_files(paths, tok, max_length=int(f.max_length), overflow=f.overflow)
    eval_examples, held_out = None, 0
    if cfg.eval_data:
        eval_examples = options.load_training_files(options.training_files(cfg.eval_data), tok,
                                                    max_length=int(f.max_length), overflow=f.overflow)[0]
    elif float(cfg.get("eval_fraction", 0.0) or 0.0) > 0:
        examples, eval_examples = options.split_eval(examples, float(cfg.eval_fraction), cfg.seed)
        held_out = len(eval_examples)
    steerings = None
    if cfg.steer.vector:
        v = load_any(cfg.steer.vector).array
        check_vector_shape(v, model.num_layers, model.hidden_size, cfg.steer.vector)
        layers = steer_layers(cfg.steer)
        steerings = [Steering(v, layers if len(layers) > 1 else layers[0], float(cfg.steer.coef),
                              cfg.steer.positions, cfg.steer.kind)]
        steerings[0].validate(model.num_layers, model.hidden_size)
    result = train(model.config, model.params, examples, tc, lora=lora, eval_data=eval_examples,
                   steerings=steerings, mesh=model.mesh, workdir=workdir, pad_id=model.pad_token_id)
    if cfg.export in ("merged", "both"):
        merged = result.merged_params()
        if jax.process_count() > 1:  # weights sharded over hosts: every process gathers, process 0 writes
            from jax.experimental import multihost_utils
            merged = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), merged)
        writer_only(export_hf)(model.config, merged, tok, os.path.join(workdir, "merged"))
    if lora is not None and cfg.export in ("adapter", "both"):
        writer_only(flora.export_adapter)(result.lora, result.lora_config, os.path.join(workdir, "adapter"),
                                          os.path.abspath(model.name) if os.path.isdir(model.name) else model.name,
                                          config=model.config)
    report = {"data": {**stats.__dict__, "files": paths, "n_train": len(examples),
                       "n_eval": len(eval_examples) if eval_examples is not None else 0, "held_out": held_out},
              "steps": result.step, "final": result.history[-1] if result.history else None,
              "processes": jax.process_count(), "config": cfg.to_dict()}
    write_json(os.path.join(workdir, "report.json"), report)
    print(report["final"])


if __name__ == "__main__":
    cli.run(main)
