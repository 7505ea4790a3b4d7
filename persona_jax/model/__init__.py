"""Llama-like Flax decoder, family converters and checkpoint loading."""
from persona_jax.model.config import DecoderConfig
from persona_jax.model.families import FAMILIES, config_from_hf, config_to_hf
from persona_jax.model.checkpoint import Model, load_model, load_params
