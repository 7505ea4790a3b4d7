"""Any model a user of the reference's `eval_persona.py` passes, as one `Model`:

* a Hugging Face model directory (config.json + safetensors + tokenizer);
* a hub id already in the local Hugging Face cache (looked up offline, never downloaded);
* a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), loaded
  onto its base model (`base_model_name_or_path`, or `base_model=`) and merged;
* a training output directory: the latest `checkpoint-N` in it (the reference's
  HF-Trainer layout), or this project's `experiments.finetune` workdir (`merged/`, else
  `adapter/`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.finetune import lora as flora
from persona_jax.model import load_model
from persona_jax.model.checkpoint import Model

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def latest_checkpoint(path: str) -> Optional[str]:
    """The `checkpoint-N` subdirectory of `path` with the largest N, or None."""
    if not os.path.isdir(path):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(path)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(path, name))]
    return os.path.join(path, max(steps)[1]) if steps else None


def model_dir(path: str) -> str:
    """The directory (or hub id) that holds the model `path` names (see the module docstring)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")) or is_adapter(path):
            return path
        ckpt = latest_checkpoint(path)
        if ckpt is not None:
            return model_dir(ckpt)
        for sub in ("merged", "adapter"):
            if os.path.isdir(os.path.join(path, sub)):
                return model_dir(os.path.join(path, sub))
        raise PersonaError(f"{path} holds no model: no config.json (a model), adapter_config.json (a LoRA adapter), "
                           "checkpoint-N subdirectory or merged/ / adapter/ export")
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise PersonaError(f"model {path} does not exist; pass a model or adapter directory, a training output "
                           "directory, or a hub id already in the Hugging Face cache")
    return path  # a hub id


def cached_hub_dir(repo_id: str) -> str:
    """The local snapshot of a hub model in the Hugging Face cache (offline; nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:
        raise PersonaError(f"{repo_id} is not in the Hugging Face cache ({type(e).__name__}); download it "
                           "first (huggingface-cli download) or pass a local directory") from None


def _load_base(path: str, dtype: str, mesh, scan_decode: bool) -> Model:
    d = path if os.path.isdir(path) else cached_hub_dir(path)
    model = load_model(d, dtype=dtype, mesh=mesh, scan_decode=scan_decode)
    return dataclasses.replace(model, name=path)


def check_adapter_fits(lora: dict, model: Model, adapter_dir: str) -> None:
    """PersonaError when the adapter's matrices do not fit the base model's kernels."""
    layers = model.params["layers"]
    for sub, mods in lora.items():
        for name, ab in mods.items():
            kernel = layers.get(sub, {}).get(name, {}).get("kernel")
            if kernel is None:
                raise PersonaError(f"the adapter in {adapter_dir} targets {name}, which the base model "
                                   f"{model.name} does not have; it was trained for another architecture")
            n, fan_in, fan_out = kernel.shape
            a, b = np.shape(ab["A"]), np.shape(ab["B"])
            if a[0] != n or a[1] != fan_in or b[2] != fan_out:
                raise PersonaError(
                    f"the adapter in {adapter_dir} was trained for another architecture: its {name} matrices are "
                    f"{a[0]} layers of {a[1]} -> {b[2]}, but the base model {model.name} has {n} layers of "
                    f"{fan_in} -> {fan_out}; pass the base model it was trained on with --base_model")


def load_any_model(path: str, dtype: str = "float32", mesh=None, scan_decode: bool = False,
                   base_model: Optional[str] = None) -> Model:
    """Load `path` (model dir, hub id in the cache, LoRA adapter, training output dir) as a
    `Model`; an adapter is merged into its base model (named by the adapter's
    `base_model_name_or_path` unless `base_model` is given)."""
    d = model_dir(path)
    if not is_adapter(d):
        model = _load_base(d, dtype, mesh, scan_decode)
        return dataclasses.replace(model, name=path)
    try:
        with open(os.path.join(d, "adapter_config.json")) as f:
            adapter_cfg = json.load(f)
    except ValueError as e:
        raise PersonaError(f"{d}/adapter_config.json is not valid JSON ({e})") from None
    base = base_model or adapter_cfg.get("base_model_name_or_path") or ""
    if not base:
        raise PersonaError(f"the adapter in {d} does not name its base model (base_model_name_or_path is empty); "
                           "pass it with --base_model")
    if not os.path.isdir(base):
        if os.path.exists(base) or base.startswith((".", "/", "~")) or base.count("/") != 1:
            raise PersonaError(f"the base model {base} of the adapter in {d} does not exist; pass the base model "
                               "directory with --base_model")
        base = cached_hub_dir(base) and base
    model = _load_base(base, dtype, mesh, scan_decode)
    lora, lora_cfg = flora.load_adapter(d, model.config)
    check_adapter_fits(lora, model, d)
    return dataclasses.replace(model, params=flora.merge(model.params, lora, lora_cfg), name=path)
