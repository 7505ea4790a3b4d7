"""An ordered list of checkpoints of one training run (issue 26's trace), from what a
user has on disk:

* a model directory (config.json + safetensors); its step is read from a
  `checkpoint-N` / `step…` name when it has one;
* a training output directory: every `checkpoint-N` subfolder (the HF Trainer layout),
  in step order;
* the trainer's own Orbax steps (`<workdir>/checkpoints/<step>/{state,meta}` or that
  `checkpoints` folder itself): the full-fine-tuning / from-scratch params of every
  step, the architecture from each step's meta, the tokenizer from another model;
* `HUB_ID`, `HUB_ID@REV[,REV...]` or `HUB_ID@*`: revisions of one hub model already in
  the local Hugging Face cache, named by the cache's `refs/<branch>` files. Branch names
  give the step and tokens: OLMo 2 `stage1-step…-tokens…B` (or without `stage1-`),
  OLMo 3 `stage1-step…`, `stage2-…`, `stage3-…`, Apertus `step…-tokens…B`. Nothing is
  downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional, Sequence

from persona_jax.errors import PersonaError

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# stage, optional ingredient / other infix, step, optional tokens in billions
_BRANCH = re.compile(r"^(?:stage(\d+)-)?(?:[A-Za-z]+\d*-)*?step(\d+)(?:-tokens(\d+(?:\.\d+)?)B)?$")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run. kind: "dir" (path = model directory), "orbax" (path =
    the CheckpointManager directory, step = its step) or "hub" (path = hub id, revision =
    branch); stage orders multi-stage runs (OLMo 3) before step; tokens: training tokens
    seen, when known."""

    name: str
    kind: str
    path: str
    step: Optional[int] = None
    tokens: Optional[int] = None
    stage: int = 1
    revision: Optional[str] = None

    @property
    def order(self):
        return (self.stage, self.step)


def parse_branch(name: str) -> Optional[tuple[int, int, Optional[int]]]:
    """(stage, step, tokens) of a pretraining-checkpoint branch name, or None.

    >>> parse_branch("stage1-step1000-tokens5B")
    (1, 1000, 5000000000)
    >>> parse_branch("stage2-step42")
    (2, 42, None)
    """
    m = _BRANCH.match(name)
    if m is None:
        return None
    stage = int(m.group(1)) if m.group(1) else 1
    tokens = int(round(float(m.group(3)) * 1e9)) if m.group(3) else None
    return stage, int(m.group(2)), tokens


def _step_of_dir(path: str) -> Optional[int]:
    base = os.path.basename(os.path.normpath(path))
    if (m := _CHECKPOINT_DIR.match(base)):
        return int(m.group(1))
    parsed = parse_branch(base)
    return parsed[1] if parsed else None


def _orbax_root(path: str) -> Optional[str]:
    """The trainer's CheckpointManager directory at or under `path`, or None."""
    for d in (os.path.join(path, "checkpoints"), os.path.join(path, "train", "checkpoints"), path):
        if os.path.isdir(d) and any(n.isdigit() and os.path.isdir(os.path.join(d, n, "meta")) for n in os.listdir(d)):
            return d
    return None


def orbax_meta(root: str, step: int) -> dict:
    with open(os.path.join(root, str(step), "meta", "metadata")) as f:
        return json.load(f)


def _orbax_steps(root: str) -> list[Checkpoint]:
    out = []
    for n in sorted((n for n in os.listdir(root) if n.isdigit()), key=int):
        if not os.path.isdir(os.path.join(root, n, "state")):
            continue
        meta = orbax_meta(root, int(n))
        if "model_config" not in meta:
            raise PersonaError(f"the Orbax checkpoint {root}/{n} has no model_config in its meta (it was written by "
                               "an older trainer); export it with trainer.export_hf and trace the directories")
        out.append(Checkpoint(f"step {n}", "orbax", root, int(n), meta.get("tokens_seen")))
    return out


def hub_cache_revisions(repo_id: str) -> dict[str, str]:
    """{branch: snapshot path} of every revision of `repo_id` in the local Hugging Face
    cache that a `refs/<branch>` file names (huggingface_hub's own cache scan)."""
    from huggingface_hub import constants, scan_cache_dir
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:  # no cache folder at all
        return {}
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            return {ref: str(rev.snapshot_path) for rev in repo.revisions for ref in rev.refs}
    return {}


def _hub(item: str) -> list[Checkpoint]:
    repo_id, _, revs = item.partition("@")
    cached = hub_cache_revisions(repo_id)
    if revs in ("", "*"):
        names = [b for b in cached if parse_branch(b)]
        if not names:
            raise PersonaError(f"no step revisions of {repo_id} are in the local Hugging Face cache "
                               f"(cached refs: {', '.join(sorted(cached)) or 'none'}); download them first "
                               "(huggingface-cli download --revision BRANCH) or name them as HUB_ID@BRANCH")
        names.sort(key=lambda b: parse_branch(b)[:2])
    else:
        names = [r for r in revs.split(",") if r]
        missing = [r for r in names if r not in cached]
        if missing:
            raise PersonaError(f"revision {missing[0]} of {repo_id} is not in the local Hugging Face cache "
                               f"(cached: {', '.join(sorted(cached)) or 'none'}); download it first "
                               f"(huggingface-cli download {repo_id} --revision {missing[0]}); nothing is downloaded here")
    out = []
    for b in names:
        stage, step, tokens = parse_branch(b) or (1, None, None)
        out.append(Checkpoint(f"{repo_id}@{b}", "hub", repo_id, step, tokens, stage, b))
    return out


def _expand(item: str) -> list[Checkpoint]:
    if os.path.isdir(item):
        if os.path.isfile(os.path.join(item, "config.json")):
            return [Checkpoint(item, "dir", item, _step_of_dir(item))]
        subs = [(int(m.group(1)), n) for n in os.listdir(item)
                if (m := _CHECKPOINT_DIR.match(n)) and os.path.isfile(os.path.join(item, n, "config.json"))]
        if subs:
            return [Checkpoint(os.path.join(item, n), "dir", os.path.join(item, n), s) for s, n in sorted(subs)]
        root = _orbax_root(item)
        if root is not None:
            return _orbax_steps(root)
        raise PersonaError(f"{item} holds no checkpoints: no config.json, checkpoint-N folder with a config.json, "
                           "or trainer Orbax steps (checkpoints/<step>/)")
    if "@" in item or (item.count("/") == 1 and not item.startswith((".", "/", "~"))):
        return _hub(item)
    raise PersonaError(f"checkpoint {item} does not exist; pass model directories, a training output directory, "
                       "a trainer workdir, or HUB_ID[@REVISIONS] of revisions in the local Hugging Face cache")


def resolve(items: Sequence[str] | str) -> list[Checkpoint]:
    """The checkpoints `items` name, expanded (see the module docstring) and checked to be
    in training order: steps strictly increase (by stage, then step) where known."""
    if isinstance(items, str):
        items = [s for s in items.split() if s]
    out = [c for item in items for c in _expand(str(item))]
    if not out:
        raise PersonaError("the checkpoint list is empty; name at least two checkpoints of one run")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise PersonaError(f"checkpoint {next(n for n in names if names.count(n) > 1)} is listed twice")
    known = [c for c in out if c.step is not None]
    for a, b in zip(known, known[1:]):
        if b.order <= a.order:
            raise PersonaError(f"the checkpoint list is not in training order: {b.name} (step {b.step}) comes after "
                               f"{a.name} (step {a.step}); list checkpoints from first to last")
    return out


def config_of(ckpt: Checkpoint):
    """The checkpoint's `DecoderConfig`, read without loading weights."""
    from persona_jax.model.families import config_from_hf
    if ckpt.kind == "orbax":
        return config_from_hf(orbax_meta(ckpt.path, ckpt.step)["model_config"], f"{ckpt.path}/{ckpt.step}/meta")
    d = ckpt.path if ckpt.kind == "dir" else hub_cache_revisions(ckpt.path)[ckpt.revision]
    path = os.path.join(d, "config.json")
    try:
        with open(path) as f:
            return config_from_hf(json.load(f), path)
    except (OSError, ValueError) as e:
        raise PersonaError(f"{ckpt.name}: cannot read {path} ({e})") from None


ARCH_FIELDS = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
               "intermediate_size", "vocab_size")


def check_one_architecture(ckpts: Sequence[Checkpoint]) -> list:
    """Every checkpoint's config; PersonaError when two differ in architecture."""
    configs = [config_of(c) for c in ckpts]
    first = {f: getattr(configs[0], f) for f in ARCH_FIELDS}
    for c, cfg in zip(ckpts[1:], configs[1:]):
        diff = [f"{f} {first[f]} vs {getattr(cfg, f)}" for f in ARCH_FIELDS if getattr(cfg, f) != first[f]]
        if diff:
            raise PersonaError(f"{c.name} has another architecture than {ckpts[0].name} ({'; '.join(diff)}); a trace "
                               "follows one run's checkpoints; for different architectures use transfer "
                               "(experiments.transfer)")
    return configs


def load(ckpt: Checkpoint, dtype: str = "float32", mesh=None, tokenizer_from: Optional[str] = None):
    """The checkpoint as a `Model`. An Orbax step takes its tokenizer (and chat
    template) from the model directory `tokenizer_from`."""
    import dataclasses as dc

    from persona_jax.model.checkpoint import Model, _load_tokenizer, load_model
    if ckpt.kind == "dir":
        return dc.replace(load_model(ckpt.path, dtype=dtype, mesh=mesh), name=ckpt.name)
    if ckpt.kind == "hub":
        return dc.replace(load_model(hub_cache_revisions(ckpt.path)[ckpt.revision], dtype=dtype, mesh=mesh),
                          name=ckpt.name)
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from persona_jax.model import sharding as sh
    from persona_jax.model.checkpoint import DTYPES
    if tokenizer_from is None:
        raise PersonaError(f"{ckpt.name} is a trainer Orbax step, which holds no tokenizer; name a model directory "
                           "with the run's tokenizer (tokenizer=)")
    config = config_of(ckpt)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        state = ckptr.restore(os.path.abspath(os.path.join(ckpt.path, str(ckpt.step))),
                              ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    params = jax.tree.map(lambda a: jnp.asarray(a, DTYPES[dtype]), state["trainable"])
    mesh = mesh if mesh is not None else sh.context_mesh()
    if mesh is not None:
        params = jax.device_put(params, sh.param_shardings(params, mesh))
    return Model(config=config, params=params, tokenizer=_load_tokenizer(tokenizer_from), mesh=mesh, name=ckpt.name)
