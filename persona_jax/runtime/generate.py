"""Batched KV-cache sampling with interventions, the whole decode loop on device.

`generate_arrays` is the jitted core (prefill in one call of the scanned decoder, then
`lax.while_loop` over single-token `decode_step`s, blocks unrolled over per-layer
buffers, that stops when every row has emitted EOS); `generate` is
the host wrapper: render chats, tokenize, sort by length into buckets, left-pad, steer,
decode strings.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from persona_jax.model import sharding as sh
from persona_jax.runtime import batching
from persona_jax.runtime import apply
from persona_jax.steering import interceptor as iv
from persona_jax.errors import PersonaError
from persona_jax.model.decoder import Block, Embedding, empty_cache, head_kernel, lm_logits, norm
from persona_jax.steering.spec import Steering, as_list, position_masks, steering_arrays, validate_all
from persona_jax.runtime.steered import attached
from persona_jax.runtime.sampling import SamplingParams, _pick  # noqa: F401  (SamplingParams: API)
from persona_jax.steering.grid import SteeringGrid


def per_layer(config, params, cache, interventions=None):
    """Per-layer buffers for `decode_step`: the scanned [L, ...] block params and cache and
    the intervention arrays become lists of per-layer arrays (rows[0]: the embedding's
    `interventions` collection, rows[l + 1]: block l's). Made once per
    `generate_arrays` call, outside the decode loop; the block weights are copied once,
    so generation holds the weights twice while it runs."""
    n = config.num_layers
    layers = [jax.tree.map(lambda x: x[l], params["layers"]) for l in range(n)]
    caches = [{"k": cache["k"][l], "v": cache["v"][l]} for l in range(n)]
    rows = [apply.embed_variables(interventions)] + [apply.layer_variables(interventions, l) for l in range(n)]
    return layers, caches, rows


def decode_step(config, params, layers, tokens, ctx, caches, intervention_rows=None):
    """One decode call with the blocks unrolled over per-layer buffers.

    The same computation as `apply.decoder_apply(..., cache=..., logits="last")`,
    but each block reads its own params and cache buffers, so on CPU no step copies a
    layer's weights or cache out of (and back into) the stacked [L, ...] arrays the way
    the scanned decoder must; that copying dominated decode time. Prefill and capture
    keep the scanned decoder (one call each, compile time independent of depth).

    Args:
      params: the full param tree (embedding, final norm, LM head are read from it).
      layers: [L] per-layer block params; caches: [L] {k: [B, KV, hd, S], v: [B, KV, S, hd]} (from
        `per_layer`).
      tokens: [B, T] int32; ctx: `apply.make_ctx(...)` plus `add_pos`/`abl_pos`.
      intervention_rows: [L+1] `interventions` collections of the embedding and each
        block (`per_layer`), or None.
    Returns (logits [B, V] float32 of the last position, new caches [L]).
    """
    c = config
    dtype = params["embed_tokens"]["embedding"].dtype
    rows = intervention_rows or [{}] * (c.num_layers + 1)

    def variables(p, row):
        return {"params": p, "interventions": row} if row else {"params": p}

    _, calls = apply.split_sites(None, ctx)
    with iv.active(apply.SITES, None, calls):
        h = Embedding(c, dtype).apply(variables(params["embed_tokens"], rows[0]), tokens, ctx)
        new_caches = []
        for l in range(c.num_layers):
            layer_in = {"window": jnp.asarray(c.layer_windows[l], jnp.int32), "cache": caches[l]}
            h, cache_l = Block(c, dtype).apply(variables(layers[l], rows[l + 1]), h, layer_in, ctx)
            new_caches.append(cache_l)
    h = norm(c, dtype).apply({"params": params["norm"]}, h[:, -1])
    return lm_logits(c, h, head_kernel(c, params)), new_caches


def _longrope_recompute(c, params, seq, kv_valid, kv_pos, slot, interventions, prefill_pos, decode_pos):
    """The decode step at which a row first feeds position `rope_original_max_position`
    (longrope, Phi-3 128k), done as transformers' Phi-3 does it: the whole sequence so far
    is recomputed without a cache, so every cached key and value switches to the long
    factors. seq: [B, S] tokens in their slots; kv_valid [B, S] the filled slots (the fed
    token's included). Steering masks are the ones each token had: prefill masks over the
    prompt slots, decode masks over the generated ones.
    Returns (logits [B, V] at `slot`, the new stacked cache [L, ...]).
    """
    b, s = seq.shape
    dtype = params["embed_tokens"]["embedding"].dtype
    positions = jnp.where(kv_valid, kv_pos, 0)  # a row's largest position is its fed token's
    ctx = apply.make_ctx(kv_valid.astype(jnp.int32), positions=positions, kv_valid=kv_valid, kv_pos=kv_pos)
    if prefill_pos:  # (nested per site when a steering targets attn / mlp)
        p = jax.tree.leaves(prefill_pos)[0].shape[-1]
        ctx.update(jax.tree.map(
            lambda a, d: jnp.concatenate([a, jnp.broadcast_to(d, d.shape[:2] + (s - p,))], axis=-1),
            prefill_pos, decode_pos))
    _, h_final, cache = apply.decoder_outputs(c, params, seq, ctx, interventions=interventions,
                                              cache=empty_cache(c, b, s, dtype), logits="none")
    return lm_logits(c, h_final[:, slot], head_kernel(c, params)), cache


@functools.partial(jax.jit, static_argnames=("config", "sp", "cache_len", "scan_decode"))
def generate_arrays(config, params, tokens, mask, row_keys, temperature, top_k, top_p, min_new,
                    interventions=None, prefill_pos=None, decode_pos=None, *, sp: SamplingParams,
                    cache_len: int, scan_decode: bool = False):
    """Prefill + on-device decode loop (`_generate_arrays`, which documents the
    arguments), jitted; under an Explicit mesh it runs with the axes in Auto mode and
    returns arrays split over the batch axis of `tokens`."""
    b = sh.batch_spec(tokens)
    return sh.auto_axes_call(
        lambda *a: _generate_arrays(config, *a, sp=sp, cache_len=cache_len, scan_decode=scan_decode),
        (params, tokens, mask, row_keys, temperature, top_k, top_p, min_new, interventions, prefill_pos,
         decode_pos), (P(b), P(b)))


def _generate_arrays(config, params, tokens, mask, row_keys, temperature, top_k, top_p, min_new,
                     interventions=None, prefill_pos=None, decode_pos=None, *, sp: SamplingParams,
                     cache_len: int, scan_decode: bool = False):
    """Prefill + on-device decode loop.

    Args:
      tokens, mask: [B, P] left-padded prompts (the last column is every row's last token).
      row_keys: [B, 2] uint32 PRNG keys, one per row (results do not depend on batching).
      temperature, top_p: float scalars; top_k, min_new: int scalars (dynamic).
      interventions: intervention arrays [L+1, K, ...] or None.
      prefill_pos / decode_pos: {add_pos, abl_pos} masks [K, B, P] / [K, B, 1].
      sp: static sampling params; cache_len: S >= P + max_new_tokens.
      scan_decode: decode with the scanned decoder (no second copy of the block weights)
        instead of `decode_step`'s unrolled per-layer buffers.

    Returns (new_tokens [B, max_new_tokens] int32, padded with pad_id after EOS,
             lengths [B] int32 counting tokens up to and including EOS).
    """
    b, p = tokens.shape
    c = config
    dtype = params["embed_tokens"]["embedding"].dtype
    cache = empty_cache(c, b, cache_len, dtype)
    ctx, n_prompt, kv_pos = apply.prefill_ctx(mask, cache_len)
    kv_valid = ctx["kv_valid"]
    ctx.update(prefill_pos or {})
    logits, _, cache = apply.decoder_apply(
        c, params, tokens, ctx, interventions=interventions, cache=cache, logits="last")
    first = _pick(logits[:, -1], row_keys, 0, temperature, top_k, top_p, min_new, sp)
    if not scan_decode:
        layers, cache, rows = per_layer(c, params, cache, interventions)

    # longrope: can a row's position reach the original context during decode? (static)
    longrope_switch = c.rope_type == "longrope" and cache_len > c.rope_original_max_position
    eos = jnp.asarray(sp.eos_ids if sp.eos_ids else (-1,))
    out = jnp.full((b, sp.max_new_tokens), sp.pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < sp.max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, out, cache, kv_valid, done, lengths, last = state
        slot = p + step - 1  # the slot of `last`, the token being fed now
        kv_valid = kv_valid.at[:, slot].set(True)
        dctx = apply.make_ctx(jnp.ones((b, 1), jnp.int32), positions=(n_prompt + step - 1)[:, None],
                                   cache_index=slot, kv_valid=kv_valid, kv_pos=kv_pos)
        dctx.update(decode_pos or {})

        def incremental(cache):
            if scan_decode:
                logits, _, cache = apply.decoder_apply(
                    c, params, last[:, None], dctx, interventions=interventions, cache=cache, logits="last")
                return logits[:, -1], cache
            return decode_step(c, params, layers, last[:, None], dctx, cache, rows)

        if longrope_switch:
            def recompute(cache):
                seq = jnp.concatenate([tokens, out], axis=1)
                seq = jnp.pad(seq, ((0, 0), (0, cache_len - seq.shape[1])), constant_values=sp.pad_id)
                logits, full = _longrope_recompute(c, params, seq, kv_valid, kv_pos, slot, interventions,
                                                   prefill_pos, decode_pos)
                if not scan_decode:
                    full = [{"k": full["k"][l], "v": full["v"][l]} for l in range(c.num_layers)]
                return logits, full

            crossing = jnp.any(n_prompt + step - 1 == c.rope_original_max_position)
            logits, cache = jax.lax.cond(crossing, recompute, incremental, cache)
        else:
            logits, cache = incremental(cache)
        nxt = _pick(logits, row_keys, step, temperature, top_k, top_p, min_new, sp)
        nxt = jnp.where(done, sp.pad_id, nxt)
        out = out.at[:, step].set(nxt)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos)
        return step + 1, out, cache, kv_valid, done, lengths, nxt

    state = (jnp.asarray(1, jnp.int32), out, cache, kv_valid, done, lengths, first)
    _, out, _, _, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths


@dataclasses.dataclass
class Generation:
    """What `generate(..., return_tokens=True)` returns: the texts, the new token ids of
    each input (EOS included when emitted) and the rendered prompts."""

    texts: list[str]
    tokens: list[list[int]]  # new tokens per input, EOS included when emitted
    prompts: list[str]
    # closed-loop control (`monitor=`, `guard=`, conditioned steerings), else None:
    monitor_layers: tuple | None = None  # the hidden states of the projections' columns
    projections: list | None = None  # per input [new tokens, len(monitor_layers)]: row i from the state token i was sampled from
    prompt_projections: dict | None = None  # {"prompt_last", "prompt_avg"}: [N, len(monitor_layers)]
    guard_fired: list | None = None  # per input [new tokens, guards] bool: guard g acted at the step making token i
    condition_met: np.ndarray | None = None  # [N, conditions] bool, conditioned steerings in order


def render_prompts(model, inputs, who: str = "generate") -> list[str]:
    """Chat conversations (lists of {role, content}) -> template text with the generation
    prompt; strings pass through. `who` names the caller in errors."""
    if isinstance(inputs, (str, dict)):
        raise PersonaError(f"{who} expects a list of prompts or conversations, not a single one")
    out = []
    for x in inputs:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, (list, tuple)) and all(isinstance(m, dict) for m in x):
            out.append(model.render_chat(list(x), add_generation_prompt=True))
        else:
            raise PersonaError(f"each input must be a prompt string or a list of chat messages; got {type(x).__name__}")
    return out


def tokenize(model, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered texts; the chat template already holds any BOS, so no specials are added."""
    tok = model.require_tokenizer()
    return [list(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def generate(model, inputs, max_new_tokens: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
             top_k: int | None = None, min_new_tokens: int = 1, seed: int = 0,
             steering: Steering | Sequence[Steering] | None = None, batch_size: int = 32,
             return_tokens: bool = False, progress: bool = False, monitor=None, guard=None):
    """Sample continuations.

    Args:
      model: a loaded `Model`.
      inputs: list of chat conversations (rendered with the chat template and generation
        prompt) or of already rendered prompt strings.
      max_new_tokens: tokens to generate at most per input, or a list with one limit
        per input.
      temperature: 0 = greedy; top_p / top_k filter before sampling.
      min_new_tokens: EOS is forbidden before this many tokens.
      seed: results are a deterministic function of (seed, input index).
      steering: one `Steering` or several (applied together); per-row coefficients
        follow the order of `inputs`. `Steering.site` "attn" / "mlp" steers the
        attention / MLP output of a block (vector [L, D], row i = block i). A
        `Steering.grid` runs each of its (layer, coef) cells on every input and returns
        its labelled table (a pandas DataFrame: layer, coef, prompt, input, text).
        Steerings the model carries (`pj.steer`) apply too, first.
      batch_size: decode slots of the continuous-batching engine (`runtime/engine.py`):
        a finished row's slot takes the next input at once.
      return_tokens: return a `Generation` (texts, token ids, prompts) instead of texts.
      monitor: a `pj.Monitor`: each new token's projection at its layers, computed in the
        decode step (no second pass), and the prompts' prompt_last / prompt_avg ones.
      guard: a `pj.Guard` or a list: act per token when its projection passes a ceiling.
        With a monitor, a guard or a conditioned `Steering` (`Steering.condition`),
        `generate` returns a `Generation` with the control's records
        (`persona_jax.steering.control` says where each acts and reads).

    Goes through the continuous-batching engine; longrope checkpoints whose rows can
    cross `rope_original_max_position` (Phi-3 128k) keep the static batches of
    `generate_arrays` (the crossing step recomputes the whole sequence).
    """
    prompts = render_prompts(model, inputs)
    if not prompts:
        raise PersonaError("generate got an empty list of inputs")
    if isinstance(steering, SteeringGrid) and (monitor is not None or guard is not None):
        raise PersonaError("a Steering.grid runs without monitor= or guard=; pass Steering.sweep(...) "
                           "(one row per input) to combine them")
    if isinstance(steering, SteeringGrid):  # each cell on every input, one request stream
        limits = max_new_tokens if np.ndim(max_new_tokens) == 0 else steering.inputs(max_new_tokens)
        out = generate(model, steering.inputs(prompts), limits, temperature, top_p, top_k, min_new_tokens,
                       seed, Steering.sweep(steering.vector, *steering.rows(len(prompts)), steering.positions,
                                                steering.kind), batch_size, False, progress)
        return steering.table(prompts, out)
    if np.ndim(max_new_tokens) == 0:
        limits = [int(max_new_tokens)] * len(prompts)
    else:
        limits = [int(m) for m in max_new_tokens]
        if len(limits) != len(prompts):
            raise PersonaError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} inputs; "
                               "give one limit per input or a single number")
    if min(limits) < 1:
        raise PersonaError(f"max_new_tokens must be >= 1; got {min(limits)}")
    max_new_tokens = max(limits)
    ids = tokenize(model, prompts)
    for i, s in enumerate(ids):
        if not s:
            raise PersonaError(f"input {i} tokenizes to zero tokens")
    steerings = attached(model) + as_list(steering)
    site_rows = apply.steering_sites(model.config)
    validate_all(steerings, model.num_layers, model.hidden_size, len(prompts), site_rows)
    from persona_jax.runtime import closed_loop
    plan = closed_loop.plan(monitor, guard, steerings, model.num_layers, model.hidden_size, len(prompts))
    tok = model.require_tokenizer()
    c = model.config
    longrope = (c.rope_type == "longrope" and batching.bucket(max(map(len, ids))) + max_new_tokens
                > c.rope_original_max_position)
    records = None
    if longrope and plan is not None:
        raise PersonaError("monitor=, guard= and conditioned steering run in the engine, which this longrope "
                           "checkpoint cannot use once a row crosses rope_original_max_position; shorten the "
                           "prompts or max_new_tokens")
    if longrope:
        new_tokens = static_tokens(model, ids, limits, temperature, top_p, top_k, min_new_tokens, seed, steerings,
                                   site_rows, batch_size, progress)
    else:
        from persona_jax.runtime import engine
        new_tokens = engine.generate_tokens(model, ids, limits, temperature, top_p, top_k, min_new_tokens, seed,
                                            steerings, site_rows, batch_size, progress, plan=plan)
        if plan is not None:
            new_tokens, records = new_tokens
    texts = [tok.decode(t, skip_special_tokens=True) for t in new_tokens]
    if records is not None:
        return Generation(
            texts=texts, tokens=new_tokens, prompts=prompts, monitor_layers=plan.spec.monitor_layers,
            projections=[r["projections"] for r in records],
            prompt_projections={k: np.stack([r[k] for r in records]) for k in ("prompt_last", "prompt_avg")},
            guard_fired=[r["fired"] for r in records], condition_met=np.stack([r["gate"] for r in records]))
    if return_tokens:
        return Generation(texts=texts, tokens=new_tokens, prompts=prompts)
    return texts


def static_tokens(model, ids, limits, temperature, top_p, top_k, min_new_tokens, seed, steerings, site_rows,
                  batch_size, progress=False) -> list[list[int]]:
    """New tokens per input from static batches (`generate_arrays`): inputs sorted by
    prompt length, each batch decodes until every row is done or the largest limit, and
    each row is cut at its own limit. The longrope path of `generate`."""
    max_new_tokens = max(limits)
    sp = SamplingParams(max_new_tokens=int(max_new_tokens), greedy=temperature == 0,
                        use_top_k=top_k is not None, use_top_p=top_p < 1.0,
                        eos_ids=model.eos_token_ids, pad_id=model.pad_token_id)
    base_key = jax.random.PRNGKey(seed)
    bs, batches = batching.by_length([len(s) for s in ids], batch_size, model.mesh)
    new_tokens: list[list[int]] = [None] * len(ids)  # type: ignore[list-item]
    for rows_p in tqdm(batches, desc="generate", disable=not progress):
        rows = rows_p[rows_p >= 0]
        seqs = batching.batch_seqs(ids, rows_p, filler=[model.pad_token_id])
        p_len = batching.bucket(max(len(ids[r]) for r in rows))
        tokens, mask = batching.pad_rows(seqs, p_len, model.pad_token_id, left=True)
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.asarray(np.maximum(rows_p, 0)))
        interventions = prefill_pos = decode_pos = None
        if steerings:
            interventions = steering_arrays(steerings, model.num_layers, model.hidden_size, rows_p, bs, site_rows)
            prefill_pos = position_masks(steerings, "prefill", mask)
            decode_pos = position_masks(steerings, "decode", np.ones((bs, 1), np.int32))
        tokens, mask = batching.place(model.mesh, tokens, mask)
        cache_len = p_len + -(-max_new_tokens // 16) * 16
        out, lengths = generate_arrays(
            model.config, model.params, tokens, mask, keys, jnp.float32(temperature),
            jnp.int32(top_k or 0), jnp.float32(top_p), jnp.int32(min_new_tokens),
            interventions, prefill_pos, decode_pos, sp=sp, cache_len=cache_len, scan_decode=model.scan_decode)
        out, lengths = batching.to_host(out), batching.to_host(lengths)
        for j, r in enumerate(rows):
            new_tokens[r] = out[j, : min(lengths[j], limits[r])].tolist()
    return new_tokens
