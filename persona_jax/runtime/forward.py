"""`forward`: logits and all hidden states for a batch, HF `output_hidden_states` style."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from persona_jax.model import sharding as sh
from persona_jax.runtime import batching
from persona_jax.runtime import apply, executable_store
from persona_jax.errors import PersonaError
from persona_jax.runtime.steered import attached
from persona_jax.steering.spec import as_list, position_masks, steering_arrays, validate_all


@dataclasses.dataclass
class ForwardOutput:
    """What `forward` returns: logits [B, T, V] float32 and hidden_states [L+1, B, T, D]
    (HF `output_hidden_states`: row 0 the embeddings, row L after the final norm)."""

    logits: jax.Array  # [B, T, V] float32
    hidden_states: jax.Array  # [L+1, B, T, D]


@executable_store.stored_jit(static_argnames=("config",))
def forward_arrays(config, params, input_ids, attention_mask, interventions=None, positions=None):
    """Jitted forward: input_ids/attention_mask [B, T] -> (logits [B, T, V], hidden [L+1, B, T, D]).
    interventions / positions: steering arrays and their [K, B, T] position masks
    (`spec.steering_arrays`, `spec.position_masks(..., "prefill", mask)`), or None."""
    ctx = apply.make_ctx(attention_mask)
    ctx.update(positions or {})
    logits, hidden, _ = apply.decoder_apply(config, params, input_ids, ctx, interventions=interventions,
                                            capture="hidden")
    return logits, hidden


def forward(model, input_ids, attention_mask=None, steering=None) -> ForwardOutput:
    """Forward a padded batch. input_ids: [B, T] ints; attention_mask: [B, T] 0/1 (left
    or right padding both work; positions follow the real tokens). steering: `Steering`s
    applied (after those the model carries, `pj.steer`), as in a prefill call: positions
    "response" is each row's last real token."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise PersonaError(f"input_ids must be [batch, length]; got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise PersonaError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= model.config.vocab_size):
        raise PersonaError(f"token ids must lie in [0, {model.config.vocab_size}); got {ids.min()}..{ids.max()}")
    b = ids.shape[0]
    b_pad = batching.grow_batch(b, batching.batch_multiple(model.mesh))
    if b_pad != b:  # the data axis must divide the batch: pad with masked rows, drop them after
        ids = np.concatenate([ids, np.zeros((b_pad - b, ids.shape[1]), ids.dtype)])
        mask = np.concatenate([mask, np.zeros((b_pad - b, mask.shape[1]), mask.dtype)])
    steerings = attached(model) + as_list(steering)
    interventions = positions = None
    if steerings:
        site_rows = apply.steering_sites(model.config)
        validate_all(steerings, model.num_layers, model.hidden_size, b, site_rows)
        rows = np.where(np.arange(b_pad) < b, np.arange(b_pad), -1)
        interventions = steering_arrays(steerings, model.num_layers, model.hidden_size, rows, b_pad, site_rows)
        positions = position_masks(steerings, "prefill", mask)
    ids, mask = batching.place(model.mesh, ids.astype(np.int32), mask.astype(np.int32))
    logits, hidden = forward_arrays(model.config, model.params, ids, mask, interventions, positions)
    if b_pad != b:
        logits, hidden = _first_rows(logits, hidden, b)
    return ForwardOutput(logits=logits, hidden_states=hidden)


@functools.partial(jax.jit, static_argnums=2)
def _first_rows(logits, hidden, b):
    """Drop the padding rows (under an Explicit mesh the uneven slice of the data axis
    is taken in Auto mode and comes back replicated)."""
    return sh.auto_axes_call(lambda lg, h: (lg[:b], h[:, :b]), (logits, hidden), (P(), P()))
