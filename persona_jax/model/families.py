"""Thin per-family converters: HF `config.json` dict -> `DecoderConfig`.

Weight names are the same for every supported family (`model.layers.{i}.self_attn.q_proj.weight`
...), so the family only decides the config switches; `checkpoint.hf_name` maps our param
paths to them.
"""
from __future__ import annotations

import dataclasses
import math

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
    if act not in ("silu", "gelu", "gelu_pytorch_tanh", "xielu"):
        raise PersonaError(f"activation {act!r} in config.json is not supported; supported: silu, gelu, xielu")
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


# --------------------------------------------------------------------------- Gemma, OLMo 2, Phi-3
# HF config.json files on the Hub often omit fields that equal the config class's
# defaults (the text_config of a `gemma3` checkpoint holds only a handful); these are
# transformers' defaults for the fields the converters read.
_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, rope_theta=10000.0,
    query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0)
_GEMMA3_DEFAULTS = dict(
    vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, rope_theta=1e6,
    rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
    sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None)


def _gemma_common(cfg: dict, n: int) -> dict:
    if cfg.get("use_bidirectional_attention"):
        raise PersonaError("bidirectional Gemma models (use_bidirectional_attention, e.g. EmbeddingGemma) "
                           "are encoders, not chat decoders; they are not supported")
    return dict(norm_offset=1.0, norm_scale_f32=True, norm_placement="sandwich",
                embed_scale=float(cfg["hidden_size"]) ** 0.5,
                query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
                attn_logit_softcap=cfg.get("attn_logit_softcapping") or None,
                final_logit_softcap=cfg.get("final_logit_softcapping") or None)


def _layer_types(cfg: dict, n: int, pattern: int) -> list[str]:
    """`layer_types`, or the alternation transformers derives from a sliding-window pattern."""
    return cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _act(cfg: dict) -> dict:
    return {"hidden_act": cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"}


def gemma2(cfg: dict) -> DecoderConfig:
    cfg = {**_GEMMA2_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k.endswith("softcapping")}}
    n = cfg["num_hidden_layers"]
    types = _layer_types(cfg, n, 2)
    windows = tuple(int(cfg["sliding_window"] or 0) if t == "sliding_attention" else 0 for t in types)
    return _common({**cfg, **_act(cfg)}, layer_windows=windows, **_gemma_common(cfg, n),
                   qkv_bias=bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")))


def _gemma3_rope(cfg: dict) -> dict:
    """Global layers: `rope_parameters["full_attention"]` (transformers 5) or `rope_theta` +
    `rope_scaling`; local layers: default rope with `rope_local_base_freq`."""
    params = cfg.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    if not full:
        full = {"rope_theta": cfg.get("rope_theta", 1e6), **(cfg.get("rope_scaling") or {})}
    full.setdefault("rope_theta", cfg.get("rope_theta", 1e6))
    local_type = local.get("rope_type", local.get("type", "default"))
    if local_type != "default":
        raise PersonaError(f"Gemma 3 sliding-window layers with rope type {local_type!r} are not supported")
    rope = _rope({"rope_parameters": full, "max_position_embeddings": cfg.get("max_position_embeddings")})
    rope["rope_local_theta"] = float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
    return rope


def gemma3_text(cfg: dict) -> DecoderConfig:
    cfg = {**_GEMMA3_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k.endswith("softcapping")}}
    n = cfg["num_hidden_layers"]
    types = _layer_types(cfg, n, int(cfg.get("sliding_window_pattern") or 6))
    windows = tuple(int(cfg["sliding_window"] or 0) if t == "sliding_attention" else 0 for t in types)
    rope = _gemma3_rope(cfg)
    body = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    body["model_type"] = "gemma3_text"
    c = _common({**body, **_act(cfg)}, layer_windows=windows, qk_norm=True, **_gemma_common(cfg, n),
                qkv_bias=bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")))
    return dataclasses.replace(c, **rope)


def gemma3(cfg: dict) -> DecoderConfig:
    """`Gemma3ForConditionalGeneration`: the language model of `text_config`; the vision
    tower and projector are ignored (and their weights never read)."""
    text = dict(cfg.get("text_config") or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if key not in text and cfg.get(key) is not None:
            text[key] = cfg[key]
    text.setdefault("tie_word_embeddings", True)
    # transformers builds the decoder at model.language_model (for both weight layouts):
    # a PEFT adapter of this checkpoint names its modules from there
    return dataclasses.replace(gemma3_text(text), module_prefix="model.language_model.")


def olmo2(cfg: dict) -> DecoderConfig:
    bias = bool(cfg.get("attention_bias", False))
    cfg = {"rms_norm_eps": 1e-5, **cfg}
    return _common(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_full=True,
                   norm_scale_f32=True, norm_placement="post")


def olmo3(cfg: dict) -> DecoderConfig:
    """OLMo 3: OLMo 2's block (full QK norm, post-norms) with sliding-window layers
    (`layer_types`, by default three sliding to one full) whose rope is
    `rope_parameters["sliding_attention"]` (default type), and the full layers'
    `rope_parameters["full_attention"]`, as Gemma 3 lays them out."""
    cfg = {"rms_norm_eps": 1e-6, **cfg}
    n = cfg["num_hidden_layers"]
    types = _layer_types(cfg, n, 4)
    windows = tuple(int(cfg.get("sliding_window") or 4096) if t == "sliding_attention" else 0 for t in types)
    params = cfg.get("rope_parameters") or {}
    if "full_attention" not in params:  # one flat rope for both layer types
        params = {"full_attention": {**(cfg.get("rope_scaling") or {}), **params},
                  "sliding_attention": {"rope_type": "default", **{k: v for k, v in params.items()
                                                                   if k == "rope_theta"}}}
    full = {"rope_theta": cfg.get("rope_theta", 500000.0), **params["full_attention"]}
    rope = _gemma3_rope({"rope_parameters": {**params, "full_attention": full},
                         "max_position_embeddings": cfg.get("max_position_embeddings"),
                         "rope_local_base_freq": full["rope_theta"]})
    body = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    bias = bool(cfg.get("attention_bias", False))
    c = _common(body, qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_full=True, norm_scale_f32=True,
                norm_placement="post", layer_windows=windows)
    return dataclasses.replace(c, **rope)


def apertus(cfg: dict) -> DecoderConfig:
    """Apertus: Llama's pre-norm block with per-head QK norm and an ungated MLP,
    down(xIELU(up(x))), whose activation learns alpha_p / alpha_n per layer."""
    cfg = {"rms_norm_eps": 1e-5, "hidden_act": "xielu", **cfg}
    bias = bool(cfg.get("attention_bias", False))
    return _common(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True, mlp_gated=False,
                   mlp_bias=bool(cfg.get("mlp_bias", False)))


def phi3(cfg: dict) -> DecoderConfig:
    cfg = {"rms_norm_eps": 1e-5, **cfg}
    n = cfg["num_hidden_layers"]
    params = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type in ("su", "yarn"):  # transformers reads both as longrope for Phi-3
        rope_type = "longrope"
    extra = {}
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if partial != 1.0:
        extra["rotary_dim"] = int(head_dim * partial)
    if rope_type == "longrope":
        orig = int(params.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"])
        factor = params.get("factor") or cfg["max_position_embeddings"] / orig
        attn = params.get("attention_factor")
        if attn is None:
            attn = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
        try:
            extra.update(rope_short_factor=tuple(float(x) for x in params["short_factor"]),
                         rope_long_factor=tuple(float(x) for x in params["long_factor"]))
        except KeyError as e:
            raise PersonaError(f"longrope needs rope_scaling.{e.args[0]}") from None
        extra.update(rope_original_max_position=orig, rope_attention_factor=float(attn))
        params = {k: v for k, v in params.items() if k not in ("rope_type", "type")}
        cfg = {**cfg, "rope_parameters": {**params, "rope_type": "default"}, "rope_scaling": None}
    c = _common(cfg, layer_windows=_windows(cfg, n, default_on=True), o_bias=False,
                fused_qkv=True, fused_gate_up=True)
    try:
        return dataclasses.replace(c, rope_type=rope_type, **extra)
    except ValueError as e:
        raise PersonaError(f"config.json: {e}") from None


FAMILIES = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3,
            "gemma2": gemma2, "gemma3_text": gemma3_text, "gemma3": gemma3, "olmo2": olmo2, "olmo3": olmo3, "apertus": apertus, "phi3": phi3}


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
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM", "apertus": "ApertusForCausalLM",
            "phi3": "Phi3ForCausalLM"}[c.model_type]
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
    } | _family_fields(c, rope)


def _family_fields(c: DecoderConfig, rope: dict) -> dict:
    """config.json fields of the Gemma 2/3, OLMo 2 and Phi-3 switches (empty for the others)."""
    windows = [w for w in c.layer_windows if w]
    types = ["sliding_attention" if w else "full_attention" for w in c.layer_windows]
    if c.model_type in ("gemma2", "gemma3_text"):
        scalar = c.query_pre_attn_scalar
        out = {"hidden_activation": c.hidden_act,
               "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
               "attn_logit_softcapping": c.attn_logit_softcap,
               "final_logit_softcapping": c.final_logit_softcap,
               "sliding_window": windows[0] if windows else None, "layer_types": types}
        if c.model_type == "gemma3_text":
            out["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
                "rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta}}
        return out
    if c.model_type == "olmo3":
        return {"sliding_window": windows[0] if windows else None, "layer_types": types,
                "rope_parameters": {"full_attention": rope, "sliding_attention": {
                    "rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta}}}
    if c.model_type == "phi3":
        out = {"sliding_window": windows[0] if windows else None,
               "partial_rotary_factor": c.rope_dim / c.head_dim}
        if c.rope_type == "longrope":
            out["original_max_position_embeddings"] = c.rope_original_max_position
            out["rope_parameters"] = {**rope, "short_factor": list(c.rope_short_factor),
                                      "long_factor": list(c.rope_long_factor),
                                      "original_max_position_embeddings": c.rope_original_max_position,
                                      "attention_factor": c.rope_attention_factor,
                                      "partial_rotary_factor": c.rope_dim / c.head_dim}
        return out
    return {}
