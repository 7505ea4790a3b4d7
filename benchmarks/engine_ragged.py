"""The continuous-batching engine on the paper's workload shape (issue 19), on CPU.

    python benchmarks/engine_ragged.py            # full run (~10 min on 2 busy cores)
    python benchmarks/engine_ragged.py --quick    # smaller, for a smoke test

Everything is measured side by side in one run, each figure the median of `--repeats`
interleaved rounds (other processes share the cores; the spread is printed):

* ragged efficiency: 256 sampled requests (temperature 1) whose lengths follow a long
  tail (1 + Exp(64) capped at 256: mean ~64, median ~45), forced by per-request
  `max_new_tokens`; useful tokens/s divided by tokens/s on the same prompts at a fixed
  length equal to the mean (the engine's slots sized for that length; and, as
  `engine_efficiency_vs_capsized_fixed`, sized for the cap, as an EOS-driven run whose
  rows happen to end at the mean would be: the ring's length then costs both alike). For
  the engine (`generate`) and for today's static batches (`generate_arrays`, each batch
  decoding until its longest row ends, which is what EOS-driven rows cost there); then
  the same with half the rows steered at different coefficients.
* the refill interval k (`chunk`): the ragged efficiency at a few values.
* decode step, old vs new, batch 16 on 80-160-token prompts: (t(96 new) - t(32 new)) / 64
  per step for transformers' `generate` (greedy, the same left-padded ids), for the step's
  projection and LM-head matmuls alone (`matmul_floor`, the floor on this hardware), for
  the static path's per-layer buffers (`generate_arrays`) and for the engine
  (unrolled over per-layer views of the stacked weights, the default on CPU; unrolled
  slicing the stacked weights inside the program; scanned); the fixed cost per call is
  t(32) - 32 * step.
* memory: the compiled programs' temporary bytes (XLA memory analysis) of the static
  decode (its per-layer weight copies) and of the engine's decode and insert, against the
  weights and the KV cache; and the KV arithmetic of 256 slots x 1,100 tokens at 7B bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, vocab_size=4096,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def build(d, model_kwargs):
    """(our model, the transformers model) of a random llama saved in d."""
    import persona_jax as pj
    from persona_jax.testing import tiny_checkpoint
    torch_model = tiny_checkpoint(d, "llama", seed=0, initializer_range=0.02, **model_kwargs)
    return pj.load_model(d), torch_model


def workload(n, rng, vocab, cap=256, mean=64.0, prompt=(16, 64)):
    ids = [list(rng.randint(10, vocab, size=rng.randint(*prompt))) for _ in range(n)]
    lengths = np.minimum(cap, 1 + np.floor(rng.exponential(mean, size=n))).astype(int)
    return ids, lengths.tolist()


def engine_run(model, ids, limits, steerings=(), **kw):
    from persona_jax.runtime import apply, engine
    out = engine.generate_tokens(model, ids, limits, 1.0, 1.0, None, 1, 0, list(steerings),
                                 apply.steering_sites(model.config), kw.pop("slots", 32), **kw)
    return sum(map(len, out))


def static_run(model, ids, limits, steerings=(), slots=32):
    """Today's static batches: sort by prompt length, each batch of `slots` decodes until
    its longest row's limit (what its rows' EOS would cost), cut per row."""
    import jax
    import jax.numpy as jnp
    from persona_jax.runtime import apply, batching
    from persona_jax.runtime.generate import SamplingParams, generate_arrays
    from persona_jax.steering.spec import position_masks, steering_arrays
    site_rows = apply.steering_sites(model.config)
    bs, batches = batching.by_length([len(s) for s in ids], slots, model.mesh)
    base = jax.random.PRNGKey(0)
    useful = 0
    for rows_p in batches:
        rows = rows_p[rows_p >= 0]
        m = max(limits[r] for r in rows)
        sp = SamplingParams(m, False, False, False, model.eos_token_ids, model.pad_token_id)
        seqs = batching.batch_seqs(ids, rows_p, filler=[model.pad_token_id])
        p = batching.bucket(max(len(ids[r]) for r in rows))
        tokens, mask = batching.pad_rows(seqs, p, model.pad_token_id, left=True)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(np.maximum(rows_p, 0)))
        inter = pp = dp = None
        if steerings:
            inter = steering_arrays(list(steerings), model.num_layers, model.hidden_size, rows_p, bs, site_rows)
            pp = position_masks(list(steerings), "prefill", mask)
            dp = position_masks(list(steerings), "decode", np.ones((bs, 1), np.int32))
        out, lengths = generate_arrays(model.config, model.params, tokens, mask, keys, jnp.float32(1.0), jnp.int32(0),
                                       jnp.float32(1.0), jnp.int32(1), inter, pp, dp, sp=sp,
                                       cache_len=p + -(-m // 16) * 16)
        lengths = np.asarray(lengths)
        useful += sum(min(int(lengths[j]), limits[r]) for j, r in enumerate(rows))
    return useful


def timed(fns: dict, repeats: int) -> dict:
    """{name: (median seconds, min, max, result)}: a warm-up call each (compilation), then
    `repeats` rounds in which the functions take turns."""
    res = {k: f() for k, f in fns.items()}
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            res[k] = f()
            ts[k].append(time.perf_counter() - t)
    return {k: (float(np.median(v)), float(np.min(v)), float(np.max(v)), res[k]) for k, v in ts.items()}


def ragged(model, args, out):
    from persona_jax.steering.spec import Steering
    rng = np.random.RandomState(0)
    ids, limits = workload(args.requests, rng, model.config.vocab_size, cap=args.cap)
    mean = int(round(np.mean(limits)))
    fixed = [mean] * len(ids)
    out["workload"] = dict(requests=len(ids), cap=args.cap, mean=float(np.mean(limits)),
                           median=float(np.median(limits)), max=int(max(limits)), slots=args.slots)
    vec = rng.randn(model.num_layers + 1, model.hidden_size).astype(np.float32)
    vec *= 4.0 / np.linalg.norm(vec, axis=-1, keepdims=True)
    coefs = [0.0 if i % 2 else 0.5 + (i % 16) / 8 for i in range(len(ids))]
    steer = [Steering(vec, layer=2, coef=coefs, positions="response")]
    for label, st in (("plain", ()), ("steered", steer)):
        fns = {
            "engine_ragged": lambda st=st: engine_run(model, ids, limits, st, slots=args.slots),
            "engine_fixed": lambda st=st: engine_run(model, ids, fixed, st, slots=args.slots),
            # the slots sized for the cap, as an EOS-driven run of the same prompts is
            "engine_fixed_capsized": lambda st=st: engine_run(model, ids, fixed, st, slots=args.slots,
                                                              max_new=args.cap),
            "static_ragged": lambda st=st: static_run(model, ids, limits, st, slots=args.slots),
            "static_fixed": lambda st=st: static_run(model, ids, fixed, st, slots=args.slots),
        }
        r = timed(fns, args.repeats)
        row = {k: dict(seconds=v[0], spread=[v[1], v[2]], tokens=v[3], tokens_per_s=v[3] / v[0]) for k, v in r.items()}
        for side in ("engine", "static"):
            row[f"{side}_efficiency"] = row[f"{side}_ragged"]["tokens_per_s"] / row[f"{side}_fixed"]["tokens_per_s"]
        row["engine_efficiency_vs_capsized_fixed"] = (row["engine_ragged"]["tokens_per_s"]
                                                      / row["engine_fixed_capsized"]["tokens_per_s"])
        row["engine_vs_static_ragged"] = row["engine_ragged"]["tokens_per_s"] / row["static_ragged"]["tokens_per_s"]
        out[f"ragged_{label}"] = row
        print(label, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                 if "efficiency" in k}),
              {k: round(v["tokens_per_s"], 1) for k, v in row.items() if isinstance(v, dict)}, flush=True)
    if args.chunks:
        fns = {f"chunk_{k}": (lambda k=k: engine_run(model, ids, limits, slots=args.slots, chunk=k))
               for k in args.chunks}
        fns["fixed"] = lambda: engine_run(model, ids, fixed, slots=args.slots)
        r = timed(fns, args.repeats)
        fixed_tps = r["fixed"][3] / r["fixed"][0]
        out["chunk_efficiency"] = {k: (v[3] / v[0]) / fixed_tps for k, v in r.items() if k != "fixed"}
        print("refill interval k:", {k: round(v, 3) for k, v in out["chunk_efficiency"].items()}, flush=True)


def matmul_floor(model, b, steps):
    """A function running `steps` times the matmuls of one greedy decode step at batch b
    (every layer's q/k/v/o and MLP projections, and the LM head), chained so none is
    dropped, on per-layer views of the weights: the step's floor on this hardware."""
    import jax
    import jax.numpy as jnp
    from persona_jax.model.decoder import head_kernel
    from persona_jax.model.layer_views import layer_views
    c = model.config
    layers = layer_views(model.params["layers"], c.num_layers).layers
    head = head_kernel(c, model.params)

    def step(_, x):
        for lp in layers:
            a, m = lp["self_attn"], lp["mlp"]
            q = x @ a["q_proj"]["kernel"]
            kv = (x @ a["k_proj"]["kernel"])[:, :1] + (x @ a["v_proj"]["kernel"])[:, :1]
            x = x + q @ a["o_proj"]["kernel"] + 1e-6 * kv
            x = x + ((x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
        return x + 1e-6 * (x @ head)[:, : c.hidden_size]

    f = jax.jit(lambda x: jax.lax.fori_loop(0, steps, step, x))
    x = jnp.ones((b, c.hidden_size), model.dtype) * 1e-3
    return lambda: f(x).block_until_ready()


def decode_step(model, args, out):
    """Old vs new decode step at batch 16, greedy, 80-160-token prompts, against the step's
    matmuls alone, and the fixed cost per call against transformers' `generate`."""
    import jax
    import jax.numpy as jnp
    import torch
    from persona_jax.runtime import batching, engine
    from persona_jax.runtime.generate import SamplingParams, generate_arrays
    rng = np.random.RandomState(1)
    b = 16
    ids = [list(rng.randint(10, model.config.vocab_size, size=rng.randint(80, 161))) for _ in range(b)]
    p = batching.bucket(max(map(len, ids)))
    tokens, mask = batching.pad_rows(ids, p, 0, left=True)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(b))
    torch.set_num_threads(os.cpu_count())
    t_ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    t_mask = torch.tensor(np.asarray(mask), dtype=torch.long)

    def old(n):
        sp = SamplingParams(n, True, False, False, (), 0)  # no EOS: exactly n tokens
        o, _ = generate_arrays(model.config, model.params, tokens, mask, keys, jnp.float32(0), jnp.int32(0),
                               jnp.float32(1), jnp.int32(1), sp=sp, cache_len=p + -(-n // 16) * 16)
        return np.asarray(o).size

    def new(n, loop, views=True):
        return engine.generate_tokens(model, ids, [n] * b, 0.0, 1.0, None, n, 0, [], {}, b, layer_loop=loop,
                                      prefill_batch=b, chunk=128, weight_views=views)

    def hf(n):
        with torch.no_grad():
            return model.torch_model.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=n,
                                              min_new_tokens=n, do_sample=False, pad_token_id=0)

    short, long = 32, 96
    floor = {n: matmul_floor(model, b, n) for n in (short, long)}
    fns = {"old_32": lambda: old(short), "old_96": lambda: old(long), "hf_32": lambda: hf(short),
           "hf_96": lambda: hf(long), "floor_32": floor[short], "floor_96": floor[long]}
    variants = {"unrolled": ("unrolled", True), "unrolled_sliced": ("unrolled", False), "scan": ("scan", False)}
    for name, (loop, views) in variants.items():
        fns[f"{name}_32"] = lambda loop=loop, views=views: new(short, loop, views)
        fns[f"{name}_96"] = lambda loop=loop, views=views: new(long, loop, views)
    r = timed(fns, args.repeats)
    res = {}
    for side in ("old", "hf", "floor", *variants):
        step = (r[f"{side}_96"][0] - r[f"{side}_32"][0]) / (long - short)
        res[side] = dict(step_ms=step * 1e3, fixed_s=r[f"{side}_32"][0] - short * step)
    res["new_over_old_step"] = res["unrolled"]["step_ms"] / res["old"]["step_ms"]
    res["new_step_over_matmul_floor"] = res["unrolled"]["step_ms"] / res["floor"]["step_ms"]
    res["new_fixed_over_hf_fixed"] = res["unrolled"]["fixed_s"] / res["hf"]["fixed_s"]
    res["hf_step_over_new_step"] = res["hf"]["step_ms"] / res["unrolled"]["step_ms"]
    out["decode_step_b16"] = res
    print("decode step batch 16:", json.dumps(res), flush=True)


def memory(model, args, out):
    """Compiled temporary bytes of the decode programs against weights + KV cache."""
    import jax
    import jax.numpy as jnp
    from persona_jax.runtime import engine
    from persona_jax.runtime.generate import SamplingParams, generate_arrays
    c = model.config
    weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
    layer_weights = sum(x.nbytes for x in jax.tree.leaves(model.params["layers"]))
    b, p, n = args.slots, 64, 256
    tokens = jnp.ones((b, p), jnp.int32)
    mask = jnp.ones((b, p), jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(b))
    sp = SamplingParams(n, False, False, False, (2,), 0)
    old = generate_arrays.lower(c, model.params, tokens, mask, keys, jnp.float32(1), jnp.int32(0), jnp.float32(1),
                                jnp.int32(1), sp=sp, cache_len=p + n).compile().memory_analysis()
    res = {"weights_bytes": weights, "block_weights_bytes": layer_weights}
    res["static_temp_bytes"] = old.temp_size_in_bytes
    from persona_jax.model.layer_views import layer_views
    views = {**model.params, "layers": layer_views(model.params["layers"], c.num_layers).layers}
    for name, loop, dparams in (("unrolled", "unrolled", views), ("unrolled_sliced", "unrolled", model.params),
                                ("scan", "scan", model.params)):
        spec = engine.EngineSpec(slots=b, cache_len=p + n, max_new=n, greedy=False, use_top_k=False, use_top_p=False,
                                 eos_ids=(2,), pad_id=0, layer_loop=loop)
        state = engine.init_state(c, spec, model.dtype)
        kv = engine.state_bytes(state)
        dec = engine.decode.lower(c, dparams, state, jnp.int32(b), spec=spec, chunk=32).compile()
        ins = engine.insert.lower(c, dparams, state, tokens[:8], mask[:8], jnp.arange(8, dtype=jnp.int32),
                                  jnp.arange(8), jax.random.PRNGKey(0), jnp.ones(8), jnp.zeros(8, jnp.int32), jnp.ones(8), jnp.ones(8, jnp.int32),
                                  jnp.ones(8, jnp.int32), spec=spec).compile()
        res[name] = dict(kv_bytes=kv["kv"], state_other_bytes=kv["other"],
                         decode_temp_bytes=dec.memory_analysis().temp_size_in_bytes,
                         insert_temp_bytes=ins.memory_analysis().temp_size_in_bytes)
        res[name]["peak_over_weights_plus_kv"] = (weights + kv["kv"] + kv["other"] + max(
            res[name]["decode_temp_bytes"], res[name]["insert_temp_bytes"])) / (weights + kv["kv"])
    res["static_peak_over_weights_plus_kv"] = (weights + res["unrolled"]["kv_bytes"] + old.temp_size_in_bytes) / (
        weights + res["unrolled"]["kv_bytes"])
    out["memory"] = res
    print("memory:", json.dumps(res), flush=True)


def kv_arithmetic():
    """KV cache of a 7B-class model (Qwen2.5-7B: 28 layers, 4 KV heads x 128) in bf16."""
    layers, kv_heads, head_dim, bytes_ = 28, 4, 128, 2
    per_token = 2 * layers * kv_heads * head_dim * bytes_
    total = per_token * 256 * 1100
    return dict(per_token_bytes=per_token, slots_256_x_1100_GB=total / 1e9, weights_7_6B_bf16_GB=15.2,
                fits_141GB=total / 1e9 + 15.2 < 141)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--sections", default="ragged,step,memory")
    args = ap.parse_args()
    args.requests, args.cap, args.slots, args.chunks = 256, 256, 32, [4, 8, 32]
    model_kwargs = dict(MODEL)
    if args.quick:
        args.requests, args.cap, args.slots, args.chunks, args.repeats = 24, 32, 8, [], 1
        model_kwargs.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512)
    import jax
    out = {"machine": f"{jax.default_backend()} x{os.cpu_count()}", "model": model_kwargs}
    with tempfile.TemporaryDirectory() as d:
        model, torch_model = build(d, model_kwargs)
        model.torch_model = torch_model
        sections = args.sections.split(",")
        if "ragged" in sections:
            ragged(model, args, out)
        if "step" in sections:
            decode_step(model, args, out)
        if "memory" in sections:
            memory(model, args, out)
    out["kv_7b"] = kv_arithmetic()
    print("KV 7B:", json.dumps(out["kv_7b"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
