"""The follow-up's three questions asked of the organism (issue 26), in one resumable run:

1. when does a persona form: organism A trained from scratch with dense early
   checkpoints (`study.checkpoint_steps`), every checkpoint traced on all traits;
2. do early vectors still steer the finished model after more training: the same
   vectors steering organism A fine-tuned on neutral chat (the organism's
   fine-tuning data at trait fraction 0, standing in for post-training);
3. do vectors move between models: organism B (another width, depth and seed, the same
   trainer and language) and A exchange vectors through ridge maps, both ways.

Layout under the workdir: train_a/, train_b/ (trainer workdirs with model/ exports),
finetuned/, trace/ (A's trace; its final steps in trace/final), trace_finetuned/,
organism_b/ (B's steps), transfer_a_to_b/, transfer_b_to_a/, study.json and study.md.
"""
from __future__ import annotations

import os

from persona_jax.finetune import data as fdata
from persona_jax.finetune.trainer import TrainConfig, export_hf, train
from persona_jax.io.atomic import atomic_open
from persona_jax.io.distributed import writer_only
from persona_jax.model import load_model
from persona_jax.organism import data as odata
from persona_jax.organism import tokenizer as otok
from persona_jax.organism import train as otrain
from persona_jax.pipeline import steps as core
from persona_jax.pipeline import trace_step, transfer_step


def train_model(s, arch, seed: int, d: str, checkpoint_steps=(), progress=True) -> str:
    """Train an organism from scratch into `d` (resumes); returns its exported model dir."""
    out = os.path.join(d, "model")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    tr = {**s.train.to_dict(), "seed": seed, "checkpoint_steps": tuple(checkpoint_steps), "max_checkpoints": 0}
    otrain.train_organism(arch.to_dict(), {**s.corpus.to_dict(), "seed": seed}, tr, d, progress=progress)
    return out


def finetune_neutral(s, base_dir: str, d: str, seed: int, progress=True) -> str:
    """Full fine-tuning of the model in `base_dir` on neutral organism chat; the export dir."""
    out = os.path.join(d, "model")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    f = s.finetune
    model = load_model(base_dir)
    tok = otok.load_tokenizer()
    records = odata.finetune_records(f.trait, int(f.n_train), 0.0, seed=seed)
    examples = fdata.from_conversations([r["messages"] for r in records], model.tokenizer,
                                        max_length=int(f.max_length))
    tc = TrainConfig(learning_rate=float(f.learning_rate), warmup_steps=int(f.warmup_steps),
                     batch_size=int(f.batch_size), grad_accum=1, num_steps=int(f.num_steps), seed=seed,
                     checkpoint_every=int(f.num_steps), progress=progress)
    result = train(model.config, model.params, examples, tc, workdir=os.path.join(d, "train"),
                   pad_id=tok.pad_token_id)
    export_hf(model.config, result.params, tok, out)
    return out


def _sub(cfg, **fields):
    """A copy of the run's config with some trace / transfer fields set."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        for path, value in fields.items():
            node = c
            *head, last = path.split(".")
            for h in head:
                node = node[h]
            node[last] = value
    return c


def run(cfg, workdir: str, judge, source, progress: bool = True) -> dict:
    s = cfg.study
    a_dir = train_model(s, s.arch_a, int(s.seed_a), os.path.join(workdir, "train_a"), s.checkpoint_steps, progress)
    run_a = os.path.join(workdir, "train_a")
    common = {"trace.checkpoints": (run_a,), "trace.tokenizer": a_dir}
    trace_a = trace_step.run(_sub(cfg, **common), os.path.join(workdir, "trace"), judge, source, progress)
    final_dir = os.path.join(workdir, "trace", "final")

    ft_dir = finetune_neutral(s, a_dir, os.path.join(workdir, "finetuned"), int(cfg.seed), progress)
    trace_ft = trace_step.run(_sub(cfg, **common, **{"trace.target": ft_dir, "trace.final_workdir": final_dir}),
                              os.path.join(workdir, "trace_finetuned"), judge, source, progress)

    b_dir = train_model(s, s.arch_b, int(s.seed_b), os.path.join(workdir, "train_b"), (), progress)
    b_work = os.path.join(workdir, "organism_b")
    transfers = {}
    for key, src, src_work, tgt, tgt_work in (("a_to_b", a_dir, final_dir, b_dir, b_work),
                                              ("b_to_a", b_dir, b_work, a_dir, final_dir)):
        c = _sub(cfg, **{"model": tgt, "transfer.source": src, "transfer.source_workdir": src_work,
                         "transfer.target_workdir": tgt_work})
        if key == "a_to_b":  # B's own extract and steer steps run here, before B is a source
            trace_step.ensure_steps(lambda: load_model(tgt, dtype=cfg.dtype), judge, source, c, tgt_work,
                                    ("extract", "steer"), progress)
        transfer_step.check(c)
        target = load_model(tgt, dtype=cfg.dtype)
        transfers[key] = transfer_step.run(c, os.path.join(workdir, f"transfer_{key}"), judge, source, target,
                                           progress)
    study = {"trace": trace_a, "trace_finetuned": trace_ft, "transfer": transfers}
    core.write_summary(os.path.join(workdir, "study.json"), study)
    _write_md(os.path.join(workdir, "study.md"), study)
    return study


def _f(v, nd=2):
    return "n/a" if v is None else f"{v:.{nd}f}"


def summary_rows(study: dict) -> list[str]:
    """The README table: per trait, when the vector forms, the fine-tuned organism steered
    by early vectors, and transfer both ways."""
    tr, ft, xf = study["trace"], study["trace_finetuned"], study["transfer"]
    ck = tr["checkpoints"]
    lines = ["| trait | layer | cos >= 0.9 first at step (fraction) | share >= 0.8 first at step (fraction) | "
             f"share on the fine-tuned organism at step {ck[0]['step']} / {ck[len(ck) // 4]['step']} / "
             f"{ck[-1]['step']} | A->B R² / cos / share | B->A R² / cos / share |",
             "|---|---|---|---|---|---|---|"]
    for name, t in tr["traits"].items():
        f = ft["traits"][name]
        shares = [f["steering"][i]["share"] if f["steering"] else None for i in (0, len(ck) // 4, len(ck) - 1)]
        cells = []
        for key in ("a_to_b", "b_to_a"):
            x = xf[key]
            e = x["traits"][name]
            r2 = x["r2"][e["layer"]] if x.get("r2") else None
            cells.append(f"{_f(r2)} / {_f(e['cosine_at_layer'])} / {_f((e.get('steering') or {}).get('share'))}")
        fc, fs = t["first_cosine"], t["first_share"]
        lines.append(f"| {name} | {t['layer']} | {fc['step'] if fc['step'] is not None else 'never'} ({_f(fc['fraction'], 3)}) | "
                     f"{fs['step'] if fs['step'] is not None else 'never'} ({_f(fs['fraction'], 3)}) | "
                     f"{' / '.join(_f(x) for x in shares)} | {cells[0]} | {cells[1]} |")
    return lines


@writer_only
def _write_md(path, study):
    lines = ["# The organism across training and across models", ""] + summary_rows(study) + [
        "", "Per-checkpoint tables: trace/trace.md, trace_finetuned/trace.md; transfer: transfer_*/transfer.md."]
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")
