"""Decode attention over the KV ring that reads only each slot's live columns (Pallas).

The engine's decode step (runtime/engine.py) attends one new token per slot over a ring
sized for the longest request; the dense path (`decoder._attend`) reads every column.
Here each program (one slot, one KV head, all its query heads) walks only the column
blocks that hold the slot's live span, with an online softmax over blocks. Columns inside
that span are still masked by kv_valid and the sliding window, so the span only prunes.

Layout as in `decoder.empty_cache`: k [B, KV, hd, S], v [B, KV, S, hd].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK = 128  # ring columns per step of the online softmax (ragged granularity)


def _kernel(span_ref, qpos_ref, window_ref, q_ref, k_ref, v_ref, valid_ref, pos_ref, o_ref, *,
            block, n_blocks, scale, softcap):
    # span_ref [B, 2] (start column, live length), qpos_ref [B] (query position)
    b = pl.program_id(0)
    start, length = span_ref[b, 0], span_ref[b, 1]
    qpos, window = qpos_ref[b], window_ref[0]
    first = start // block
    # blocks the span touches; a wrapped full ring would reach its first block again
    count = jnp.minimum((start % block + length + block - 1) // block, n_blocks)
    q = q_ref[0, 0].astype(jnp.float32)  # [G, hd]
    g, hd = q.shape

    def body(j, carry):
        m, l, acc = carry
        off = pl.multiple_of(((first + j) % n_blocks) * block, block)
        k = k_ref[0, 0, :, pl.ds(off, block)].astype(jnp.float32)  # [hd, blk]
        v = v_ref[0, 0, pl.ds(off, block), :].astype(jnp.float32)  # [blk, hd]
        ok = valid_ref[0, pl.ds(off, block)] != 0  # [blk]
        ok &= (window == 0) | ((qpos - pos_ref[0, pl.ds(off, block)]) < window)
        s = jnp.dot(q, k, preferred_element_type=jnp.float32) * scale  # [G, blk]
        if softcap:
            s = jnp.tanh(s / softcap) * softcap
        s = jnp.where(ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        # a block with nothing allowed keeps m at -inf; guard the exp against inf - inf
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(axis=1)
        acc = alpha[:, None] * acc + jnp.dot(p, v, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((g,), -jnp.inf, jnp.float32), jnp.zeros((g,), jnp.float32),
            jnp.zeros((g, hd), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, count, body, init)
    o_ref[0, 0] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def ragged_decode_attention(q, k, v, kv_valid, kv_pos, q_pos, span, *, scale, softcap=None,
                            window=0, block=BLOCK, interpret=None):
    """One decode step's attention over the ring, reading only each slot's live span.

    q [B, Hq, hd]; k [B, KV, hd, S]; v [B, KV, S, hd]; kv_valid [B, S] bool;
    kv_pos [B, S] int (each column's position); q_pos [B] int (the new token's position);
    span [B, 2] int: (first live column, live length), the live columns being
    (start + i) mod S for i < length (a ring: the span may wrap). `window` (int, may be traced,
    as in scanned layers; 0 = none) keeps keys with q_pos - kv_pos < window; `softcap` caps scaled scores (Gemma 2).
    Returns [B, Hq, hd] in q's dtype. interpret defaults to True on CPU.
    """
    b, hq, hd = q.shape
    kvh, s = k.shape[1], k.shape[-1]
    g = hq // kvh
    block = min(block, s)
    if s % block:
        raise ValueError(f"ring length {s} is not a multiple of the block {block}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    kern = functools.partial(_kernel, block=block, n_blocks=s // block, scale=float(scale),
                             softcap=float(softcap) if softcap else None)
    whole = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))
    out = pl.pallas_call(
        kern,
        grid=(b, kvh),
        in_specs=[
            whole((b, 2)), whole((b,)), whole((1,)),
            pl.BlockSpec((1, 1, g, hd), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((1, 1, hd, s), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((1, 1, s, hd), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((1, s), lambda i, h: (i, 0)),
            pl.BlockSpec((1, s), lambda i, h: (i, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, g, hd), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kvh, g, hd), q.dtype),
        interpret=interpret,
    )(span.astype(jnp.int32), q_pos.astype(jnp.int32),
      jnp.asarray(window, jnp.int32).reshape(1), q.reshape(b, kvh, g, hd), k, v,
      kv_valid.astype(jnp.int32), kv_pos.astype(jnp.int32))
    return out.reshape(b, hq, hd)
