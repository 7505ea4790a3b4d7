"""Thin per-family converters: HF `config.json` dict -> `DecoderConfig`.

Weight names are the same for every supported family (`model.layers.{i}.self_attn.q_proj.weight`
...), so the family only decides the config switches; `checkpoint.hf_name` maps our param
paths to them.
"""
from __future__ import annotations

from persona_jax.errors import PersonaError
from persona_jax.model.config import DecoderConfig


def _rope(cfg: dict) -> dict:
    # transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise PersonaError(
            f"rope type {rope_type!r} is not supported yet; supported: default, linear, llama3")
    return dict(
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(merged.get("factor", 1.0)),
        rope_low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(
            merged.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))),
    )


def _eos(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _windows(cfg: dict, n_layers: int, default_on: bool) -> tuple[int, ...]:
    window = cfg.get("sliding_window")
    if not window:
        return (0,) * n_layers
    layer_types = cfg.get("layer_types")
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
    return (int(window) if default_on else 0,) * n_layers


def _common(cfg: dict, **switches) -> DecoderConfig:
    heads = cfg["num_attention_heads"]
    n_layers = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh"):
        raise PersonaError(f"activation {act!r} in config.json is not supported; supported: silu, gelu")
    return DecoderConfig(
        model_type=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hidden_act=act,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg),
        pad_token_id=cfg.get("pad_token_id"),
        **_rope(cfg),
        **switches,
    )


def llama(cfg: dict) -> DecoderConfig:
    bias = bool(cfg.get("attention_bias", False))
    return _common(cfg, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))


def mistral(cfg: dict) -> DecoderConfig:
    n = cfg["num_hidden_layers"]
    return _common(cfg, layer_windows=_windows(cfg, n, default_on=True))


def qwen2(cfg: dict) -> DecoderConfig:
    n = cfg["num_hidden_layers"]
    windows = _windows(cfg, n, default_on=False) if cfg.get("use_sliding_window") else (0,) * n
    return _common(cfg, qkv_bias=True, layer_windows=windows)


def qwen3(cfg: dict) -> DecoderConfig:
    n = cfg["num_hidden_layers"]
    bias = bool(cfg.get("attention_bias", False))
    windows = _windows(cfg, n, default_on=False) if cfg.get("use_sliding_window") else (0,) * n
    return _common(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True, layer_windows=windows)


FAMILIES = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3}


def config_from_hf(cfg: dict, where: str = "config.json") -> DecoderConfig:
    """Convert an HF config dict; unknown families are a clear error."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise PersonaError(
            f"{where}: model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(FAMILIES))}")
    try:
        return FAMILIES[model_type](cfg)
    except KeyError as e:
        raise PersonaError(f"{where}: required field {e.args[0]!r} is missing") from None


def config_to_hf(c: DecoderConfig) -> dict:
    """Our config back to an HF llama-family `config.json` dict (used to export models we train)."""
    rope = {"rope_theta": c.rope_theta, "rope_type": c.rope_type}
    if c.rope_type == "linear":
        rope["factor"] = c.rope_factor
    elif c.rope_type == "llama3":
        rope.update(factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_position)
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[c.model_type]
    eos = list(c.eos_token_ids)
    return {
        "architectures": [arch], "model_type": c.model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps, "rope_parameters": rope, "rope_theta": c.rope_theta,
        "attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias, "hidden_act": c.hidden_act,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": c.pad_token_id, "torch_dtype": "float32",
    }
