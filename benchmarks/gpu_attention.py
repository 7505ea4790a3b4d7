"""Capture with the fused causal attention (`DecoderConfig.attention_impl="auto"`: cuDNN on a
GPU in bf16) vs the explicit einsum path, Qwen2.5-7B shape, random bf16 weights: tokens/s,
model-FLOPs utilisation and the largest relative difference of the three reductions.

    python benchmarks/gpu_attention.py            # on the accelerator
    SMOKE=1 python benchmarks/gpu_attention.py    # tiny shapes (CPU: `auto` is the einsum path there)
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpu_bench import timed  # a sibling script: benchmarks/ is on sys.path when run
from persona_jax.runtime import apply
from persona_jax.runtime.capture import capture_arrays
from persona_jax.model.config import DecoderConfig
from persona_jax.model.decoder import fused_attention_impl

SMOKE = bool(os.environ.get("SMOKE"))
L, D, H, KV, F, V = (2, 64, 4, 2, 128, 512) if SMOKE else (28, 3584, 28, 4, 18944, 152064)
SHAPES = ((4, 64), (2, 128)) if SMOKE else ((64, 128), (16, 512), (4, 2048))
PEAK = 989e12  # H100/H200 dense bf16


def main():
    hd = D // H
    base = DecoderConfig(model_type="qwen2", vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L,
                         num_heads=H, num_kv_heads=KV, head_dim=hd, qkv_bias=True, rope_theta=1e6,
                         eos_token_ids=(1,), pad_token_id=0, max_position_embeddings=8192)
    params = jax.jit(lambda k: apply.init_params(base, k, jnp.bfloat16))(jax.random.PRNGKey(0))
    mm_params = L * (D * hd * H * 2 + D * hd * KV * 2 + 3 * D * F)
    print(f"device {jax.devices()[0].device_kind}; auto -> {fused_attention_impl(base, jnp.bfloat16) or 'einsum'}")
    print("| batch x length | einsum tokens/s (MFU) | fused tokens/s (MFU) | speed-up | max relative difference |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for b, t in SHAPES:
        tokens = jnp.asarray(rng.integers(2, V, (b, t)), jnp.int32)
        total = jnp.asarray(rng.integers(t // 2, t + 1, b), jnp.int32).at[0].set(t)  # ragged: padding exercised
        prompt = total // 4
        flops = 2 * mm_params * b * t + b * L * 2 * H * hd * t * (t + 1)
        res = {}
        for impl in ("einsum", "auto"):
            cfg = dataclasses.replace(base, attention_impl=impl)
            res[impl] = (timed(lambda: capture_arrays(cfg, params, tokens, prompt, total), 3),
                         np.asarray(capture_arrays(cfg, params, tokens, prompt, total), np.float32))
        (se, ye), (sf, yf) = res["einsum"], res["auto"]
        rel = float(np.max(np.linalg.norm(yf - ye, axis=-1) / np.maximum(np.linalg.norm(ye, axis=-1), 1e-6)))
        print(f"| {b} x {t} | {b * t / se:,.0f} ({100 * flops / se / PEAK:.0f}%) | {b * t / sf:,.0f} "
              f"({100 * flops / sf / PEAK:.0f}%) | {se / sf:.2f}x | {rel:.2e} |", flush=True)


if __name__ == "__main__":
    main()
