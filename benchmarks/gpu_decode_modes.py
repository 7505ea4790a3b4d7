"""Decode with unrolled per-layer weight buffers (`generate.decode_step`, the default) vs the
scanned decoder (`generate_arrays(..., scan_decode=True)`): tokens/s, compile time, peak
device memory and token agreement, each mode in its own process (peak memory is per process).

    python benchmarks/gpu_decode_modes.py                  # Qwen2.5-7B shape, bf16, random weights
    python benchmarks/gpu_decode_modes.py --layers=2 --hidden=64 --heads=4 --kv=2 --ffn=128 \
        --vocab=512 --decode_batch=4 --new_tokens=8      # smoke run on CPU
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SHAPE = (("layers", 28), ("hidden", 3584), ("heads", 28), ("kv", 4), ("ffn", 18944), ("vocab", 152064),
         ("decode_batch", 64), ("prompt_len", 128), ("new_tokens", 128), ("reps", 3))


def one(a):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from persona_jax.runtime import apply
    from persona_jax.runtime.generate import SamplingParams, generate_arrays
    from persona_jax.model.config import DecoderConfig

    config = DecoderConfig(model_type="qwen2", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                           num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv, head_dim=a.hidden // a.heads,
                           qkv_bias=True, rope_theta=1e6, eos_token_ids=(1,), pad_token_id=0)
    params = jax.jit(lambda k: apply.init_params(config, k, jnp.bfloat16))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    b, p, nt = a.decode_batch, a.prompt_len, a.new_tokens
    tokens = jnp.asarray(rng.integers(2, a.vocab, (b, p)), jnp.int32)
    mask = jnp.ones((b, p), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), b)
    sp = SamplingParams(max_new_tokens=nt, greedy=True, use_top_k=False, use_top_p=False, eos_ids=(1,), pad_id=0)
    run = lambda: generate_arrays(config, params, tokens, mask, keys, jnp.float32(0), jnp.int32(0), jnp.float32(1),
                                  jnp.int32(nt), sp=sp, cache_len=p + nt, scan_decode=a.mode == "scanned")[0]
    t0 = time.perf_counter()
    out = jax.block_until_ready(run())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.reps):
        o = run()
    jax.block_until_ready(o)
    sec = (time.perf_counter() - t0) / a.reps
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    np.save(a.tokens_out, np.asarray(out))
    print(json.dumps(dict(tok_s=b * nt / sec, first_call_s=first, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                          weights_gib=sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)) / 2**30)))


def main():
    ap = argparse.ArgumentParser()
    for name, default in SHAPE:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--mode", choices=("unrolled", "scanned"))
    ap.add_argument("--tokens_out")
    a, rest = ap.parse_known_args()
    if a.mode:
        return one(a)
    import numpy as np
    res, toks = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for mode in ("unrolled", "scanned"):
            path = os.path.join(d, f"{mode}.npy")
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], f"--mode={mode}", f"--tokens_out={path}"],
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(f"{mode} failed")
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            toks[mode] = np.load(path)
    same = float(np.mean(toks["unrolled"] == toks["scanned"]))
    print(f"greedy decode, batch {a.decode_batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens; "
          f"weights {res['unrolled']['weights_gib']:.1f} GiB; same tokens {same:.1%}")
    print("| decode | tokens/s | first call (compile + run) | peak device memory |")
    print("|---|---|---|---|")
    for mode, r in res.items():
        print(f"| {mode} | {r['tok_s']:,.0f} | {r['first_call_s']:.1f} s | {r['peak_gib']:.1f} GiB |")


if __name__ == "__main__":
    main()
