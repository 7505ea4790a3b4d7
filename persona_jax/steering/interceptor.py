"""Reading and writing the residual stream, as interceptors around the decoder blocks.

Everything an intervention needs is array data, so one compiled program serves every
layer x coefficient choice:

* `interventions` collection (scanned with the layers; row l of an [L+1, ...] array acts
  on hidden state l, i.e. the embedding for l = 0 and block l-1's output otherwise):
    add_vec  [L+1, K, D]   vectors to add
    add_coef [L+1, K, B]   per-row coefficients (0 = off)
    abl_dir  [L+1, J, D]   unit directions to project out
    abl_coef [L+1, J, B]   per-row ablation strength (1 = full projection removal)
* per-call position masks, broadcast to every layer through the blocks' `ctx`:
    add_pos [K, B, T], abl_pos [J, B, T]  (1 where the term acts; see `position_mask`)
* readout weights `readout` [R, B, T] in `ctx`: capture sows sum_t w[r, b, t] * h[b, t]
  per layer instead of the whole [B, T, D] hidden state, so reductions happen on device.

At each wrapped call the interceptor ablates, then adds, then reads (so captured states
are the steered ones, as a forward hook on the block output would see them).
"""
from __future__ import annotations

import contextlib
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from persona_jax.model.decoder import Block, Embedding

Capture = Literal[None, "hidden", "readout"]


def _write(module, h, ctx):
    if module.has_variable("interventions", "abl_dir"):
        dirs = module.get_variable("interventions", "abl_dir")  # [J, D]
        coef = module.get_variable("interventions", "abl_coef")  # [J, B]
        pos = ctx["abl_pos"]  # [J, B, T]
        for j in range(dirs.shape[0]):  # sequential, like stacked hooks
            u = dirs[j].astype(h.dtype)
            proj = jnp.einsum("btd,d->bt", h, u)
            scale = (coef[j][:, None] * pos[j]).astype(h.dtype)
            h = h - (scale * proj)[..., None] * u
    if module.has_variable("interventions", "add_vec"):
        vec = module.get_variable("interventions", "add_vec")  # [K, D]
        coef = module.get_variable("interventions", "add_coef")  # [K, B]
        scale = coef[:, :, None] * ctx["add_pos"]  # [K, B, T]
        h = h + jnp.einsum("kbt,kd->btd", scale.astype(h.dtype), vec.astype(h.dtype))
    return h


def _read(module, h, ctx, capture: Capture):
    if capture == "hidden":
        module.sow("intermediates", "hidden", h)
    elif capture == "readout":
        module.sow("intermediates", "readout", readout(h, ctx["readout"]))


def readout(h, weights):
    """Weighted position sums. h: [B, T, D]; weights: [R, B, T] -> [R, B, D] float32."""
    return jnp.einsum("btd,rbt->rbd", h.astype(jnp.float32), weights.astype(jnp.float32))


def interceptor(capture: Capture = None):
    """The interceptor for `nn.intercept_methods`; `capture` is static (part of the trace)."""

    def fn(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (Block, Embedding)):
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        if isinstance(module, Block):
            h, extra = out
            ctx = args[2]
        else:
            h, extra = out, None
            ctx = args[1]
        h = _write(module, h, ctx)
        _read(module, h, ctx, capture)
        return (h, extra) if isinstance(module, Block) else h

    return fn


@contextlib.contextmanager
def active(capture: Capture = None):
    with nn.intercept_methods(interceptor(capture)):
        yield


def split_layers(arrays: dict) -> dict:
    """[L+1, ...] intervention arrays -> the collection layout: row 0 to the embedding,
    rows 1..L scanned with the blocks."""
    if not arrays:
        return {}
    return {
        "embed_tokens": {k: v[0] for k, v in arrays.items()},
        "layers": {k: v[1:] for k, v in arrays.items()},
    }
