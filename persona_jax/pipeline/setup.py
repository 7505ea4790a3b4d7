"""What every absl runner does before the science: devices, model, judge, trait source.

Runners stay thin: parse the config, call `setup`, call library steps, write artifacts.
"""
from __future__ import annotations

import json
import logging
import os
import socket

import jax

from persona_jax.model import sharding as sh
from persona_jax.errors import PersonaError
from persona_jax.io.atomic import atomic_open
from persona_jax.io import workdir_lock
from persona_jax.io.distributed import is_writer, writer_only
from persona_jax.finetune import lora as flora
from persona_jax.finetune.trainer import TrainConfig


def mesh_from(cfg):
    """The ("data", "model") mesh a config asks for; None on a single device."""
    n = len(jax.devices())
    model_axis = int(cfg.mesh.model)
    data_axis = int(cfg.mesh.data)
    if data_axis <= 0:
        if n % model_axis:
            raise PersonaError(f"mesh.model={model_axis} does not divide the {n} devices")
        data_axis = n // model_axis
    if data_axis * model_axis == 1:
        return None
    return sh.make_mesh(data_axis, model_axis)


def trait_source(cfg):
    if cfg.trait_source == "files":
        from persona_jax.pipeline.steps import FileTraits
        if not os.path.isdir(cfg.trait_dir):
            raise PersonaError(f"trait_dir {cfg.trait_dir} does not exist; it must hold trait_data_extract/ and trait_data_eval/")
        return FileTraits(cfg.trait_dir, cfg.antonym)
    if cfg.trait_source == "organism":
        from persona_jax.organism.provider import OrganismTraits
        return OrganismTraits()
    raise PersonaError(f"unknown trait_source {cfg.trait_source!r}; use files or organism")


def model_path(cfg) -> str:
    if cfg.model == "organism":
        from persona_jax.organism.provider import organism_path
        return organism_path()
    if not cfg.model:
        raise PersonaError("config.model is empty; set --config.model=PATH_OR_HUB_ID")
    return cfg.model


def check_config(cfg) -> None:
    """Every value of the config a run will record and use: numbers finite (an infinite
    coefficient was generated, scored and written as `Infinity`), and tuple overrides that
    parsed (`--config.steer.coefs=(0.0,nan)` reaches the config as one string)."""
    import math

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, str) and v.strip()[:1] in "([" and v.strip():
                    raise PersonaError(f"config.{prefix}={v!r} is not a tuple of plain values; write it "
                                       "like --config.steer.coefs='(0.0,1.5)' with finite numbers")
                walk(prefix, v)
        elif isinstance(value, float) and not math.isfinite(value):
            raise PersonaError(f"config.{prefix} holds {value!r}; every number of a config must be finite")

    walk("", cfg.to_dict())


def setup(cfg, workdir: str, need_judge: bool = True, need_model: bool = True, check=None):
    """Initialise devices and return (model or None, judge or None, trait source).

    check: a further check of the run's inputs (e.g. a trace's checkpoint list), run with
    the others before anything is written."""
    from persona_jax.model import load_model
    from persona_jax.model.checkpoint import check_checkpoint

    sh.maybe_initialize_distributed(bool(cfg.distributed))
    # Everything a user can get wrong is checked before the first file is written or the
    # model is loaded: the config's values, the trait files, the judge endpoint (one probe request).
    check_config(cfg)
    source = trait_source(cfg)
    check_inputs(source, cfg)
    if need_model:
        check_checkpoint(model_path(cfg))
    if check is not None:
        check()
    check_workdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        lock = workdir_lock.acquire(workdir) if is_writer() else None
    except OSError as e:
        raise PersonaError(f"workdir {workdir} cannot be written ({e.strerror or e}); name a folder you can write") from None
    try:
        judge = make_judge(cfg.judge, workdir, progress=bool(cfg.progress)) if need_judge else None
        if judge is not None and cfg.judge.kind == "openai":
            probe_judge(judge)
    except BaseException:
        if lock:  # a run that stops here leaves no lock behind
            workdir_lock.release(lock)
        raise
    _write_config(os.path.join(workdir, "config.json"), cfg.to_dict())
    if not need_model:
        return None, judge, source
    model = load_model(model_path(cfg), dtype=cfg.dtype, mesh=mesh_from(cfg), scan_decode=cfg.scan_decode)
    logging.info("loaded %s: %d layers, width %d", model.name, model.num_layers, model.hidden_size)
    return model, judge, source


def check_workdir(workdir: str) -> None:
    """The workdir is a folder, or can be made one, and a file can be written in it (or in
    its nearest existing parent): checked before anything is written."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise PersonaError(f"workdir {workdir} is a file, not a folder; name a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PersonaError(f"workdir {workdir} is under {existing}, which is a file, not a folder")
    probe = os.path.join(existing, f".persona_jax_write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        what = f"workdir {workdir} is not writable" if existing == path else \
            f"workdir {workdir} cannot be made: {existing} is not writable"
        raise PersonaError(f"{what} ({e.strerror or e}); name a folder you can write") from None


def check_inputs(source, cfg) -> None:
    """Load (and so validate) every configured trait's extraction and evaluation artifacts
    and, for file traits, the fine-tuning and flagging datasets the steps will read."""
    from persona_jax.method.traits import check_trait_name

    for name in cfg.traits:
        check_trait_name(name)
    for name in cfg.traits:
        source.extract_trait(name)
        source.eval_trait(name)
        if cfg.trait_source == "files":
            if "finetune" in cfg.steps:
                source.finetune_datasets(name, "", cfg)
            if "flagging" in cfg.steps:
                source.flagging_dataset(name, "", cfg)
    if "flagging" in cfg.steps:
        check_flagging(cfg.flagging)
    if "control" in cfg.steps:
        check_control(cfg.control)


def check_control(c) -> None:
    """The control step's options (`configs/base.py`, `control`), before any work."""
    if c.coef is not None and not float(c.coef) > 0:
        raise PersonaError(f"config.control.coef must be > 0 (the arms subtract it); got {c.coef}")
    bad = [p for p in c.percentiles if not 0.0 <= float(p) <= 100.0]
    if bad or not c.percentiles:
        raise PersonaError(f"config.control.percentiles must be numbers in [0, 100]; got {tuple(c.percentiles)}")
    if not float(c.ridge) >= 0:
        raise PersonaError(f"config.control.ridge must be >= 0; got {c.ridge}")
    if int(c.n_per_question) < 1:
        raise PersonaError(f"config.control.n_per_question must be >= 1; got {c.n_per_question}")


def check_flagging(f) -> None:
    """The flagging step's screening options (`configs/base.py`, `flagging`)."""
    if f.get("delta", "response_avg") not in ("response_avg", "prompt_last"):
        raise PersonaError(f"config.flagging.delta must be response_avg or prompt_last; got {f.delta!r}")
    if not 0.0 < float(f.get("percentile", 95.0)) <= 100.0:
        raise PersonaError(f"config.flagging.percentile must be in (0, 100]; got {f.percentile}")
    if f.get("reference") and not os.path.isfile(f.reference):
        raise PersonaError(f"config.flagging.reference {f.reference} is not a file; give a clean JSONL of conversations")


def probe_judge(judge) -> None:
    """One coherence request, so an endpoint without logprobs, a wrong URL or key fails the
    run at once rather than after hours of generation (cached: a rerun sends nothing)."""
    judge.coherence_scores(["What is 2 + 2?"], ["2 + 2 is 4."])


@writer_only
def _write_config(path: str, config: dict) -> None:
    """The run's final config beside its artifacts (process 0, atomically)."""
    with atomic_open(path) as f:
        json.dump(config, f, indent=2)


def make_judge(cfg, workdir: str, progress: bool = True):
    """cfg: the `judge` ConfigDict (kind = openai | local | organism); progress: the
    OpenAI judge's bar over requests."""
    if cfg.kind == "openai":
        from persona_jax.judges.openai_judge import OpenAIJudge
        return OpenAIJudge(cfg.model, base_url=cfg.base_url or None, api_key_env=cfg.api_key_env,
                           aggregation=cfg.aggregation, max_concurrency=int(cfg.max_concurrency),
                           timeout=float(cfg.timeout), max_retries=int(cfg.max_retries),
                           cache_path=os.path.join(workdir, "judge_cache.sqlite"), progress=progress)
    if cfg.kind == "local":
        from persona_jax.judges.local_judge import LocalJudge
        from persona_jax.model import load_model
        if not cfg.local_model:
            raise PersonaError("judge.kind=local needs judge.local_model (a checkpoint directory)")
        return LocalJudge(load_model(cfg.local_model, dtype=cfg.local_dtype), aggregation=cfg.aggregation)
    if cfg.kind == "organism":
        from persona_jax.organism.judge import OrganismJudge
        return OrganismJudge()
    raise PersonaError(f"unknown judge kind {cfg.kind!r}; use openai, local or organism")


def train_config(f, seed: int) -> TrainConfig:
    """TrainConfig from a fine-tuning config section `f`: learning_rate, warmup_steps,
    batch_size, grad_accum, num_steps (0 = epochs), epochs, schedule ("linear" | "cosine" |
    "constant" | "constant_with_warmup"), weight_decay, compute_dtype, remat,
    checkpoint_every, eval_every, progress, lora_dropout (missing ones take TrainConfig's
    defaults)."""
    d = TrainConfig()

    def get(name, default, cast):
        value = getattr(f, name, None)
        return default if value is None else cast(value)

    num_steps = get("num_steps", 0, int)
    return TrainConfig(
        learning_rate=get("learning_rate", d.learning_rate, float), warmup_steps=get("warmup_steps", d.warmup_steps, int),
        batch_size=get("batch_size", d.batch_size, int), grad_accum=get("grad_accum", d.grad_accum, int),
        num_steps=num_steps or None, epochs=get("epochs", 1, int), schedule=get("schedule", "linear", str),
        weight_decay=get("weight_decay", d.weight_decay, float), seed=int(seed),
        compute_dtype=get("compute_dtype", d.compute_dtype, str), remat=get("remat", False, bool),
        checkpoint_every=get("checkpoint_every", 0, int), eval_every=get("eval_every", 0, int),
        lora_dropout=get("lora_dropout", 0.0, float), progress=get("progress", True, bool))


def lora_config(f) -> flora.LoraConfig | None:
    """The adapter to train (`f.method` "lora": lora_rank, lora_alpha, rslora,
    lora_targets), or None for full fine-tuning ("full")."""
    method = getattr(f, "method", "lora")
    if method == "full":
        return None
    if method != "lora":
        raise PersonaError(f"finetune.method must be 'full' or 'lora'; got {method!r}")
    return flora.LoraConfig(rank=int(f.lora_rank), alpha=float(f.lora_alpha), rslora=bool(f.rslora),
                            targets=tuple(f.lora_targets))
