"""Residual-stream capture with the three reductions of METHOD.md 5, reduced on device.

For every (prompt, response) the model runs on prompt + response (teacher forcing) and
each hidden state l in 0..L is reduced to
  prompt_avg   mean over positions [0, prompt_len)
  prompt_last  position prompt_len - 1
  response_avg mean over positions [prompt_len, end)
where prompt_len is the token count of the prompt text alone (the reference's rule).
The reductions are readout weights applied inside the scanned blocks, so only
[L+1, 3, B, D] leaves the device, never [L+1, B, T, D]; the LM head is not computed.
"""
from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from persona_jax.runtime import batching
from persona_jax.runtime import apply, executable_store
from persona_jax.errors import PersonaError
from persona_jax.runtime.generate import render_prompts, tokenize
from persona_jax.runtime.steered import attached
from persona_jax.steering.spec import Steering, as_list, position_masks, steering_arrays, validate_all
from persona_jax.io.vectors import REDUCTIONS  # noqa: F401 (the file names, in the readout order)


def length_bucket(n: int) -> int:
    """Padded length of a capture batch whose longest row has n tokens: `batching.bucket`
    up to 64, then four steps per octave (80, 96, 112, 128, 160, 192, ...). Capture cost
    is proportional to the padded length (there is no decode phase to amortise it), so
    this keeps padding under a fifth on average (a power-of-two bucket wastes a third)
    while a run still compiles only a handful of shapes."""
    if n <= 64:
        return batching.bucket(n)
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def readout_weights(prompt_lens, total_lens, length: int):
    """[3, B, T] float32 weights of the three reductions for right-padded rows."""
    t = jnp.arange(length)[None, :]
    pl = prompt_lens[:, None]
    tl = total_lens[:, None]
    in_prompt = (t < pl).astype(jnp.float32)
    in_resp = ((t >= pl) & (t < tl)).astype(jnp.float32)
    last = (t == pl - 1).astype(jnp.float32)
    avg = lambda m: m / jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
    return jnp.stack([avg(in_prompt), last, avg(in_resp)])


def teacher_forced_masks(steerings, prompt_lens: np.ndarray, length: int) -> dict:
    """Position masks {add_pos [K, B, T], ...} for prompt + response run in one call that
    steer what generating the response would: prompt positions as the prefill of the
    prompt alone, response positions as decode steps (so "response" starts at the last
    prompt token and "prompt" stops at it)."""
    in_prompt = np.arange(length)[None, :] < np.asarray(prompt_lens)[:, None]
    pre = position_masks(steerings, "prefill", in_prompt.astype(np.int32))
    dec = position_masks(steerings, "decode", np.ones((in_prompt.shape[0], 1), np.int32))
    return jax.tree.map(lambda p, d: np.where(in_prompt, p, d).astype(np.float32), pre, dec)


@executable_store.stored_jit(static_argnames=("config",))
def capture_arrays(config, params, tokens, prompt_lens, total_lens, interventions=None, positions=None):
    """Jitted capture of one right-padded batch.

    tokens: [B, T] int32; prompt_lens, total_lens: [B] int32 (0 for padding rows);
    interventions / positions: steering arrays [L+1, K, ...] and their position masks
    [K, B, T] (`spec.steering_arrays`, `teacher_forced_masks`), or None.
    Returns [3, B, L+1, D] float32: prompt_avg, prompt_last, response_avg.
    """
    t = tokens.shape[1]
    mask = (jnp.arange(t)[None, :] < total_lens[:, None]).astype(jnp.int32)
    ctx = apply.make_ctx(mask)
    ctx.update(positions or {})
    ctx["readout"] = readout_weights(prompt_lens, total_lens, t)
    _, ro, _ = apply.decoder_apply(config, params, tokens, ctx, interventions=interventions, capture="readout",
                                   logits="none", right_padded=True)
    return jnp.transpose(ro, (1, 2, 0, 3))  # [L+1, 3, B, D] -> [3, B, L+1, D]


def capture(model, prompts: Sequence, responses: Sequence[str], batch_size: int = 16,
            progress: bool = False, steering: Steering | Sequence[Steering] | None = None) -> dict[str, np.ndarray]:
    """Capture the three reductions for prompts and their responses.

    prompts: rendered prompt strings or chat conversations (lists of {role, content}),
    which are rendered with the chat template and its generation prompt, as `generate`
    does. steering: `Steering`s applied while capturing (after those the model carries,
    `pj.steer`); positions mean what they mean when the response is generated.

    Returns {"prompt_avg", "prompt_last", "response_avg"}: float32 [N, L+1, D] each, and
    "kept": int indices [N] of the inputs used. A response that adds zero tokens is
    skipped with a warning that counts them (its response_avg would be undefined).
    """
    prompts = render_prompts(model, prompts, "capture")
    if isinstance(responses, str) or len(prompts) != len(responses):
        raise PersonaError(f"capture got {len(prompts)} prompts but "
                           f"{'one string' if isinstance(responses, str) else len(responses)} as responses; "
                           "give one response string per prompt")
    if not prompts:
        raise PersonaError("capture got an empty list of prompts")
    bad = [i for i, r in enumerate(responses) if not isinstance(r, str)]
    if bad:
        raise PersonaError(f"capture: response {bad[0]} is a {type(responses[bad[0]]).__name__}, not a string")
    steerings = attached(model) + as_list(steering)
    site_rows = apply.steering_sites(model.config)
    validate_all(steerings, model.num_layers, model.hidden_size, len(prompts), site_rows)
    p_ids = tokenize(model, prompts)
    full_ids = tokenize(model, [p + r for p, r in zip(prompts, responses)])
    kept = [i for i in range(len(prompts)) if len(full_ids[i]) > len(p_ids[i]) and p_ids[i]]
    if len(kept) < len(prompts):
        logging.warning("capture: skipped %d of %d samples whose response adds no tokens",
                        len(prompts) - len(kept), len(prompts))
    if not kept:
        raise PersonaError("capture: every response is empty, nothing to capture")
    L1, D = model.num_layers + 1, model.hidden_size
    out = np.zeros((3, len(kept), L1, D), np.float32)
    full = [full_ids[i] for i in kept]
    prompt_lens = np.array([len(p_ids[i]) for i in kept], np.int32)
    bs, batches = batching.by_length([len(s) for s in full], batch_size, model.mesh)
    for rows in tqdm(batches, desc="capture", disable=not progress):
        seqs = batching.batch_seqs(full, rows)
        tokens, _ = batching.pad_rows(seqs, length_bucket(max(len(s) for s in seqs)), model.pad_token_id, left=False)
        real = rows >= 0
        pl = np.where(real, prompt_lens[np.maximum(rows, 0)], 0).astype(np.int32)
        tl = np.where(real, [len(s) for s in seqs], 0).astype(np.int32)
        interventions = positions = None
        if steerings:  # per-row coefficients follow the input index (-1: a padding row)
            inputs = np.where(real, np.asarray(kept)[np.maximum(rows, 0)], -1)
            interventions = steering_arrays(steerings, model.num_layers, model.hidden_size, inputs, len(rows),
                                            site_rows)
            positions = teacher_forced_masks(steerings, pl, tokens.shape[1])
        tokens, pl, tl = batching.place(model.mesh, tokens, pl, tl)
        res = batching.to_host(capture_arrays(model.config, model.params, tokens, pl, tl, interventions, positions))
        out[:, rows[real]] = res[:, real]
    result = {name: out[i] for i, name in enumerate(REDUCTIONS)}
    result["kept"] = np.asarray(kept)
    return result
