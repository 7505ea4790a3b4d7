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

Steering across layers: --config.steer.all_layers=True steers (or, kind=ablate, ablates:
CAFT) at every layer 1..L; --config.steer.incremental=True adds v[l] - v[l-1] at each
steered layer instead of v[l] (the paper's appendix J.3).
Preventative-coefficient sweep: --config.steer.coefs="(0,2,5)" runs one fine-tune per
coefficient under --workdir/coef_<c>/; with --config.eval.trait (a trait file's
evaluation questions and rubric, judged by --config.eval.judge) every model, the base
included, is scored, and report.json / report.md hold the table of trait score against
the coefficient.
"""
import os

from absl import flags
from ml_collections import config_flags

from persona_jax.pipeline import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/finetune.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, exported model")
flags.mark_flags_as_required(["config", "workdir"])


def steer_layers(steer, num_layers=None) -> list[int]:
    """The steering layers of a config's `steer` section: every layer 1..num_layers when
    `all_layers` is set, else `layers` when set, else `layer`."""
    if getattr(steer, "all_layers", False):
        from persona_jax.errors import PersonaError
        from persona_jax.steering.spec import every_layer
        if num_layers is None:
            raise PersonaError("steer.all_layers needs the model's layer count")
        return every_layer(num_layers)
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


def sweep_coefs(steer) -> list[float] | None:
    """The preventative coefficients of a sweep (`steer.coefs`), or None for one run at `steer.coef`."""
    coefs = getattr(steer, "coefs", None) or ()
    if isinstance(coefs, (int, float)):
        coefs = (coefs,)
    if isinstance(coefs, str):
        coefs = [x for x in coefs.replace("(", "").replace(")", "").split(",") if x.strip()]
    try:
        out = [float(x) for x in coefs]
    except (TypeError, ValueError):
        from persona_jax.errors import PersonaError
        raise PersonaError(f"steer.coefs must be numbers; got {coefs!r}") from None
    if len(set(out)) != len(out):
        from persona_jax.errors import PersonaError
        raise PersonaError(f"steer.coefs lists a coefficient twice: {out}")
    return out or None


def main(argv):
    del argv
    import dataclasses

    import jax

    from persona_jax.errors import PersonaError
    from persona_jax.finetune import lora as flora
    from persona_jax.finetune import options
    from persona_jax.finetune.trainer import export_hf, train
    from persona_jax.io.distributed import writer_only
    from persona_jax.io.reports import write_json, write_text
    from persona_jax.io.vectors import check_vector_shape, load_any
    from persona_jax.model import load_model
    from persona_jax.model.sharding import maybe_initialize_distributed
    from persona_jax.pipeline import setup as runner
    from persona_jax.method.trait_eval import trait_score
    from persona_jax.steering.spec import Steering, incremental_steering

    cfg, workdir = _CONFIG.value, _WORKDIR.value
    coefs = sweep_coefs(cfg.steer)
    # the trait the runs are scored on (checked before the model loads)
    e = cfg.get("eval")
    trait = judge = sampling = None
    if e is not None and e.trait:
        from persona_jax.method import traits as tr
        from persona_jax.method.responses import Sampling
        trait = tr.load_trait(tr.trait_paths(e.trait_dir, e.trait)[1], name=e.trait)
        if int(e.n_per_question) < 1:
            raise PersonaError(f"eval.n_per_question must be >= 1; got {e.n_per_question}")
        sampling = Sampling(max_new_tokens=int(e.max_new_tokens),
                            temperature=0.0 if int(e.n_per_question) == 1 else float(e.temperature),
                            top_p=float(e.top_p), seed=cfg.seed, batch_size=int(e.batch_size),
                            chunk_size=max(int(e.batch_size) * 4, 1))
    if not cfg.data:
        raise PersonaError("set --config.data to a training JSONL (or a comma-separated list of them)")
    paths = options.training_files(cfg.data)
    f = cfg.finetune
    lora = runner.lora_config(f)  # bad LoRA options fail before the model loads
    tc = runner.train_config(f, cfg.seed)
    tc.validate()
    maybe_initialize_distributed(cfg.distributed)
    if trait is not None:
        os.makedirs(workdir, exist_ok=True)
        judge = runner.make_judge(e.judge, workdir, progress=False)
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
    v, layers = None, None
    if cfg.steer.vector:
        v = load_any(cfg.steer.vector).array
        check_vector_shape(v, model.num_layers, model.hidden_size, cfg.steer.vector)
        layers = steer_layers(cfg.steer, model.num_layers)
    elif coefs is not None:
        raise PersonaError("steer.coefs (a preventative-coefficient sweep) needs steer.vector")

    def steerings_at(coef):
        if v is None:
            return None
        if bool(cfg.steer.get("incremental", False)):
            if cfg.steer.kind != "add":
                raise PersonaError("steer.incremental adds the increments v[l] - v[l-1]; it needs steer.kind=add")
            s = incremental_steering(v, layers, float(coef), cfg.steer.positions)
        else:
            s = Steering(v, layers if len(layers) > 1 else layers[0], float(coef), cfg.steer.positions, cfg.steer.kind)
        s.validate(model.num_layers, model.hidden_size)
        return [s]

    def run(coef, wd):
        result = train(model.config, model.params, examples, tc, lora=lora, eval_data=eval_examples,
                       steerings=steerings_at(coef), mesh=model.mesh, workdir=wd, pad_id=model.pad_token_id)
        merged = None
        if cfg.export in ("merged", "both") or judge is not None:
            merged = result.merged_params()
        if cfg.export in ("merged", "both"):
            out = merged
            if jax.process_count() > 1:  # weights sharded over hosts: every process gathers, process 0 writes
                from jax.experimental import multihost_utils
                out = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), merged)
            writer_only(export_hf)(model.config, out, tok, os.path.join(wd, "merged"))
        if lora is not None and cfg.export in ("adapter", "both"):
            writer_only(flora.export_adapter)(result.lora, result.lora_config, os.path.join(wd, "adapter"),
                                              os.path.abspath(model.name) if os.path.isdir(model.name) else model.name,
                                              config=model.config)
        rec = {"steps": result.step, "final": result.history[-1] if result.history else None}
        if judge is not None:
            tuned = dataclasses.replace(model, params=merged)
            rec.update(trait_score(tuned, judge, trait, os.path.join(wd, f"eval_{trait.name}.csv"), sampling,
                                   int(e.n_questions), int(e.n_per_question)))
        del result, merged
        return rec

    for c in coefs or [cfg.steer.coef]:
        steerings_at(c)  # a bad steering setting fails before any training
    base_score = None
    if judge is not None:
        base_score = trait_score(model, judge, trait, os.path.join(workdir, f"eval_{trait.name}_base.csv"), sampling,
                                 int(e.n_questions), int(e.n_per_question))
    data = {**stats.__dict__, "files": paths, "n_train": len(examples),
            "n_eval": len(eval_examples) if eval_examples is not None else 0, "held_out": held_out}
    report = {"data": data, "processes": jax.process_count(), "config": cfg.to_dict()}
    if coefs is None:
        rec = run(cfg.steer.coef, workdir)
        report.update(rec)
        if base_score is not None:
            report["base"] = base_score
    else:
        report["sweep"] = []
        for c in coefs:
            rec = run(c, os.path.join(workdir, f"coef_{c:g}"))
            report["sweep"].append({"coef": c, "workdir": os.path.join(workdir, f"coef_{c:g}"), **rec})
        report["base"] = base_score
        report["markdown"] = sweep_markdown(report, trait.name if trait is not None else None)
        write_text(os.path.join(workdir, "report.md"), report["markdown"] + "\n")
    write_json(os.path.join(workdir, "report.json"), report)
    print(report.get("final") if coefs is None else report["markdown"])


def sweep_markdown(report, trait_name) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.2f}"
    head = f"| coefficient | {trait_name} | coherence | final loss |" if trait_name else "| coefficient | final loss |"
    lines = ["# Preventative-coefficient sweep", "", head, "|---" * (head.count("|") - 1) + "|"]
    if trait_name and report.get("base"):
        lines.append(f"| base model (not fine-tuned) | {f(report['base']['trait'])} | {f(report['base']['coherence'])} | |")
    for r in report["sweep"]:
        loss = f((r.get("final") or {}).get("loss"))
        lines.append(f"| {r['coef']:g} | {f(r.get('trait'))} | {f(r.get('coherence'))} | {loss} |" if trait_name
                     else f"| {r['coef']:g} | {loss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
