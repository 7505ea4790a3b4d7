"""Accelerator benchmark: a 7B-shaped (Qwen2.5-7B) random-weight model in bf16, persona_jax
and transformers side by side in one run. Prints a markdown table.

    python benchmarks/gpu_bench.py                      # Qwen2.5-7B shape (use benchmarks/gpu.sh)
    python benchmarks/gpu_bench.py --layers=2 --hidden=64 --heads=4 --kv=2 --ffn=128 --vocab=512 \
        --seq=64 --capture_batch=4 --decode_batch=4 --new_tokens=8 --ref_samples=2   # smoke run on CPU

Figures: init + compile time of capture; capture tokens/s (all L+1 states, three
reductions) vs the reference procedure (HF, one sample per forward with
output_hidden_states); capture model-FLOPs utilisation (2 x matmul params x tokens +
causal attention, over the chip's peak dense bf16); greedy decode tokens/s at the same
batch vs HF `generate`. Weights are random (nothing is downloaded); the two sides have
different random weights of the same shapes, which does not change the work done.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import transforms
from persona_jax.capture import capture_arrays
from persona_jax.generate import SamplingParams, generate_arrays
from persona_jax.models.config import DecoderConfig

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
                          ("prompt_len", 128), ("new_tokens", 128), ("ref_samples", 16), ("reps", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--no_torch", action="store_true", help="skip the transformers side")
    a = p.parse_args()

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    hd = a.hidden // a.heads
    config = DecoderConfig(model_type="qwen2", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                           num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv, head_dim=hd, qkv_bias=True,
                           rope_theta=1e6, eos_token_ids=(1,), pad_token_id=0)
    rows = []

    # init + compile
    t0 = time.perf_counter()
    params = jax.jit(lambda k: transforms.init_params(config, k, jnp.bfloat16))(jax.random.PRNGKey(0))
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
    rows.append(("init (random bf16 weights) + compile of capture", f"{t_init:.1f} s + {t_compile:.1f} s", "", "< 180 s"))

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

    rows.append(("capture tokens/s (all states, 3 reductions)", f"{tok_s:,.0f}",
                 f"{ref_tok_s:,.0f}" if ref_tok_s else "", f"{tok_s / ref_tok_s:.1f}x (>= 10x)" if ref_tok_s else ""))
    rows.append(("capture model-FLOPs utilisation", f"{100 * mfu:.0f}%" if peak else "n/a (unknown peak)", "", ">= 50%"))

    # greedy decode at batch decode_batch
    bd, pl_len, nt = a.decode_batch, a.prompt_len, a.new_tokens
    ptoks = jnp.asarray(rng.integers(2, a.vocab, (bd, pl_len)), jnp.int32)
    mask = jnp.ones((bd, pl_len), jnp.int32)
    sp = SamplingParams(max_new_tokens=nt, greedy=True, use_top_k=False, use_top_p=False, eos_ids=(1,), pad_id=0)
    keys = jax.random.split(jax.random.PRNGKey(0), bd)
    run = lambda: generate_arrays(config, params, ptoks, mask, keys, jnp.float32(0), jnp.int32(0), jnp.float32(1),
                                  jnp.int32(nt), sp=sp, cache_len=pl_len + nt)[0]
    dec_s = bd * nt / timed(run, a.reps)
    if not a.no_torch:
        pids = torch.as_tensor(np.asarray(ptoks), device=tdev)

        def hf_gen():
            with torch.no_grad():
                o = tm.generate(pids, attention_mask=torch.ones_like(pids), max_new_tokens=nt, min_new_tokens=nt,
                                do_sample=False, pad_token_id=0, eos_token_id=1)
            if tdev == "cuda":
                torch.cuda.synchronize()
            return o

        gen_hf = bd * nt / timed(hf_gen, 1, sync=lambda o: o)
    rows.append((f"greedy decode tokens/s, batch {bd}, {nt} new tokens", f"{dec_s:,.0f}",
                 f"{gen_hf:,.0f}" if gen_hf else "", f"{dec_s / gen_hf:.1f}x (>= 2x)" if gen_hf else ""))

    print(f"device: {kind}; jax {jax.__version__}; model: {a.layers} layers x {a.hidden} wide, "
          f"{(matmul_params + 2 * a.vocab * a.hidden) / 1e9:.2f}B params, bf16; capture batch {b} x {t}")
    print("| figure | persona_jax | transformers | ratio (target) |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
