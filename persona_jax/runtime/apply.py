"""Pure array functions over (params, arrays): the jittable core every runner uses.

These take a `DecoderConfig` (static) and a params pytree, so they can be called from a
user's own JAX code under `jax.jit`/`shard_map` without a `Model` object.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from persona_jax.steering import interceptor as iv
from persona_jax.model import sharding as sh
from persona_jax.model.config import DecoderConfig
from persona_jax.model.decoder import Decoder, init_params, make_ctx, param_shapes  # noqa: F401 (the apply API)


def decoder_apply(config: DecoderConfig, params, tokens, ctx, *, interventions=None,
                  cache=None, capture: iv.Capture = None, logits: bool = True, remat: bool = False):
    """Run the decoder once.

    Args:
      config: static architecture.
      params: param pytree (leaves may be sharded).
      tokens: [B, T] int32.
      ctx: from `make_ctx`, plus `add_pos` [K, B, T] / `abl_pos` [J, B, T] when
        `interventions` has add / ablation terms, and `readout` [R, B, T] when
        capture == "readout".
      interventions: dict of [L+1, ...] arrays (see `persona_jax.steering.interceptor`) or None.
      cache: {k: [L, B, KV, hd, S], v: [L, B, KV, S, hd]} (`models.decoder.empty_cache`) or None.
      capture: None, "hidden" (all states) or "readout" (weighted position sums).
      logits: True (all positions), "last" (last position only) or False (capture
        does not need the LM head).
      remat: rematerialise each block's activations in the backward pass (fine-tuning
        memory: only the [L, B, T, D] block inputs are kept).

    Returns (logits [B, T, V] float32 | None, captured, new_cache) where captured is
    None, hidden states [L+1, B, T, D] in the HF `output_hidden_states` convention (the
    last entry after the final norm), or readouts [L+1, R, B, D] float32.

    Inputs typed with an Explicit mesh (`jax.make_mesh`'s default) are run with the mesh
    axes in Auto mode (`sharding.auto_axes_call`); the outputs keep the batch sharding
    of `tokens` and the cache that of `cache`.
    """
    b = sh.batch_spec(tokens)
    out_specs = lambda: (P(b) if logits else None, None if capture is None else P(None, b) if capture == "hidden" else P(None, None, b),
                         None if cache is None else jax.tree.map(sh.spec_of, cache))
    return sh.auto_axes_call(
        lambda params, tokens, ctx, interventions, cache: _decoder_apply(
            config, params, tokens, ctx, interventions, cache, capture, logits, remat),
        (params, tokens, ctx, interventions, cache), out_specs)


def _decoder_apply(config, params, tokens, ctx, interventions, cache, capture, logits, remat):
    dtype = params["embed_tokens"]["embedding"].dtype
    variables = {"params": params}
    if interventions:
        variables["interventions"] = iv.split_layers(interventions)
    with iv.active(capture):
        (lg, h_final, new_cache), state = Decoder(config, dtype, remat).apply(
            variables, tokens, ctx, cache, logits, mutable=["intermediates"])
    captured = None
    if capture is not None:
        inter = state["intermediates"]
        name = "hidden" if capture == "hidden" else "readout"
        first = inter["embed_tokens"][name][0]
        blocks = inter["layers"][name][0]
        last = h_final if capture == "hidden" else iv.readout(h_final, ctx["readout"])
        captured = jnp.concatenate([first[None], blocks[:-1], last[None]], axis=0)
    return lg, captured, new_cache
