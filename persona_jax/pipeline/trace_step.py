"""The trace (issue 26) as a resumable job over a config's `trace` section.

1. the final checkpoint's extract step (and its steer and monitor steps when it is the
   target) run into `final_workdir` (default `<workdir>/final`) unless finished there;
   another target gets its own extract / steer / monitor in `target_workdir`;
2. every checkpoint, loaded one at a time, captures the final model's kept pos / neg
   responses teacher-forced: `trace/vectors/<i>.npz` (all traits, all reductions);
3. the target, loaded once, measures every checkpoint's vector: steering share
   (`trace/<trait>/steer_<i>.csv` / `.json`) and monitoring r;
4. `trace.json`, `trace.md`, `trace.png` and the Orbax record `trace_vectors/` (every
   vector, each checkpoint's name, step and tokens as metadata).

Each unit of work leaves a file and is skipped when it exists, so a killed run resumes.
Only process 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.io import vectors as vec_io
from persona_jax.io.atomic import atomic_open
from persona_jax.io.csvio import read_csv
from persona_jax.io.distributed import writer_only
from persona_jax.method import extract as ex
from persona_jax.method import responses as resp
from persona_jax.method import trace as tr
from persona_jax.model import checkpoint_list as cl
from persona_jax.pipeline import registry
from persona_jax.pipeline import steps as core
from persona_jax.runtime.capture import REDUCTIONS, capture


def resolve(cfg):
    """(checkpoints, their configs, target path or "") checked before anything is written:
    one architecture, at least two checkpoints, a target of the same architecture."""
    t = cfg.trace
    ckpts = cl.resolve(list(t.checkpoints))
    if len(ckpts) < 2:
        raise PersonaError(f"a trace needs at least two checkpoints of one run; the list gives {len(ckpts)}")
    configs = cl.check_one_architecture(ckpts)
    if t.target:
        from persona_jax.finetune.resolve import model_dir
        d = model_dir(t.target)
        tgt = cl.config_of(cl.Checkpoint(t.target, "dir", d)) if os.path.isdir(d) else None
        if tgt is not None:
            diff = [f for f in cl.ARCH_FIELDS if getattr(tgt, f) != getattr(configs[-1], f)]
            if diff:
                raise PersonaError(f"the target {t.target} differs from the traced run in {', '.join(diff)}; a vector "
                                   "moves to another family or width only through a fitted map: use "
                                   "experiments.transfer")
    if any(c.kind == "orbax" for c in ckpts) and not tokenizer_dir(cfg, ckpts):
        raise PersonaError("the trace holds trainer Orbax steps, which have no tokenizer; set trace.tokenizer to a "
                           "model directory of the run")
    return ckpts, configs


def tokenizer_dir(cfg, ckpts) -> str:
    if cfg.trace.tokenizer:
        return cfg.trace.tokenizer
    for c in ckpts:
        if c.kind == "dir":
            return c.path
    return ""


def _steps_done(d, traits, names) -> bool:
    return all(os.path.exists(os.path.join(d, t, f"{n}.json")) for t in traits for n in names)


def ensure_steps(model_fn, judge, source, cfg, d, steps, progress):
    """Run the pipeline `steps` of every trait into `d` (model_fn() loads the model) unless
    they have finished there."""
    if _steps_done(d, cfg.traits, steps):
        return
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.steps = tuple(steps)
    registry.run(model_fn(), judge, source, c, d, progress=progress)


@writer_only
def _write(path, write, mode: str = "wb"):
    """`write(f)` into `path`, atomically, on the writing process only."""
    with atomic_open(path, mode) as f:
        write(f)


def _first(ckpts, i) -> dict:
    """The checkpoint a first-crossing index names (None: no checkpoint crossed)."""
    return {"index": i, "name": None if i is None else ckpts[i].name, "step": None if i is None else ckpts[i].step,
            "fraction": tr.run_fraction(ckpts, i)}


def _check_same_run(workdir, ckpts):
    record = [dataclasses.asdict(c) for c in ckpts]
    path = os.path.join(workdir, "trace", "checkpoints.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != record:
                raise PersonaError(f"{workdir} holds a trace of another checkpoint list; use a new workdir")
    else:
        core.write_summary(path, record)


def run(cfg, workdir: str, judge, source, progress: bool = True) -> dict:
    """The whole trace of `cfg.trace` into `workdir`; returns the trace.json dict."""
    t = cfg.trace
    ckpts, configs = resolve(cfg)
    tok = tokenizer_dir(cfg, ckpts) or None
    dtype = cfg.dtype
    from persona_jax.pipeline.setup import mesh_from
    mesh = mesh_from(cfg)
    load = lambda c: cl.load(c, dtype, mesh, tok)
    os.makedirs(os.path.join(workdir, "trace", "vectors"), exist_ok=True)
    _check_same_run(workdir, ckpts)

    final_dir = t.final_workdir or os.path.join(workdir, "final")
    # the target's steps the measures read (its vector and layer; its monitoring responses)
    target_steps = ("extract",) + (("steer",) if t.steer or t.monitor else ()) + (("monitor",) if t.monitor else ())
    if t.target:
        from persona_jax.finetune.resolve import load_any_model
        target_dir = t.target_workdir or os.path.join(workdir, "target")
        load_target = lambda: load_any_model(t.target, dtype=dtype, mesh=mesh)
        ensure_steps(lambda: load(ckpts[-1]), judge, source, cfg, final_dir, ("extract",), progress)
        ensure_steps(load_target, judge, source, cfg, target_dir, target_steps, progress)
    else:
        target_dir = final_dir
        load_target = lambda: load(ckpts[-1])
        ensure_steps(load_target, judge, source, cfg, final_dir, target_steps, progress)

    # 2. every checkpoint's vectors from the same texts
    rule = ex.FilterRule(float(cfg.extract.threshold), float(cfg.extract.coherence_threshold))
    need = ("prompt", "answer", "question_id", "coherence")
    data = {}
    for name in cfg.traits:
        pos_csv, neg_csv = ex.csv_paths(os.path.join(final_dir, name), name)
        data[name] = (read_csv(pos_csv, required=need + (name,))[1], read_csv(neg_csv, required=need + (name,))[1])
    from tqdm.auto import tqdm
    vec_paths = [os.path.join(workdir, "trace", "vectors", f"{i:03d}.npz") for i in range(len(ckpts))]
    for i, c in enumerate(tqdm(ckpts, desc="trace: checkpoint vectors", disable=not progress)):
        if os.path.exists(vec_paths[i]):
            continue
        model = load(c)
        arrays = {}
        for name, (pos, neg) in data.items():
            vecs, _ = ex.vectors_from_rows(model, pos, neg, name, rule, int(cfg.extract.capture_batch_size),
                                           progress=False, where=f"{final_dir}/{name}")
            arrays.update({f"{name}/{r}": v for r, v in vecs.items()})
        _write(vec_paths[i], lambda f: np.savez(f, **arrays))
        del model
    loaded = [dict(np.load(p)) for p in vec_paths]
    vectors = {name: [{r: a[f"{name}/{r}"] for r in REDUCTIONS} for a in loaded] for name in cfg.traits}

    # 3. measures on the target
    target = None
    report = {"run": f"{ckpts[0].name} .. {ckpts[-1].name} ({len(ckpts)} checkpoints)", "target": t.target or ckpts[-1].name,
              "reduction": cfg.steer.reduction, "cosine_threshold": float(t.cosine_threshold),
              "share_threshold": float(t.share_threshold),
              "checkpoints": [{"name": c.name, "step": c.step, "tokens": c.tokens} for c in ckpts], "traits": {}}
    for name in cfg.traits:
        d = os.path.join(workdir, "trace", name)
        os.makedirs(d, exist_ok=True)
        steer = core.done_summary(os.path.join(target_dir, name, "steer.json"))
        if steer is None and (t.steer or t.monitor):
            raise PersonaError(f"{target_dir}/{name}/steer.json is missing: the target's steering step has not run")
        # without the steering step: the layer later steps would use (monitor.layer, else the last)
        layer = int(steer["layer"]) if steer else registry.chosen_layer(cfg, {}, configs[-1].num_layers)
        table = tr.cosine_table(vectors[name])
        entry = {"layer": layer, "cosines": {r: {k: v.tolist() for k, v in tb.items()} for r, tb in table.items()},
                 "cos_final": table[cfg.steer.reduction]["to_final"][:, layer].tolist(),
                 "cos_previous": table[cfg.steer.reduction]["to_previous"][:, layer].tolist(),
                 "steering": [], "monitor_r": []}
        if t.steer or t.monitor:
            target = target or load_target()
        if t.steer:
            entry["steering"] = steering_shares(cfg, source, judge, target, target_dir, name, steer, vectors[name],
                                                d, progress, int(t.n_questions), int(t.n_per_question))
        if t.monitor:
            entry["monitor_r"] = _monitoring(cfg, target, target_dir, name, vectors[name], d)
        cos_i = tr.first_reaching(entry["cos_final"], float(t.cosine_threshold))
        share_i = tr.first_reaching([s["share"] for s in entry["steering"]], float(t.share_threshold))
        entry["first_cosine"], entry["first_share"] = _first(ckpts, cos_i), _first(ckpts, share_i)
        report["traits"][name] = entry

    # 4. outputs
    core.write_summary(os.path.join(workdir, "trace.json"), report)
    _write(os.path.join(workdir, "trace.md"), lambda f: f.write(tr.markdown(report) + "\n"), "w")
    tr.plot(report, ckpts, os.path.join(workdir, "trace.png"))
    _save_record(workdir, ckpts, vectors)
    return report


def steering_shares(cfg, source, judge, target, target_dir, name, steer, vecs, d, progress,
                    n_questions: int = 0, n_per_question: int = 0):
    """Per vector ({reduction: [L+1, D]}) {gain, coef, share, target_gain, ...}: norm-matched
    to the target's own vector at its chosen layer and swept over its coefficient grid
    (questions and rollouts as the steer step unless given)."""
    s = cfg.steer
    trait = source.eval_trait(name)
    layer = int(steer["layer"])
    probe = tr.SteeringProbe(
        target, layer, [c for c in steer["coefs"]], core.first_questions(trait, n_questions or s.n_questions),
        judge, name, trait.eval_prompt, core.sampling_from(s, cfg.seed + 1), int(n_per_question or s.n_per_question),
        float(steer.get("coherence_floor", s.coherence_floor)), s.positions)
    own = core.load_step_vector(target_dir, name, s.reduction, target)

    def measured(vector, stem):
        path = os.path.join(d, f"{stem}.json")
        if (done := core.done_summary(path)) is not None:
            return done
        out = probe.gain(vector, os.path.join(d, f"{stem}.csv"), progress=False)
        core.write_summary(path, out)
        return out

    ref = measured(own, "steer_target")
    from tqdm.auto import tqdm
    out = []
    for i, v in enumerate(tqdm(vecs, desc=f"trace: steering {name}", disable=not progress)):
        matched = tr.norm_matched(v[s.reduction], own, layer)
        # the same row as the target's own vector steers the same way: measured once
        res = ref if np.array_equal(matched[layer], own[layer]) else measured(matched, f"steer_{i:03d}")
        out.append({**res, "share": tr.share(res["gain"], ref["gain"]), "target_gain": ref["gain"]})
    return out


def _monitoring(cfg, target, target_dir, name, vecs, d):
    """Per checkpoint: Pearson r over the target's monitoring conditions of its vector's projection."""
    mon = core.done_summary(os.path.join(target_dir, name, "monitor.json"))
    if mon is None:
        raise PersonaError(f"{target_dir}/{name}/monitor.json is missing: the target's monitoring step has not run")
    layer = int(mon["layer"])
    _, rows = read_csv(os.path.join(target_dir, name, "monitor.csv"), required=("prompt", "answer", "condition", name))
    states_path = os.path.join(d, "monitor_prompt_last.npy")
    if os.path.exists(states_path):
        states = np.load(states_path)
    else:
        caps = capture(target, [r["prompt"] for r in rows], [r["answer"] for r in rows],
                       batch_size=int(cfg.extract.capture_batch_size))
        states = np.full((len(rows), target.hidden_size), np.nan, np.float32)
        states[caps["kept"]] = caps["prompt_last"][:, layer]
        _write(states_path, lambda f: np.save(f, states))
    scores = resp.scores(rows, name, "monitor.csv")
    conds = [r["condition"] for r in rows]
    return [tr.monitor_r(states, v[cfg.monitor.reduction][layer], conds, scores) for v in vecs]


@writer_only
def _save_record(workdir, ckpts, vectors):
    arrays = {f"c{i:03d}": {name: vecs[i] for name, vecs in vectors.items()} for i in range(len(ckpts))}
    meta = {"checkpoints": [{"key": f"c{i:03d}", "name": c.name, "kind": c.kind, "step": c.step,
                             "tokens": c.tokens, "stage": c.stage, "revision": c.revision}
                            for i, c in enumerate(ckpts)], "traits": list(vectors), "reductions": list(REDUCTIONS)}
    vec_io.save_vector_set(arrays, meta, os.path.join(workdir, "trace_vectors"), overwrite=True)
