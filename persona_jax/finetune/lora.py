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
import re

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.model.checkpoint import fused_parts
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
        if name not in params["layers"].get(sub, {}):
            continue  # as PEFT: a target the architecture lacks (Apertus' ungated MLP has no gate_proj)
        kernel = params["layers"][sub][name]["kernel"]
        layers, fan_in, fan_out = kernel.shape
        a = jax.random.normal(key, (layers, fan_in, lora_config.rank), jnp.float32) / math.sqrt(3 * fan_in)
        b = jnp.zeros((layers, lora_config.rank, fan_out), jnp.float32)
        out.setdefault(sub, {})[name] = {"A": a, "B": b}
    if not out:
        raise PersonaError(f"none of the LoRA targets {', '.join(lora_config.targets)} is in this model")
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


def peft_name(layer: int, name: str, which: str, module_prefix: str = "model.") -> str:
    """PEFT's tensor name of one adapter matrix; module_prefix: where the transformers model
    holds its decoder layers (`DecoderConfig.module_prefix`, `model.language_model.` for
    Gemma 3 multimodal checkpoints), which PEFT's names follow."""
    sub = TARGETS.get(name, _FUSED_SUB.get(name))
    return f"base_model.model.{module_prefix}layers.{layer}.{sub}.{name}.lora_{which}.weight"


# fused projections of some families (Phi-3) and the sublayer that owns them
_FUSED_SUB = {"qkv_proj": "self_attn", "gate_up_proj": "mlp"}
# a PEFT tensor name: (... .layers.)(i).(sublayer).(module).lora_(A|B).weight, any prefix
_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def _module_alpha(cfg: dict, module: str) -> float:
    """PEFT's alpha for `module`: `alpha_pattern` when one of its keys names the module
    (a key matches a module name that ends with it after a dot), else `lora_alpha`."""
    for key, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return float(alpha)
    return float(cfg.get("lora_alpha", 8))  # PEFT's default


def _fused_groups(config) -> dict[str, list[tuple[str, int, int]]]:
    """{fused projection: [(our projection, row offset, rows)] in row order}, empty for
    families whose checkpoints keep q/k/v and gate/up apart."""
    groups: dict = {}
    for name, (fused, start, size) in (fused_parts(config) if config is not None else {}).items():
        groups.setdefault(fused, []).append((name, start, size))
    return {f: sorted(m, key=lambda x: x[1]) for f, m in groups.items()}


def export_adapter(lora: dict, lora_config: LoraConfig, directory: str, base_model_name_or_path: str = "",
                   config=None):
    """Write `adapter_model.safetensors` + `adapter_config.json` in the PEFT layout.

    config: the model's `DecoderConfig`; its `module_prefix` starts the tensor names, so an
    adapter of a Gemma 3 multimodal checkpoint attaches in PEFT. For a family whose checkpoints fuse q/k/v
    (`qkv_proj`) or gate/up (`gate_up_proj`), the adapters of the parts are written as one
    adapter on the fused module, exactly: A = [A_q | A_k | A_v] (rank n*r) and B block
    diagonal (zero rows where a part is not a target), with `rank_pattern` and
    `alpha_pattern` keeping PEFT's scale equal to ours. PEFT can only load an adapter whose
    modules exist in the model, and those families have no q_proj.
    """
    os.makedirs(directory, exist_ok=True)
    mods = {name: ab for sub in lora.values() for name, ab in sub.items()}
    # module -> (A [L, in, r'], B [L, r', out]) in the exported layout
    out: dict = {}
    rank_pattern, alpha_pattern = {}, {}
    for fused, members in _fused_groups(config).items():
        present = [(n, start, size) for n, start, size in members if n in mods]
        if not present:
            continue
        total = sum(size for _, _, size in members)
        a = np.concatenate([np.asarray(mods[n]["A"], np.float32) for n, _, _ in present], axis=-1)
        b = np.zeros((a.shape[0], a.shape[-1], total), np.float32)
        r0 = 0
        for n, start, size in present:
            bn = np.asarray(mods.pop(n)["B"], np.float32)
            b[:, r0:r0 + bn.shape[1], start:start + size] = bn
            r0 += bn.shape[1]
        out[fused] = (a, b)
        rank_pattern[fused] = int(a.shape[-1])
        # the same scale at rank n*r: alpha' / r' == alpha / r (or over the square roots)
        ratio = a.shape[-1] / lora_config.rank
        alpha_pattern[fused] = lora_config.alpha * (math.sqrt(ratio) if lora_config.rslora else ratio)
    for name, ab in mods.items():
        out[name] = (np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32))
    tensors = {}
    prefix = config.module_prefix if config is not None else "model."
    for name, (a, b) in out.items():
        for i in range(a.shape[0]):
            tensors[peft_name(i, name, "A", prefix)] = a[i].T  # [r, in]
            tensors[peft_name(i, name, "B", prefix)] = b[i].T  # [out, r]
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    order = list(TARGETS) + list(_FUSED_SUB)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.rank, "lora_alpha": lora_config.alpha, "use_rslora": lora_config.rslora,
        "target_modules": _target_modules([t for t in order if t in out], prefix),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _target_modules(names: list[str], module_prefix: str):
    """PEFT's `target_modules`: the bare names (PEFT matches them as suffixes) for a causal
    LM; for a checkpoint whose decoder sits under another prefix (a multimodal model, whose
    vision tower has q_proj too), a regex PEFT full-matches that reaches the decoder only."""
    if module_prefix == "model.":
        return names
    return rf"{re.escape(module_prefix)}layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"


def load_adapter(directory: str, config=None) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA adapter (written by `export_adapter` or by PEFT).

    Any tensor-name prefix; per-module ranks and alphas (`rank_pattern`, `alpha_pattern`)
    are folded into B so one `LoraConfig.scale` serves every module. A fused module
    (`qkv_proj`, `gate_up_proj`, Phi-3) needs the model's `config`: each part gets the
    fused A and its own rows of B, which merges to the same weights.
    """
    cfg_path = os.path.join(directory, "adapter_config.json")
    st_path = os.path.join(directory, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise PersonaError(f"{directory} is not a LoRA adapter directory: {os.path.basename(p)} is missing")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise PersonaError(f"{cfg_path} is not valid JSON ({e})") from None
    if cfg.get("use_dora"):
        raise PersonaError(f"{directory} is a DoRA adapter; only plain LoRA adapters can be merged")
    rslora = bool(cfg.get("use_rslora", False))
    f = SafetensorsFile(st_path)
    found: dict = {}  # module -> {layer: {A, B}}
    for key in f.keys():
        m = _PEFT_KEY.search(key)
        if m:
            layer, _, module, which = m.groups()
            found.setdefault(module, {}).setdefault(int(layer), {})[which] = key
    if not found:
        raise PersonaError(f"{st_path} holds no LoRA tensors of decoder layers (lora_A / lora_B weights)")
    groups = _fused_groups(config)
    fused = [m for m in found if m in _FUSED_SUB]
    if fused and not groups:
        raise PersonaError(f"the adapter in {directory} targets fused {', '.join(fused)}, which this model's "
                           "family does not have")
    unknown = [m for m in found if m not in TARGETS and m not in _FUSED_SUB]
    if unknown:
        raise PersonaError(f"the adapter in {directory} targets {', '.join(unknown)}; supported: "
                           f"{', '.join(list(TARGETS) + list(_FUSED_SUB))}")
    lora_config = LoraConfig(rank=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)), rslora=rslora)
    out: dict = {}
    for module, layers in found.items():
        idx = sorted(layers)
        if idx != list(range(len(idx))) or any(set(layers[i]) != {"A", "B"} for i in idx):
            raise PersonaError(f"{st_path}: target {module} lacks lora_A or lora_B tensors for some layers")
        a = np.stack([np.asarray(f[layers[i]["A"]], np.float32).T for i in idx])  # [L, in, r]
        b = np.stack([np.asarray(f[layers[i]["B"]], np.float32).T for i in idx])  # [L, r, out]
        rank = a.shape[-1]
        module_scale = LoraConfig(rank=rank, alpha=_module_alpha(cfg, module), rslora=rslora).scale
        b = b * (module_scale / lora_config.scale)
        for name, start, size in groups.get(module, [(module, 0, b.shape[-1])]):
            out.setdefault(TARGETS[name], {})[name] = {"A": jnp.asarray(a),
                                                       "B": jnp.asarray(b[..., start:start + size])}
    names = tuple(n for sub in out.values() for n in sub)
    return out, dataclasses.replace(lora_config, targets=names)
