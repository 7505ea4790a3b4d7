"""Accelerator benchmark: a 7B-shaped (Qwen2.5-7B) random-weight model in bf16, persona_jax
and transformers side by side in one run. Prints a markdown table.

    python benchmarks/gpu_bench.py                      # Qwen2.5-7B shape (use benchmarks/gpu.sh)
    python benchmarks/gpu_bench.py --layers=2 --hidden=64 --heads=4 --kv=2 --ffn=128 --vocab=512 \
        --seq=64 --capture_batch=4 --decode_batch=4 --new_tokens=8 --ref_samples=2   # smoke run on CPU

Figures: init + compile time of capture; capture tokens/s (all L+1 states, three
reductions) vs the reference procedure (HF, one sample per forward with
output_hidden_states); capture model-FLOPs utilisation (2 x matmul params x tokens +
causal attention, over the chip's peak dense bf16); greedy decode tokens/s at the same
batch vs HF `generate`; then, while the time budget lasts, steered greedy decode (a
per-row coefficient at the middle layer, HF with a forward hook) and sampled decode;
the continuous-batching engine at 64 and 256 slots on issue 19's ragged workload scaled
to a 1,000-token cap, with its share of the HBM roofline (`engine_rows`); peak device
memory of each side. Rows print as they are measured, so a run cut short
still reports what it finished. Weights are random (nothing is downloaded); the two sides have
different random weights of the same shapes, which does not change the work done.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.runtime import apply
from persona_jax.runtime.capture import capture_arrays
from persona_jax.runtime.generate import SamplingParams, generate_arrays
from persona_jax.model.config import DecoderConfig
from persona_jax.steering.spec import Steering, position_masks, steering_arrays

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def timed(fn, reps, sync=jax.block_until_ready):
    """Seconds per call after one warm-up call (which compiles)."""
    sync(fn())
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    sync(out)
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser()
    for name, default in (("layers", 28), ("hidden", 3584), ("heads", 28), ("kv", 4), ("ffn", 18944),
                          ("vocab", 152064), ("seq", 512), ("capture_batch", 16), ("decode_batch", 64),
                          ("prompt_len", 128), ("new_tokens", 128), ("ref_samples", 16), ("reps", 3),
                          ("budget_s", 300)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--no_torch", action="store_true", help="skip the transformers side")
    p.add_argument("--engine_slots", default="64,256", help="decode slots of the engine rows (comma separated)")
    p.add_argument("--engine_cap", type=int, default=1000, help="token cap of the ragged workload")
    p.add_argument("--engine_requests_per_slot", type=int, default=2)
    p.add_argument("--engine_loops", default="scan,unrolled", help="engine layer loops to measure (the first at "
                   "every slot count, the others at the first slot count)")
    p.add_argument("--hbm_tb_s", type=float, default=0.0, help="HBM bandwidth, TB/s (default: from the device name)")
    a = p.parse_args()

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    hd = a.hidden // a.heads
    config = DecoderConfig(model_type="qwen2", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                           num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv, head_dim=hd, qkv_bias=True,
                           rope_theta=1e6, eos_token_ids=(1,), pad_token_id=0)
    rows = []
    start = time.perf_counter()

    def row(*r):
        rows.append(r)
        print("| " + " | ".join(r) + " |", flush=True)

    # init + compile
    t0 = time.perf_counter()
    params = jax.jit(lambda k: apply.init_params(config, k, jnp.bfloat16))(jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    t_init = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    b, t = a.capture_batch, a.seq
    tokens = jnp.asarray(rng.integers(2, a.vocab, (b, t)), jnp.int32)
    pl = jnp.full((b,), t // 4, jnp.int32)
    tl = jnp.full((b,), t, jnp.int32)
    t0 = time.perf_counter()
    compiled = capture_arrays.lower(config, params, tokens, pl, tl).compile()
    t_compile = time.perf_counter() - t0
    row("init (random bf16 weights) + compile of capture", f"{t_init:.1f} s + {t_compile:.1f} s", "", "< 180 s")

    # capture throughput and MFU
    sec = timed(lambda: compiled(params, tokens, pl, tl), a.reps)
    tok_s = b * t / sec
    matmul_params = a.layers * (a.hidden * hd * (a.heads * 2) + a.hidden * hd * a.kv * 2 + 3 * a.hidden * a.ffn)
    flops = 2 * matmul_params * b * t + b * a.layers * 2 * a.heads * hd * t * (t + 1)
    mfu = flops / sec / (peak * 1e12) if peak else float("nan")

    ref_tok_s = gen_hf = None
    if not a.no_torch:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        tdev = "cuda" if torch.cuda.is_available() else "cpu"
        del compiled
        hf_cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                             num_attention_heads=a.heads, num_key_value_heads=a.kv, max_position_embeddings=8192)
        with torch.device(tdev):
            tm = Qwen2ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
        ids = torch.as_tensor(np.asarray(tokens), device=tdev)

        def ref():  # the reference procedure: one sample per forward, reductions in torch
            out = []
            with torch.no_grad():
                for i in range(min(a.ref_samples, b)):
                    hs = torch.stack(tm(ids[i:i + 1], output_hidden_states=True).hidden_states)[:, 0].float()
                    k = t // 4
                    out.append((hs[:, :k].mean(1), hs[:, k - 1], hs[:, k:].mean(1)))
            if tdev == "cuda":
                torch.cuda.synchronize()
            return out

        ref_tok_s = min(a.ref_samples, b) * t / timed(ref, 1, sync=lambda o: o)

    row("capture tokens/s (all states, 3 reductions)", f"{tok_s:,.0f}",
        f"{ref_tok_s:,.0f}" if ref_tok_s else "", f"{tok_s / ref_tok_s:.1f}x (>= 10x)" if ref_tok_s else "")
    row("capture model-FLOPs utilisation", f"{100 * mfu:.0f}%" if peak else "n/a (unknown peak)", "", ">= 50%")

    # decode at batch decode_batch: greedy, then (time permitting) steered and sampled
    bd, pl_len, nt = a.decode_batch, a.prompt_len, a.new_tokens
    ptoks = jnp.asarray(rng.integers(2, a.vocab, (bd, pl_len)), jnp.int32)
    mask = jnp.ones((bd, pl_len), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), bd)
    layer = a.layers // 2
    vec = (rng.standard_normal((a.layers + 1, a.hidden)) / np.sqrt(a.hidden)).astype(np.float32)
    coefs = np.linspace(-4, 4, bd).astype(np.float32)

    def ours(greedy, steer):
        sp = SamplingParams(max_new_tokens=nt, greedy=greedy, use_top_k=False, use_top_p=not greedy,
                            eos_ids=(1,), pad_id=0)
        extra = ()
        if steer:
            s = [Steering(vec, layer=layer, coef=list(coefs), positions="all")]
            extra = (steering_arrays(s, a.layers, a.hidden, np.arange(bd), bd),
                     position_masks(s, "prefill", np.ones((bd, pl_len), np.int32)),
                     position_masks(s, "decode", np.ones((bd, 1), np.int32)))
        return lambda: generate_arrays(config, params, ptoks, mask, keys, jnp.float32(0 if greedy else 1),
                                       jnp.int32(0), jnp.float32(0.9), jnp.int32(nt), *extra, sp=sp,
                                       cache_len=pl_len + nt)[0]

    def theirs(greedy, steer):
        pids = torch.as_tensor(np.asarray(ptoks), device=tdev)
        c = torch.as_tensor(coefs, device=tdev, dtype=torch.bfloat16).view(-1, 1, 1)
        v = torch.as_tensor(vec[layer], device=tdev, dtype=torch.bfloat16)

        def hook(module, args, out):  # vec[l] is added to block l's output (METHOD.md layer convention)
            return (out[0] + c * v,) + tuple(out[1:]) if isinstance(out, tuple) else out + c * v

        def run():
            handles = [tm.model.layers[layer - 1].register_forward_hook(hook)] if steer else []
            try:
                with torch.no_grad():
                    o = tm.generate(pids, attention_mask=torch.ones_like(pids), max_new_tokens=nt,
                                    min_new_tokens=nt, do_sample=not greedy, top_p=0.9, top_k=0,
                                    temperature=1.0, pad_token_id=0, eos_token_id=1)
            finally:
                for h in handles:
                    h.remove()
            if tdev == "cuda":
                torch.cuda.synchronize()
            return o
        return run

    cases = (("greedy", True, False, ">= 2x"), ("greedy + steering (per-row coef)", True, True, ""),
             ("sampled (T=1, top-p 0.9)", False, False, ""))
    for n, (name, greedy, steer, target) in enumerate(cases):
        if n and time.perf_counter() - start > a.budget_s:
            print(f"(skipped {name}: past the {a.budget_s} s budget)", flush=True)
            continue
        t0 = time.perf_counter()
        dec_s = bd * nt / timed(ours(greedy, steer), a.reps)
        t_first = time.perf_counter() - t0
        hf_s = None if a.no_torch else bd * nt / timed(theirs(greedy, steer), 1, sync=lambda o: o)
        ratio = f"{dec_s / hf_s:.1f}x" if hf_s else ""
        row(f"{name} decode tokens/s, batch {bd}, {nt} new (compile + runs {t_first:.0f} s)", f"{dec_s:,.0f}",
            f"{hf_s:,.0f}" if hf_s else "", f"{ratio} ({target})" if target and ratio else ratio)

    engine_rows(a, config, params, kind, row, start)

    stats = getattr(dev, "memory_stats", lambda: None)() or {}
    hf_peak = torch.cuda.max_memory_allocated() / 2**30 if not a.no_torch and tdev == "cuda" else None
    pbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)) / 2**30
    row(f"peak device memory (weights {pbytes:.1f} GiB)",
        f"{stats['peak_bytes_in_use'] / 2**30:.1f} GiB" if "peak_bytes_in_use" in stats else "n/a",
        f"{hf_peak:.1f} GiB" if hf_peak else "", "")

    print(f"\ndevice: {kind}; jax {jax.__version__}; model: {a.layers} layers x {a.hidden} wide, "
          f"{(matmul_params + 2 * a.vocab * a.hidden) / 1e9:.2f}B params, bf16; capture batch {b} x {t}; "
          f"total {time.perf_counter() - start:.0f} s")
    print("| figure | persona_jax | transformers | ratio (target) |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


HBM_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def engine_rows(a, config, params, kind, row, start):
    """Decode tokens/s of the continuous-batching engine on the ragged workload of issue 19
    scaled to a `engine_cap`-token cap (1 + Exp(cap / 4) new tokens, capped; 128-token
    prompts), sampled at T=1, and the share of the HBM roofline: the bytes one decode step
    must read (block weights + LM head + the whole dense KV cache, which the attention
    reads at every step) over the measured time per step (decode steps counted on device)."""
    from persona_jax.runtime import engine
    from persona_jax.runtime.batching import bucket
    hbm = a.hbm_tb_s or next((v for k, v in HBM_TB_S.items() if k in kind), 0.0)
    loops = a.engine_loops.split(",")
    rng = np.random.default_rng(1)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) - params["embed_tokens"]["embedding"].nbytes
    if config.tie_word_embeddings:
        weight_bytes += params["embed_tokens"]["embedding"].nbytes
    for i, slots in enumerate(int(x) for x in a.engine_slots.split(",")):
        for loop in loops if i == 0 else loops[:1]:
            if time.perf_counter() - start > a.budget_s:
                print(f"(skipped engine {slots} slots {loop}: past the {a.budget_s} s budget)", flush=True)
                continue
            n = slots * a.engine_requests_per_slot
            limits = np.minimum(a.engine_cap, 1 + np.floor(rng.exponential(a.engine_cap / 4, n))).astype(int)
            prompts = rng.integers(2, a.vocab, (n, a.prompt_len))
            max_new = -(-a.engine_cap // 16) * 16
            spec = engine.EngineSpec(slots=slots, cache_len=bucket(a.prompt_len) + max_new, max_new=max_new,
                                     greedy=False, use_top_k=False, use_top_p=False, eos_ids=(1,), pad_id=0,
                                     layer_loop=loop)
            reqs = [engine.Request(prompts[j].tolist(), j, int(limits[j]), int(limits[j]), 1.0) for j in range(n)]
            eng = engine.Engine(config, params, spec, seed=0, prefill_batch=min(slots, 16))
            eng.run(reqs[: max(slots // 4, 1)])  # compile (insert, decode) on a short run
            kv = engine.state_bytes(eng.state)
            t0 = time.perf_counter()
            steps0 = int(eng.state["t"])
            out = eng.run(reqs)
            sec = time.perf_counter() - t0
            steps = int(eng.state["t"]) - steps0
            useful = sum(map(len, out.values()))
            share = (weight_bytes + kv["kv"]) / (sec / steps) / (hbm * 1e12) if hbm else float("nan")
            row(f"engine decode tokens/s, {slots} slots ({loop}), ragged to {a.engine_cap} "
                f"(mean {limits.mean():.0f}), T=1", f"{useful / sec:,.0f}", "",
                f"HBM roofline {100 * share:.0f}% ({(weight_bytes + kv['kv']) / 1e9:.1f} GB/step, "
                f"{1e3 * sec / steps:.1f} ms/step; KV {kv['kv'] / 1e9:.1f} GB)" if hbm else
                f"{(weight_bytes + kv['kv']) / 1e9:.3f} GB/step, {1e3 * sec / steps:.1f} ms/step")
            del eng


if __name__ == "__main__":
    main()
