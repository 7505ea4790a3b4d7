"""The decoder's attention on CPU: the formulations tried, side by side in one run.

    python benchmarks/attention_cpu.py

For a capture-shaped call (cache-free, causal, batch 16) and a decode step (one query
against a 352-column cache, batch 16), in float32, median of interleaved rounds:

* `t_between`: the einsum "btkgd,bkds->bkgts" with the query position between the batch
  dimensions (the decoder's formulation before this benchmark);
* `merged`: queries as [B, KV, G*T, hd], one plain matmul per (row, KV head) (the
  decoder's `_attend`);
* `blocked_N` (cache-free only): `merged` per block of N queries over its prefix of keys
  (the decoder's `CAUSAL_BLOCK`).

Every variant's output is checked against a numpy computation of the same attention.
"""
from __future__ import annotations

import json
import time

import numpy as np


def numpy_attention(q, k, v, allowed, groups):
    """q [B, T, H, hd], k, v [B, S, KV, hd], allowed [B, T, S] -> [B, T, H, hd] (float64)."""
    k = np.repeat(k.astype(np.float64), groups, axis=2)
    v = np.repeat(v.astype(np.float64), groups, axis=2)
    s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def variants(groups, block_sizes):
    import jax
    import jax.numpy as jnp

    def core(q, kt, vt, allowed, form):
        b, t, h, hd = q.shape
        kv = h // groups
        s = kt.shape[-1]
        if form == "t_between":
            qg = q.reshape(b, t, kv, groups, hd)
            sc = jnp.einsum("btkgd,bkds->bkgts", qg, kt) / np.sqrt(hd)
        else:
            qm = jnp.transpose(q.reshape(b, t, kv, groups, hd), (0, 2, 3, 1, 4)).reshape(b, kv, groups * t, hd)
            sc = jnp.einsum("bkmd,bkds->bkms", qm, kt).reshape(b, kv, groups, t, s) / np.sqrt(hd)
        sc = jnp.where(allowed[:, None, None], sc, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(sc, axis=-1)
        if form == "t_between":
            return jnp.einsum("bkgts,bksd->btkgd", p, vt).reshape(b, t, h, hd)
        o = jnp.einsum("bkms,bksd->bkmd", p.reshape(b, kv, groups * t, s), vt)
        return jnp.transpose(o.reshape(b, kv, groups, t, hd), (0, 3, 1, 2, 4)).reshape(b, t, h, hd)

    def make(form, block=None):
        def f(q, k, v, allowed):
            kt, vt = jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))
            if block is None:
                return core(q, kt, vt, allowed, form)
            t = q.shape[1]
            return jnp.concatenate([core(q[:, i:i + block], kt[..., :i + block], vt[:, :, :i + block],
                                         allowed[:, i:i + block, :i + block], form)
                                    for i in range(0, t, block)], axis=1)
        return jax.jit(f)

    out = {"t_between": make("t_between"), "merged": make("merged")}
    for n in block_sizes:
        out[f"blocked_{n}"] = make("merged", n)
    return out


def run_case(name, b, t, s, heads, kv_heads, hd, causal_prefix, repeats):
    import jax
    import jax.numpy as jnp
    rng = np.random.RandomState(0)
    q = rng.randn(b, t, heads, hd).astype(np.float32)
    k = rng.randn(b, s, kv_heads, hd).astype(np.float32)
    v = rng.randn(b, s, kv_heads, hd).astype(np.float32)
    if causal_prefix:  # cache-free capture: causal, every key real
        allowed = np.broadcast_to(np.tril(np.ones((t, s), bool)), (b, t, s)).copy()
    else:  # decode: one query, the first 200 columns real
        allowed = np.zeros((b, t, s), bool)
        allowed[..., :200] = True
    ref = numpy_attention(q, k, v, allowed, heads // kv_heads)
    fns = variants(heads // kv_heads, (32, 64, 128) if causal_prefix else ())
    args = [jnp.asarray(x) for x in (q, k, v, allowed)]
    times = {n: [] for n in fns}
    err = {}
    for n, f in fns.items():
        err[n] = float(np.abs(np.asarray(f(*args)) - ref).max())
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[n].append(time.perf_counter() - t0)
    res = {n: dict(ms=float(np.median(v)) * 1e3, max_err=err[n]) for n, v in times.items()}
    print(name, json.dumps({n: round(r["ms"], 3) for n, r in res.items()}),
          "max |err| vs numpy:", f"{max(err.values()):.1e}", flush=True)
    return res


def main():
    repeats = 7
    print("capture-shaped (B 16, T 256, 8 heads of 64, MHA):", flush=True)
    run_case("capture_mha", 16, 256, 256, 8, 8, 64, True, repeats)
    print("capture-shaped (B 16, T 256, 8 heads of 64, GQA 2 KV heads):", flush=True)
    run_case("capture_gqa", 16, 256, 256, 8, 2, 64, True, repeats)
    print("decode step (B 16, 1 query, 352 columns, 4 heads / 2 KV heads of 64):", flush=True)
    run_case("decode_gqa", 16, 1, 352, 4, 2, 64, False, repeats * 5)


if __name__ == "__main__":
    main()
