"""Llama-like Flax decoder, family converters and checkpoint loading."""
from persona_jax.models.config import DecoderConfig
from persona_jax.models.families import FAMILIES, config_from_hf, config_to_hf
from persona_jax.models.loading import Model, load_model, load_params
