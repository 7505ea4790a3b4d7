"""The residual stream's second moment on neutral text, for `whiten` (steering/control.py).

Sigma_l = mean over every real token t of h_l[t] h_l[t]^T, accumulated on device batch
by batch (only [len(layers), D, D] leaves it).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from persona_jax.errors import PersonaError
from persona_jax.runtime import apply, batching
from persona_jax.runtime.generate import render_prompts, tokenize


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def second_moment_sums(config, params, tokens, mask, *, layers: tuple[int, ...]):
    """tokens, mask [B, T] -> sum over real tokens of h h^T at each of `layers`
    ([len(layers), D, D] float32; state L after the final norm) and the token count."""
    ctx = apply.make_ctx(mask)
    _, hidden, _ = apply.decoder_apply(config, params, tokens, ctx, capture="hidden", logits="none")
    h = hidden[jnp.asarray(layers)].astype(jnp.float32) * mask[None, :, :, None].astype(jnp.float32)
    return jnp.einsum("lbtd,lbte->lde", h, h), mask.sum()


def second_moment(model, texts: Sequence, layers: int | Sequence[int] | None = None, batch_size: int = 8,
                  progress: bool = False) -> np.ndarray:
    """Sigma at each of `layers` (default 0..L) from neutral `texts` (strings, or chats
    rendered with the template): [len(layers), D, D] float32, or [D, D] for one int layer.
    `whiten(v[l], sigma, ridge)` takes one; for an [L+1, D] vector give every layer."""
    prompts = render_prompts(model, texts, "second_moment")
    if not prompts:
        raise PersonaError("second_moment needs at least one text")
    single = isinstance(layers, (int, np.integer))
    ls = tuple(range(model.num_layers + 1)) if layers is None else tuple(int(l) for l in np.atleast_1d(layers))
    bad = [l for l in ls if not 0 <= l <= model.num_layers]
    if bad or not ls:
        raise PersonaError(f"second_moment layers {bad or '(none)'} are outside 0..{model.num_layers}")
    ids = [s for s in tokenize(model, prompts) if s]
    total, count = None, 0
    bs, batches = batching.by_length([len(s) for s in ids], batch_size, model.mesh)
    for rows in tqdm(batches, desc="second moment", disable=not progress):
        seqs = batching.batch_seqs(ids, rows)
        tokens, mask = batching.pad_rows(seqs, batching.bucket(max(map(len, seqs))), model.pad_token_id, left=False)
        mask = np.where((rows >= 0)[:, None], mask, 0).astype(np.int32)
        tokens, mask = batching.place(model.mesh, tokens, mask)
        s, n = second_moment_sums(model.config, model.params, tokens, mask, layers=ls)
        s = batching.to_host(s).astype(np.float64)
        total = s if total is None else total + s
        count += int(n)
    sigma = (total / max(count, 1)).astype(np.float32)
    return sigma[0] if single else sigma
