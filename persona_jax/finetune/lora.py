"""LoRA on the layer-stacked projection kernels.

For a target projection with stacked kernel W [L, in, out] (our layout: y = x @ W), the
adapter is A [L, in, r] and B [L, r, out], and the effective kernel is

    W' = W + scale * A @ B,   scale = alpha / sqrt(r) (rsLoRA) or alpha / r.

B starts at zero, so an untrained adapter leaves the model unchanged; A starts normal
with the variance of PEFT's default init (kaiming_uniform(a=sqrt(5)): std 1/sqrt(3 in)).

The trainer applies LoRA by materialising W' inside the loss (`apply`) rather than by
adding a low-rank branch to every matmul: the decoder stays untouched, and at the sizes
we train (<= a few hundred million params per step on one host) forming L x in x out
once per micro-batch costs far less than the forward itself. The gradient still reaches
only A and B (the base params are a non-differentiated input). With LoRA dropout
(PEFT's `lora_dropout`) the input of the adapter is dropped per token and feature, which
a merged kernel cannot express: the trainer then keeps the base kernels and adds the
branch scale * (dropout(x) @ A) @ B in an interceptor (`with_branches`,
`dropout_interceptor`).

PEFT layout for export (torch Linear weight = our kernel transposed):
    base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight  [r, in]  = A[i].T
    base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_B.weight  [out, r] = B[i].T
so W_torch + scale * lora_B @ lora_A equals the merged kernel transposed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.model.safetensors_io import SafetensorsFile, save_file

# projection name -> sublayer that owns it
TARGETS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, rsLoRA scaling and target projections (METHOD.md 8 defaults)."""

    rank: int = 32
    alpha: float = 64.0
    rslora: bool = True
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if targets in (("all",), ("all-linear",)):
            targets = tuple(TARGETS)
        bad = [t for t in targets if t not in TARGETS]
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # canonical order
        if bad or not targets:
            raise PersonaError(
                f"LoRA target(s) {', '.join(map(repr, bad)) or '(none)'} match no projection; "
                f"valid names: {', '.join(TARGETS)} (or 'all')")
        if self.rank < 1:
            raise PersonaError(f"LoRA rank must be >= 1; got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def init(lora_config: LoraConfig, params, rng) -> dict:
    """Fresh adapter {sublayer: {name: {"A": [L, in, r], "B": [L, r, out]}}}, float32."""
    out: dict = {}
    keys = jax.random.split(rng, len(lora_config.targets))
    for key, name in zip(keys, lora_config.targets):
        sub = TARGETS[name]
        kernel = params["layers"][sub][name]["kernel"]
        layers, fan_in, fan_out = kernel.shape
        a = jax.random.normal(key, (layers, fan_in, lora_config.rank), jnp.float32) / math.sqrt(3 * fan_in)
        b = jnp.zeros((layers, lora_config.rank, fan_out), jnp.float32)
        out.setdefault(sub, {})[name] = {"A": a, "B": b}
    return out


def apply(params, lora: dict, lora_config: LoraConfig):
    """Params with every target kernel replaced by W + scale * A @ B (in W's dtype after
    the sum, which is done in float32). Works under jit and grad."""
    layers = dict(params["layers"])
    for sub, mods in lora.items():
        sub_params = dict(layers[sub])
        for name, ab in mods.items():
            mod = dict(sub_params[name])
            w = mod["kernel"]
            delta = jnp.einsum("lir,lro->lio", ab["A"].astype(jnp.float32), ab["B"].astype(jnp.float32))
            mod["kernel"] = (w.astype(jnp.float32) + lora_config.scale * delta).astype(w.dtype)
            sub_params[name] = mod
        layers[sub] = sub_params
    return {**params, "layers": layers}


def with_branches(params, lora: dict, key, dtype):
    """Params for training with LoRA dropout: every target projection keeps its base kernel
    and gains `lora_A` [L, in, r], `lora_B` [L, r, out] (in `dtype`) and `lora_key` [L, 2]
    (one dropout key per layer), which the decoder's layer scan slices per block and
    `dropout_interceptor` reads. The base params are cast to `dtype`; nothing is merged."""
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    layers = dict(params["layers"])
    for t, (sub, mods) in enumerate(sorted(lora.items())):
        sub_params = dict(layers[sub])
        for u, (name, ab) in enumerate(sorted(mods.items())):
            n_layers = ab["A"].shape[0]
            keys = jax.random.split(jax.random.fold_in(key, 16 * t + u), n_layers)
            sub_params[name] = {**sub_params[name], "lora_A": ab["A"].astype(dtype), "lora_B": ab["B"].astype(dtype),
                                "lora_key": keys}
        layers[sub] = sub_params
    return {**params, "layers": layers}


def dropout_interceptor(lora_config: LoraConfig, rate: float):
    """A `flax.linen.intercept_methods` interceptor: a projection carrying `lora_A` (see
    `with_branches`) returns base(x) + scale * (dropout(x) @ A) @ B, PEFT's LoRA forward
    in training mode (inverted dropout of the adapter's input, keep probability 1 - rate)."""
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.Dense) or not mod.has_variable("params", "lora_A"):
            return y
        x = args[0]
        keep = jax.random.bernoulli(mod.get_variable("params", "lora_key"), 1.0 - rate, x.shape)
        xd = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
        branch = (xd @ mod.get_variable("params", "lora_A")) @ mod.get_variable("params", "lora_B")
        return y + (lora_config.scale * branch).astype(y.dtype)

    return interceptor


def merge(params, lora: dict, lora_config: LoraConfig):
    """The merged model: `apply` outside the loss (export it with `export_hf`)."""
    return jax.jit(apply, static_argnums=2)(params, lora, lora_config)


def peft_name(layer: int, name: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{TARGETS[name]}.{name}.lora_{which}.weight"


def export_adapter(lora: dict, lora_config: LoraConfig, directory: str, base_model_name_or_path: str = ""):
    """Write `adapter_model.safetensors` + `adapter_config.json` in the PEFT layout."""
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for sub, mods in lora.items():
        for name, ab in mods.items():
            a, b = np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32)
            for i in range(a.shape[0]):
                tensors[peft_name(i, name, "A")] = a[i].T  # [r, in]
                tensors[peft_name(i, name, "B")] = b[i].T  # [out, r]
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.rank, "lora_alpha": lora_config.alpha, "use_rslora": lora_config.rslora,
        "target_modules": [t for t in TARGETS if t in lora.get(TARGETS[t], {})],
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def load_adapter(directory: str) -> tuple[dict, LoraConfig]:
    """Read an adapter written by `export_adapter` (or PEFT with the same targets)."""
    cfg_path = os.path.join(directory, "adapter_config.json")
    st_path = os.path.join(directory, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise PersonaError(f"{directory} is not a LoRA adapter directory: {os.path.basename(p)} is missing")
    with open(cfg_path) as f:
        cfg = json.load(f)
    targets = cfg.get("target_modules") or []
    lora_config = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                             rslora=bool(cfg.get("use_rslora", False)), targets=tuple(targets))
    f = SafetensorsFile(st_path)
    out: dict = {}
    for name in lora_config.targets:
        layers = sorted({int(k.split(".")[4]) for k in f.keys() if f".{name}.lora_A." in k})
        if not layers:
            raise PersonaError(f"{st_path} has no tensors for target {name} listed in adapter_config.json")
        a = np.stack([np.asarray(f[peft_name(i, name, "A")], np.float32).T for i in layers])
        b = np.stack([np.asarray(f[peft_name(i, name, "B")], np.float32).T for i in layers])
        out.setdefault(TARGETS[name], {})[name] = {"A": jnp.asarray(a), "B": jnp.asarray(b)}
    return out, lora_config
