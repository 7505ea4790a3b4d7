"""Next-token choice shared by both decode loops (the static `generate_arrays` and the
continuous-batching engine): temperature, top-k and top-p filtering, EOS held back until
`min_new_tokens`, and per-row PRNG keys folded with the step.

The lower layer of `runtime/generate.py` and `runtime/engine.py`; it imports neither.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling choices (part of the compiled program)."""

    max_new_tokens: int
    greedy: bool
    use_top_k: bool
    use_top_p: bool
    eos_ids: tuple[int, ...]
    pad_id: int


def _order_key(x):
    """float32 -> uint32 with the same order (so thresholds can be bisected on integers)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key(keys, ok):
    """Per row, the largest uint32 t with ok(t) [B] true, for ok non-increasing in t and
    true at the row's smallest key. keys: [B, V] uint32. 32 bisection steps, each one
    pass over the row: a sort of the vocabulary costs ~10x more on CPU."""
    lo, hi = keys.min(axis=-1), keys.max(axis=-1)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + ((hi - lo) & 1)  # upper middle, no overflow
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)

    return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def _filter_logits(logits, temperature, top_k, top_p, sp: SamplingParams):
    """logits [B, V] float32 -> tempered, top-k / top-p filtered logits.

    top-k keeps the logits >= the k-th largest; top-p keeps the smallest set of most
    probable tokens whose mass reaches top_p (at least one token; tokens tied with the
    last one kept are kept too). Thresholds are found by bisection, not by sorting.
    """
    logits = logits / jnp.maximum(temperature, 1e-6)
    neg = jnp.finfo(jnp.float32).min
    if sp.use_top_k:
        keys = _order_key(logits)
        k = jnp.clip(top_k, 1, logits.shape[-1])
        kth = _largest_key(keys, lambda t: (keys >= t[:, None]).sum(axis=-1) >= k)
        logits = jnp.where(keys < kth[:, None], neg, logits)
    if sp.use_top_p:
        probs = jax.nn.softmax(logits, axis=-1)
        keys = _order_key(probs)
        # the smallest kept probability is the largest t whose tokens with p >= t hold >= top_p
        cut = _largest_key(keys, lambda t: jnp.where(keys >= t[:, None], probs, 0).sum(axis=-1) >= top_p)
        logits = jnp.where(keys < cut[:, None], neg, logits)
    return logits


def _pick(logits, keys, step, temperature, top_k, top_p, min_new, sp: SamplingParams):
    """Choose next tokens [B] from logits [B, V] (float32)."""
    logits = logits.astype(jnp.float32)
    if sp.eos_ids:
        eos = jnp.asarray(sp.eos_ids)
        logits = jnp.where((step < min_new) & jnp.isin(jnp.arange(logits.shape[-1]), eos)[None],
                           jnp.finfo(jnp.float32).min, logits)
    if sp.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _filter_logits(logits, temperature, top_k, top_p, sp)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)
