"""Where capture's model-FLOPs utilisation goes at the Qwen2.5-7B shape (bf16, one GPU):
the model's projection matmuls alone (a scanned chain of q, k, v, o, gate, up, down over the
layers, 8192 tokens), one large dot, capture, and the plain forward (last hidden state only),
at batch x length 64 x 128 and 16 x 512. Prints a JSON dict of figures.

    python benchmarks/gpu_mfu_breakdown.py            # on the accelerator
    SMOKE=1 python benchmarks/gpu_mfu_breakdown.py    # tiny shapes (CPU), checks it runs

Set XLA_FLAGS to compare compiler options (e.g. --xla_gpu_enable_triton_gemm=false).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpu_bench import timed  # a sibling script: benchmarks/ is on sys.path when run
from persona_jax.runtime import apply
from persona_jax.runtime.capture import capture_arrays
from persona_jax.model.config import DecoderConfig

SMOKE = bool(os.environ.get("SMOKE"))
L, D, H, KV, F, V = (2, 64, 4, 2, 128, 512) if SMOKE else (28, 3584, 28, 4, 18944, 152064)
HD = D // H
PEAK = 989e12  # H100/H200 dense bf16
CHAIN_TOKENS = 64 if SMOKE else 8192


def main():
    res = {}
    key = jax.random.PRNGKey(0)
    mm_params = L * (D * D * 2 + D * HD * KV * 2 + 3 * D * F)

    # the projections alone, chained through the layers like the model's (a residual keeps
    # each layer dependent on the last); k/v outputs are padded to width D to feed o.
    n = CHAIN_TOKENS
    x = jax.random.normal(key, (n, D), jnp.bfloat16)
    shapes = ((L, D, D), (L, D, HD * KV), (L, D, HD * KV), (L, D, D), (L, D, F), (L, D, F), (L, F, D))
    ws = [jax.random.normal(key, s, jnp.bfloat16) * 0.01 for s in shapes]

    @jax.jit
    def chain(x, ws):
        def body(h, w):
            q, k, v, o, g, u, d = w
            pad = ((0, 0), (0, D - HD * KV))
            a = (h @ q) + jnp.pad(h @ k, pad) + jnp.pad(h @ v, pad)
            h = h + a @ o
            h = h + (jax.nn.silu(h @ g) * (h @ u)) @ d
            return h, None
        return jax.lax.scan(body, x, ws)[0]

    sec = timed(lambda: chain(x, ws), 5)
    res[f"matmuls only, {n} tokens"] = f"{2 * mm_params * n / sec / 1e12:.0f} TF/s = {100 * 2 * mm_params * n / sec / PEAK:.0f}%"
    a, b = jax.random.normal(key, (n, D), jnp.bfloat16), jax.random.normal(key, (D, F), jnp.bfloat16)
    sec = timed(jax.jit(lambda: a @ b), 5)
    res[f"one dot {n}x{D}x{F}"] = f"{2 * n * D * F / sec / 1e12:.0f} TF/s"
    del ws

    config = DecoderConfig(model_type="qwen2", vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L,
                           num_heads=H, num_kv_heads=KV, head_dim=HD, qkv_bias=True, rope_theta=1e6,
                           eos_token_ids=(1,), pad_token_id=0)
    params = jax.jit(lambda k: apply.init_params(config, k, jnp.bfloat16))(key)
    rng = np.random.default_rng(0)
    forward = jax.jit(lambda p, tok, m: apply.decoder_apply(
        config, p, tok, apply.make_ctx(m), capture="hidden", logits="none")[1][-1])
    for bsz, t in ((64, 128), (16, 512)):
        tok = jnp.asarray(rng.integers(2, V, (bsz, t)), jnp.int32)
        pl, tl = jnp.full((bsz,), t // 4, jnp.int32), jnp.full((bsz,), t, jnp.int32)
        flops = 2 * mm_params * bsz * t + bsz * L * 2 * H * HD * t * (t + 1)
        sec = timed(lambda: capture_arrays(config, params, tok, pl, tl), 5)
        res[f"capture {bsz}x{t}"] = f"{bsz * t / sec:,.0f} tok/s, MFU {100 * flops / sec / PEAK:.0f}%"
        m = jnp.ones((bsz, t), jnp.int32)
        sec = timed(lambda: forward(params, tok, m), 5)
        res[f"forward (last state only) {bsz}x{t}"] = f"{bsz * t / sec:,.0f} tok/s, MFU {100 * flops / sec / PEAK:.0f}%"
    print(os.environ.get("XLA_FLAGS", "default flags"), json.dumps(res, indent=1), flush=True)


if __name__ == "__main__":
    main()
