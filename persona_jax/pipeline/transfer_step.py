"""A persona vector moved to another model (issue 26) as a job over a config's `transfer`
section: the source's vector (its pipeline workdir's extract step), the target's own
extract and steer steps (run into `target_workdir` unless finished), a map fitted on
neutral texts run through both models (`method.transfer`), and the mapped vector's
cosine to the target's own vector and steering share on the target.

Writes `transfer.json` / `transfer.md`, and per trait the mapped vector as an Orbax
`PersonaVector` (`vectors/<trait>_<reduction>_mapped`, its map's kind and held-out R² in
its config) beside the map itself (`transfer_map/`: every layer's weight and means).
"""
from __future__ import annotations

import os

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.io import vectors as vec_io
from persona_jax.io.atomic import atomic_open
from persona_jax.io.distributed import writer_only
from persona_jax.method import transfer as tf
from persona_jax.pipeline import steps as core
from persona_jax.pipeline import trace_step
from persona_jax.runtime.generate import tokenize

KINDS = ("direct",) + tf.KINDS


def _local_dir(path: str) -> str:
    from persona_jax.finetune.resolve import cached_hub_dir, model_dir
    d = model_dir(path)
    return d if os.path.isdir(d) else cached_hub_dir(d)


def _config(path: str):
    from persona_jax.model import checkpoint_list as cl
    return cl.config_of(cl.Checkpoint(path, "dir", _local_dir(path)))


def fitting_tokens(cfg, source, model) -> tuple[int, int]:
    """(texts fitted on, their token count) of the map's neutral texts."""
    texts = neutral_texts(cfg, source, model)
    n_fit = len(texts) - int(round(len(texts) * float(cfg.transfer.holdout_fraction)))
    return n_fit, sum(len(x) for x in tokenize(model, texts[:n_fit]))


def check(cfg, source=None) -> None:
    """The transfer's inputs, before anything is written: the source's vectors, shapes
    the map kind can join, and enough neutral text to fit the map."""
    t = cfg.transfer
    if not t.source or not t.source_workdir:
        raise PersonaError("transfer.source (the source model) and transfer.source_workdir (its pipeline workdir "
                           "with a finished extract step) must be set")
    if t.kind not in KINDS:
        raise PersonaError(f"unknown transfer.kind {t.kind!r}; use one of: {', '.join(KINDS)}")
    for name in cfg.traits:
        p = os.path.join(t.source_workdir, name, vec_io.vector_filename(name, cfg.steer.reduction, ".pt"))
        if not os.path.isfile(p):
            raise PersonaError(f"{p} is missing: run the source's extract step first (experiments.extract)")
    from persona_jax.pipeline.setup import model_path
    src, tgt = _config(t.source), _config(model_path(cfg))
    if t.kind == "direct" and (src.num_layers, src.hidden_size) != (tgt.num_layers, tgt.hidden_size):
        raise PersonaError(f"the source has {src.num_layers} layers of width {src.hidden_size} and the target "
                           f"{tgt.num_layers} of width {tgt.hidden_size}: a vector moves to another width or depth "
                           "only through a fitted map; set transfer.kind to ridge or procrustes")
    if t.kind == "procrustes" and src.hidden_size != tgt.hidden_size:
        raise PersonaError(f"orthogonal Procrustes needs equal widths (source {src.hidden_size}, target "
                           f"{tgt.hidden_size}); use transfer.kind=ridge")
    if t.kind != "direct" and not t.texts and cfg.trait_source != "organism":
        raise PersonaError("a fitted map needs neutral texts: set transfer.texts to a JSONL of {\"messages\": [...]} "
                           "conversations or a .txt file of one text per line")
    if t.kind != "direct":
        if t.texts and not os.path.isfile(t.texts):
            raise PersonaError(f"transfer.texts {t.texts} does not exist")
        from persona_jax.model.checkpoint import Model, _load_tokenizer
        if source is None:
            from persona_jax.pipeline.setup import trait_source
            source = trait_source(cfg)
        shell = Model(config=src, params=None, tokenizer=_load_tokenizer(_local_dir(t.source)), name=t.source)
        n_fit, n_tok = fitting_tokens(cfg, source, shell)
        n_texts = len(neutral_texts(cfg, source, shell))
        if n_fit < 2 or (float(t.holdout_fraction) > 0 and n_texts - n_fit < 1):
            raise PersonaError(f"fitting a map needs at least 2 texts to fit and 1 held out; the {n_texts} texts give "
                               f"{n_fit} and {n_texts - n_fit} (holdout_fraction {t.holdout_fraction}): add texts")
        if n_tok <= src.hidden_size:
            raise PersonaError(f"the map from width {src.hidden_size} needs more than {src.hidden_size} fitting tokens; "
                               f"the {n_fit} fitting texts give {n_tok}: add texts (transfer.n_texts / transfer.texts)")


def neutral_texts(cfg, source, model) -> list[str]:
    """The texts both models read: transfer.texts (JSONL conversations rendered with the
    chat template, or one text per line), else the organism's own conversations."""
    t = cfg.transfer
    if t.texts:
        if t.texts.endswith(".jsonl"):
            from persona_jax.io.jsonl import read_conversations
            convs = [m for _, _, m in read_conversations(t.texts)]
        else:
            with open(t.texts, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f if line.strip()][: int(t.n_texts) or None]
    else:
        convs = source.neutral_conversations(int(t.n_texts), seed=int(cfg.seed))
    convs = convs[: int(t.n_texts) or None]
    return [model.render_chat(c, add_generation_prompt=False) for c in convs]


def run(cfg, workdir: str, judge, source, target, progress: bool = True) -> dict:
    """The transfer of every configured trait's vector from `transfer.source` to `target`."""
    from persona_jax.finetune.resolve import load_any_model
    t = cfg.transfer
    target_dir = t.target_workdir or os.path.join(workdir, "target")
    trace_step.ensure_steps(lambda: target, judge, source, cfg, target_dir, ("extract", "steer"), progress)
    src_model = load_any_model(t.source, dtype=cfg.dtype, mesh=target.mesh)
    maps = None
    report = {"source": t.source, "target": cfg.model, "kind": t.kind, "rescale": bool(t.rescale),
              "reduction": cfg.steer.reduction, "traits": {}}
    if t.kind != "direct":
        texts = neutral_texts(cfg, source, src_model)
        _, n_fit_tokens = fitting_tokens(cfg, source, src_model)
        maps = tf.fit_maps(src_model, target, texts, t.kind, float(t.ridge), float(t.holdout_fraction),
                           batch_size=int(cfg.extract.capture_batch_size))
        report.update(n_texts=len(texts), n_fit_tokens=n_fit_tokens, r2=[m.r2 for m in maps],
                      src_layers=[m.src_layer for m in maps])
        _save_maps(workdir, maps, t)
    for name in cfg.traits:
        red = cfg.steer.reduction
        v_src = core.load_step_vector(t.source_workdir, name, red, src_model)
        mapped = tf.transfer_vector(v_src, maps, bool(t.rescale), (target.num_layers + 1, target.hidden_size))
        own = core.load_step_vector(target_dir, name, red, target)
        steer = core.done_summary(os.path.join(target_dir, name, "steer.json"))
        layer = int(steer["layer"])
        entry = {"layer": layer, "cosine": tf.cosines(mapped, own).tolist(),
                 "cosine_at_layer": float(tf.cosines(mapped, own)[layer])}
        meta = {"transfer": {"source": t.source, "source_vector": f"{t.source_workdir}/{name}", "kind": t.kind,
                             "rescale": bool(t.rescale), "ridge": float(t.ridge),
                             "r2": None if maps is None else [m.r2 for m in maps],
                             "map": None if maps is None else os.path.join(workdir, "transfer_map")}}
        _save_vector(workdir, name, red, mapped, cfg.model, meta)
        if t.steer:
            d = os.path.join(workdir, "transfer", name)
            os.makedirs(d, exist_ok=True)
            entry["steering"] = trace_step.steering_shares(cfg, source, judge, target, target_dir, name, steer,
                                                           [{red: mapped}], d, progress, int(t.n_questions),
                                                           int(t.n_per_question))[0]
        report["traits"][name] = entry
    core.write_summary(os.path.join(workdir, "transfer.json"), report)
    _write_md(os.path.join(workdir, "transfer.md"), report)
    return report


@writer_only
def _save_maps(workdir, maps, t):
    arrays = {f"l{m.tgt_layer:03d}": {"weight": m.weight, "x_mean": m.x_mean, "y_mean": m.y_mean} for m in maps}
    meta = {"kind": t.kind, "ridge": float(t.ridge), "holdout_fraction": float(t.holdout_fraction),
            "layers": [{"key": f"l{m.tgt_layer:03d}", "src_layer": m.src_layer, "tgt_layer": m.tgt_layer,
                        "r2": m.r2, "norm_ratio": m.norm_ratio} for m in maps]}
    vec_io.save_vector_set(arrays, meta, os.path.join(workdir, "transfer_map"), overwrite=True)


@writer_only
def _save_vector(workdir, name, red, arr, model_id, config):
    vec_io.save_vector(vec_io.PersonaVector(arr, trait=name, reduction=red, model_id=model_id, config=config),
                       os.path.join(workdir, "vectors", f"{name}_{red}_mapped"), overwrite=True)


@writer_only
def _write_md(path, report):
    f = lambda v, nd=3: "n/a" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"
    lines = [f"# Transfer: {report['source']} -> {report['target']}", "",
             f"Map: {report['kind']}" + (f", held-out R² per target layer {[round(r, 3) for r in report['r2']]}"
                                          if report.get("r2") else "") + f"; rescale: {report['rescale']}.", "",
             "| trait | layer | cosine to the target's own vector | steering gain (coef) | target's own gain | share |",
             "|---|---|---|---|---|---|"]
    for name, e in report["traits"].items():
        s = e.get("steering") or {}
        lines.append(f"| {name} | {e['layer']} | {f(e['cosine_at_layer'])} | {f(s.get('gain'), 1)} ({s.get('coef', 'n/a')}) | "
                     f"{f(s.get('target_gain'), 1)} | {f(s.get('share'), 2)} |")
    with atomic_open(path) as fh:
        fh.write("\n".join(lines) + "\n")


__all__ = ["check", "run", "neutral_texts"]
