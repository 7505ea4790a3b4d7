"""Pure array functions over (params, arrays): the jittable core every runner uses.

These take a `DecoderConfig` (static) and a params pytree, so they can be called from a
user's own JAX code under `jax.jit`/`shard_map` without a `Model` object.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from persona_jax.errors import PersonaError
from persona_jax.steering import interceptor as iv
from persona_jax.steering import sites
from persona_jax.steering.sites import Layout, Site
from persona_jax.model import sharding as sh
from persona_jax.model.config import DecoderConfig
from persona_jax.model.decoder import (MLP, Attention, Block, Decoder, Embedding, init_params,  # noqa: F401 (the apply API)
                                       make_ctx, param_shapes, prefill_ctx)


# Our decoder's intervention sites: one instance of the generic mechanism.
#   hidden  the residual stream, hidden state l (HF `output_hidden_states`) = row l:
#           the embedding output for l = 0, block l-1's output otherwise; [L+1] rows.
#   attn    the attention output of block i (after o_proj, before the residual add;
#           HF's `model.layers[i].self_attn` forward-hook output[0]); [L] rows.
#   mlp     the MLP output of block i (HF's `model.layers[i].mlp`); [L] rows.
SITES = {"hidden": Site((Embedding, Block)), "attn": Site(Attention), "mlp": Site(MLP)}


def site_layouts(config: DecoderConfig) -> dict[str, Layout]:
    """Where each site's rows live in `Decoder` (blocks are scanned as "layers")."""
    n = config.num_layers
    return {"hidden": Layout(((("embed_tokens",), None), (("layers",), n))),
            "attn": Layout(((("layers", "self_attn"), n),)),
            "mlp": Layout(((("layers", "mlp"), n),))}


def site_rows(config: DecoderConfig) -> dict[str, int]:
    return {name: layout.rows for name, layout in site_layouts(config).items()}


def steering_sites(config: DecoderConfig) -> dict[str, int]:
    """Rows of the sites a `Steering.site` may name (the residual stream is site None)."""
    return {k: v for k, v in site_rows(config).items() if k != "hidden"}


def split_sites(interventions, ctx) -> tuple[dict, dict]:
    """(row arrays, per-call arrays) per site. Top-level keys of `interventions` (row
    arrays) and of `ctx` (add_pos, abl_pos, readout) belong to the `hidden` site; a key
    naming another site ("attn", "mlp") holds that site's dict of both kinds, in
    `interventions` or in `ctx` (per-call masks that change between prefill and decode)."""
    rows, calls = {}, {}
    for name in SITES:
        r, c = {}, {}
        for src in (interventions or {}, ctx or {}):
            part = src if name == "hidden" else src.get(name) or {}
            r.update({k: v for k, v in part.items() if k in iv.ROW_KEYS})
            c.update({k: v for k, v in part.items() if k in iv.CALL_KEYS})
        if r:
            rows[name] = r
        if r or c:
            calls[name] = c
    return rows, calls


def decoder_apply(config: DecoderConfig, params, tokens, ctx, *, interventions=None,
                  cache=None, capture=None, logits: Literal["all", "last", "none"] = "all",
                  right_padded: bool = False, remat: bool = False, unroll_layers: bool = False):
    """Run the decoder once.

    Args:
      config: static architecture.
      params: param pytree (leaves may be sharded).
      tokens: [B, T] int32.
      ctx: from `make_ctx`, plus `add_pos` [K, B, T] / `abl_pos` [J, B, T] when
        `interventions` has add / ablation terms, and `readout` [R, B, T] when
        capture == "readout".
      interventions: dict of [L+1, ...] arrays for the residual stream (see
        `persona_jax.steering.interceptor`) or None; a key "attn" or "mlp" holds a dict
        of [L, ...] arrays for that site (with its own `add_pos`/`abl_pos` there or
        under ctx["attn"] / ctx["mlp"]).
      cache: {k: [L, B, KV, hd, S], v: [L, B, KV, S, hd]} (`models.decoder.empty_cache`) or None.
      capture: None, "hidden" (all states) or "readout" (weighted position sums), or a
        dict {site: "output" | "readout"} over `SITES` ("hidden", "attn", "mlp").
      logits: "all" (every position), "last" (the last position only) or "none" (capture
        does not need the LM head).
      right_padded: static; the caller guarantees every row's real tokens are a prefix
        (padding only at the end), so a cache-free call may use a fused causal attention
        kernel (`DecoderConfig.attention_impl`).
      remat: rematerialise each block's activations in the backward pass (fine-tuning
        memory: only the [L, B, T, D] block inputs are kept).
      unroll_layers: run the layer scan unrolled (`Decoder.unroll_layers`; fine-tuning on CPU).

    Returns (logits [B, T, V] float32 | None, captured, new_cache) where captured is
    None, hidden states [L+1, B, T, D] in the HF `output_hidden_states` convention (the
    last entry after the final norm), or readouts [L+1, R, B, D] float32; for a dict
    `capture`, a dict of those per site (attn / mlp: [L, B, T, D] or [L, R, B, D]).

    Inputs typed with an Explicit mesh (`jax.make_mesh`'s default) are run with the mesh
    axes in Auto mode (`sharding.auto_axes_call`); the outputs keep the batch sharding
    of `tokens` and the cache that of `cache`.
    """
    if isinstance(capture, str):
        modes = {"hidden": {"hidden": "output", "readout": "readout"}[capture]}
    else:
        modes = {k: v for k, v in (capture or {}).items() if v}
    unknown = [k for k in modes if k not in SITES]
    if unknown:
        raise PersonaError(f"unknown capture sites {unknown}; the decoder has: {', '.join(SITES)}")
    b = sh.batch_spec(tokens)

    def out_specs():
        cap = {k: P(None, b) if m == "output" else P(None, None, b) for k, m in modes.items()}
        return (P(b) if logits != "none" else None, cap if isinstance(capture, dict) else cap.get("hidden"),
                None if cache is None else jax.tree.map(sh.spec_of, cache))

    return sh.auto_axes_call(
        lambda params, tokens, ctx, interventions, cache: _decoder_apply(
            config, params, tokens, ctx, interventions, cache, modes, isinstance(capture, dict), logits,
            right_padded, remat, unroll_layers),
        (params, tokens, ctx, interventions, cache), out_specs)


def _run(config, params, tokens, ctx, interventions, cache, logits, right_padded, remat, modes, unroll_layers=False):
    """The decoder under interventions and capture at our sites: ((logits, h_final,
    new_cache), {site: captured}, per-call arrays by site)."""
    dtype = params["embed_tokens"]["embedding"].dtype
    rows, calls = split_sites(interventions, ctx)
    for name in modes:  # a site captured with readout weights reads ctx["readout"] unless it has its own
        calls.setdefault(name, {})
        if "readout" not in calls[name] and "readout" in ctx:
            calls[name]["readout"] = ctx["readout"]
    out, captured = sites.apply(
        Decoder(config, dtype, remat, right_padded, unroll_layers), {"params": params}, tokens, ctx, cache, logits,
        sites=SITES, layouts=site_layouts(config),
        interventions={k: {**rows.get(k, {}), **calls.get(k, {})} for k in calls}, capture=modes)
    return out, captured, calls


def _decoder_apply(config, params, tokens, ctx, interventions, cache, modes, as_dict, logits, right_padded, remat,
                   unroll_layers):
    (lg, h_final, new_cache), captured, calls = _run(config, params, tokens, ctx, interventions, cache, logits,
                                                     right_padded, remat, modes, unroll_layers)
    if "hidden" in captured:  # state L is read after the final norm (the HF convention)
        last = h_final if modes["hidden"] == "output" else iv.readout(h_final, calls["hidden"]["readout"])
        captured["hidden"] = jnp.concatenate([captured["hidden"][:-1], last[None]], axis=0)
    if not as_dict:
        captured = captured.get("hidden")
    return lg, captured, new_cache


def decoder_outputs(config: DecoderConfig, params, tokens, ctx, *, interventions=None, cache=None,
                    logits: Literal["all", "last", "none"] = "all", remat: bool = False):
    """The decoder's own outputs (logits | None, h_final [B, T, D] after the final norm,
    new_cache) with `interventions` applied as in `decoder_apply` (same arguments), for
    code that needs the final-normed states of every position. No Explicit-mesh handling:
    call it from a body that `sharding.auto_axes_call` already runs in Auto mode (as
    `generate_arrays`' is)."""
    return _run(config, params, tokens, ctx, interventions, cache, logits, False, remat, {})[0]


def layer_variables(interventions, layer: int) -> dict:
    """The `interventions` collection of `Block` number `layer` applied on its own (the
    per-layer decode path): row `layer + 1` of the hidden site, row `layer` of attn/mlp."""
    rows, _ = split_sites(interventions, None)
    out = {}
    for name, arrays in rows.items():
        i = layer + 1 if name == "hidden" else layer
        r = {k: v[i] for k, v in arrays.items()}
        path = {"hidden": (), "attn": ("self_attn",), "mlp": ("mlp",)}[name]
        out = sites.merge(out, Layout(((path, None),)).place(name, {k: v[None] for k, v in r.items()}))
    return out


def embed_variables(interventions) -> dict:
    """The `interventions` collection of `Embedding` applied on its own (hidden state 0)."""
    rows, _ = split_sites(interventions, None)
    if "hidden" not in rows:
        return {}
    return {iv.variable_name("hidden"): {k: v[0] for k, v in rows["hidden"].items()}}
