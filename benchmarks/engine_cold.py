"""Generation as a user meets it (issue 25): the first call of a fresh process, on CPU.

    python benchmarks/engine_cold.py              # full run (~5 min on 2 idle cores)
    python benchmarks/engine_cold.py --quick      # a smaller model and workload

The workload: a random llama3-style checkpoint (hidden 256, 4 layers, vocabulary 320,
five EOS ids), 256 chat prompts of 3-11 words, sampled at T=1 through `pj.generate`
(batch_size 32, max_new_tokens 256): the EOS ids make the lengths long-tailed (about
Geometric(5/320): mean ~64, a few % at the cap). Everything is measured in this run:

* cold / warm: the first `pj.generate` call of a fresh process (a child process, with an
  empty persistent compilation cache, then again with the cache the first child filled:
  JAX's compiled programs and the engine's whole executables, `runtime/executable_store.py`),
  the second call of that process (warm), and the programs each call obtained
  (`runtime/compile_count.py`: compiled by XLA, or loaded from the cache or the store);
* ragged efficiency: useful tokens/s of the ragged call over tokens/s of the same prompts
  at a fixed length (EOS suppressed) equal to the ragged mean (`fixed_mean`, slots sized
  for it) and equal to the cap (`fixed_cap`), each the median of `--repeats` interleaved
  rounds;
* the full-ring ceiling: the decode step at 32 slots over the ragged call's ring and over
  the fixed-mean call's (`full_ring_ceiling`), whose ratio bounds the first efficiency;
* the decode step at batch 16 against its byte floor: (t(96 new) - t(32 new)) / 64 of the
  engine on 80-160-token prompts, over (weights read per step + the live KV columns a step
  must read, on average) / the stream bandwidth (numpy copy of 512 MB) measured here;
  beside it the step's weight matmuls alone at batch 16, in XLA and in numpy, over the
  same floor (what the machine's GEMM rate at 16 rows leaves of it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
EOS = [2, 3, 4, 5, 6]
MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, vocab_size=320,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.02, eos_token_id=EOS)
QUICK = dict(MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
WORDS = "the a cat dog sun rain help why how what tell me about my day plan trip bike fix food".split()


def chats(n: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    return [[{"role": "user", "content": " ".join(rng.choice(WORDS, rng.randint(3, 12))) + "?"}]
            for _ in range(n)]


def call(model, prompts, cap, **kw):
    """(seconds, new tokens, compile summary) of one `pj.generate` call."""
    import persona_jax as pj
    from persona_jax.runtime.compile_count import counting
    t = time.perf_counter()
    with counting() as c:
        out = pj.generate(model, prompts, max_new_tokens=cap, temperature=1.0, seed=0, batch_size=32,
                          return_tokens=True, **kw)
    return time.perf_counter() - t, sum(map(len, out.tokens)), c.summary()


def child(args):
    """One fresh process: the first ragged call, then the same call again."""
    from persona_jax.runtime import compile_cache
    compile_cache.enable(args.cache)
    import persona_jax as pj
    model = pj.load_model(args.model)
    prompts = chats(args.requests)
    first = call(model, prompts, args.cap)
    second = call(model, prompts, args.cap)
    print(json.dumps({"first_s": first[0], "first_tokens": first[1], "first_compiles": first[2],
                      "warm_s": second[0], "warm_compiles": second[2]}))


def run_child(args, cache):
    cmd = [sys.executable, __file__, "--child", f"--model={args.model}", f"--cache={cache}",
           f"--requests={args.requests}", f"--cap={args.cap}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def timed(fns: dict, repeats: int) -> dict:
    """{name: (median seconds, result)}: a warm-up call each, then `repeats` interleaved rounds."""
    res = {k: f() for k, f in fns.items()}
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            res[k] = f()
            ts[k].append(time.perf_counter() - t)
    return {k: (float(np.median(v)), res[k]) for k, v in ts.items()}


def step_seconds(model, ids, short, long, repeats, **kw):
    """Seconds per decode step of the engine on `ids` (one slot per prompt, greedy, EOS
    suppressed): (t(long new) - t(short new)) / (long - short), medians of `timed`, so
    prefill and the fixed costs of a call cancel. kw goes to `generate_tokens`."""
    from persona_jax.runtime import apply, engine
    b = len(ids)

    def new(n):
        return engine.generate_tokens(model, ids, [n] * b, 0.0, 1.0, None, n, 0, [],
                                      apply.steering_sites(model.config), b, chunk=128, **kw)
    r = timed({"s": lambda: new(short), "l": lambda: new(long)}, repeats)
    return (r["l"][0] - r["s"][0]) / (long - short)


def full_ring_ceiling(model, prompts, mean, cap, repeats, slots=32):
    """The decode step at `slots` rows over the ragged call's ring (prompt bucket + cap)
    and over the fixed-mean call's (prompt bucket + mean, rounded up to 16), each from
    `step_seconds` between mean // 4 and 3x that many new tokens, on the first `slots`
    prompts. A step reads every column of its ring (the XLA:CPU dot has no per-row
    length), so their ratio bounds the ragged efficiency against the fixed-mean run of
    any scheduler on this path, with every slot busy and prefill free."""
    from persona_jax.runtime.generate import render_prompts, tokenize
    ids = tokenize(model, render_prompts(model, prompts[:slots]))
    n = max(4, mean // 4)
    step = {w: step_seconds(model, ids, n, 3 * n, repeats, max_new=w) for w in (mean, cap)}
    return {"slots": slots, "step_ms_mean_ring": step[mean] * 1e3, "step_ms_cap_ring": step[cap] * 1e3,
            "ceiling_vs_fixed_mean": step[mean] / step[cap]}


def stream_bandwidth() -> float:
    """Bytes/s of a numpy copy of 512 MB (read + write counted), best of 5."""
    a = np.ones(64 << 20, np.float64)
    b = np.empty_like(a)
    best = np.inf
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def decode_floor(model, repeats):
    """The engine's decode step at batch 16 against its byte floor."""
    import jax
    rng = np.random.RandomState(1)
    b, short, long = 16, 32, 96
    ids = [list(rng.randint(10, 120, size=rng.randint(80, 161))) for _ in range(b)]
    step = step_seconds(model, ids, short, long, repeats, prefill_batch=b)
    c = model.config
    item = np.dtype(model.dtype).itemsize
    weights = sum(x.nbytes for x in jax.tree.leaves(model.params["layers"]))
    weights += c.hidden_size * c.vocab_size * item  # the LM head (tied or not: read once per step)
    weights += b * c.hidden_size * item  # the embedding rows looked up
    # live KV columns of the steps between 32 and 96 new tokens, on average: prompt + ~64
    live = float(np.mean([len(s) for s in ids])) + (short + long) / 2
    kv = 2 * c.num_layers * b * c.num_kv_heads * c.head_dim * live * item
    bw = stream_bandwidth()
    floor = (weights + kv) / bw
    mm = matmul_floor(model, b, repeats)
    return {"step_ms": step * 1e3, "byte_floor_ms": floor * 1e3, "step_over_floor": step / floor,
            "weights_bytes": weights, "live_kv_bytes": kv, "stream_GBps": bw / 1e9,
            "matmuls_xla_ms": mm["xla"] * 1e3, "matmuls_numpy_ms": mm["numpy"] * 1e3,
            "matmuls_xla_over_floor": mm["xla"] / floor, "matmuls_numpy_over_floor": mm["numpy"] / floor}


def matmul_floor(model, b, repeats):
    """Seconds of the step's weight matmuls alone at batch b (every block's projections
    and the LM head, nothing else), in one jitted XLA program and in numpy (OpenBLAS),
    best of several: what a step costs on this machine before attention, sampling or any
    other op, at the GEMM rate these libraries reach for b rows."""
    import jax
    import jax.numpy as jnp
    from persona_jax.model.decoder import head_kernel
    mats = [np.asarray(x, np.float32) for x in jax.tree.leaves(model.params["layers"]) if np.ndim(x) == 3]
    ws = [m[l] for l in range(model.config.num_layers) for m in mats] + [
        np.asarray(head_kernel(model.config, model.params), np.float32)]
    xs = [np.random.RandomState(i).randn(b, w.shape[0]).astype(np.float32) for i, w in enumerate(ws)]
    jws, jxs = [jnp.asarray(w) for w in ws], [jnp.asarray(x) for x in xs]
    xla = jax.jit(lambda xs, ws: [jnp.dot(x, w) for x, w in zip(xs, ws)])
    fns = {"numpy": lambda: [np.dot(x, w) for x, w in zip(xs, ws)],
           "xla": lambda: jax.block_until_ready(xla(jxs, jws))}
    out = {}
    for name, f in fns.items():
        f()
        best = np.inf
        for _ in range(30 * max(1, repeats)):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        out[name] = best
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model", default="")
    ap.add_argument("--cache", default="")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--cap", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.requests, args.cap, args.repeats = 64, 64, 1
    import persona_jax as pj
    from persona_jax.testing import tiny_checkpoint
    out = {"machine": f"cpu x{os.cpu_count()}", "model": QUICK if args.quick else MODEL}
    with tempfile.TemporaryDirectory() as d:
        args.model = os.path.join(d, "model")
        tiny_checkpoint(args.model, "llama", seed=0, **out["model"])
        cache = os.path.join(d, "jax_cache")
        cold = run_child(args, cache)  # an empty persistent cache
        cached = run_child(args, cache)  # the cache the first child filled
        out["cold"] = {"first_s": cold["first_s"], "warm_s": cold["warm_s"],
                       "first_over_warm": cold["first_s"] / cold["warm_s"],
                       "first_programs": cold["first_compiles"]["programs"],
                       "first_by_name": cold["first_compiles"]["by_name"],
                       "warm_programs": cold["warm_compiles"]["programs"],
                       "cached_first_s": cached["first_s"], "cached_warm_s": cached["warm_s"],
                       "cached_first_over_warm": cached["first_s"] / cached["warm_s"],
                       "cached_first_loaded": cached["first_compiles"]["loaded"],
                       "cached_first_compiled": cached["first_compiles"]["compiled"]}
        print("cold:", json.dumps(out["cold"]), flush=True)

        model = pj.load_model(args.model)
        prompts = chats(args.requests)
        ragged = call(model, prompts, args.cap)
        mean = int(round(ragged[1] / args.requests))
        lengths_cap = ragged[1]
        r = timed({"ragged": lambda: call(model, prompts, args.cap)[1],
                   "fixed_mean": lambda: call(model, prompts, mean, min_new_tokens=mean)[1],
                   "fixed_cap": lambda: call(model, prompts, args.cap, min_new_tokens=args.cap)[1]}, args.repeats)
        tps = {k: v[1] / v[0] for k, v in r.items()}
        out["ragged"] = {"requests": args.requests, "cap": args.cap, "mean_new_tokens": lengths_cap / args.requests,
                         "tokens_per_s": tps, "seconds": {k: v[0] for k, v in r.items()},
                         "efficiency_vs_fixed_mean": tps["ragged"] / tps["fixed_mean"],
                         "efficiency_vs_fixed_cap": tps["ragged"] / tps["fixed_cap"]}
        out["ragged"]["full_ring"] = full_ring_ceiling(model, prompts, mean, args.cap, args.repeats)
        print("ragged:", json.dumps(out["ragged"]), flush=True)
        out["decode_b16"] = decode_floor(model, args.repeats)
        print("decode batch 16:", json.dumps(out["decode_b16"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
