"""Which bf16 capture is closer to float32: the einsum attention path or the fused kernel
(`attention_impl="auto"`, cuDNN on a GPU)? Qwen2.5-7B shape, random weights, ragged
right-padded batches; relative error per [L+1, D] readout vector against the float32
einsum capture of the same weights.

    python benchmarks/gpu_attention_accuracy.py           # on the accelerator (about 30 s)
    SMOKE=1 python benchmarks/gpu_attention_accuracy.py   # tiny shapes (CPU)
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.runtime import apply
from persona_jax.runtime.capture import capture_arrays
from persona_jax.model.config import DecoderConfig
S = bool(os.environ.get("SMOKE"))
L, D, H, KV, F, V = (2, 64, 4, 2, 128, 512) if S else (28, 3584, 28, 4, 18944, 152064)
base = DecoderConfig(model_type="qwen2", vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H,
                     num_kv_heads=KV, head_dim=D // H, qkv_bias=True, rope_theta=1e6, eos_token_ids=(1,), pad_token_id=0)
p32 = jax.jit(lambda k: apply.init_params(base, k, jnp.float32))(jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
for b, t in ((4, 128), (2, 256)) if S else ((16, 512), (4, 2048)):
    tok = jnp.asarray(rng.integers(2, V, (b, t)), jnp.int32)
    tot = jnp.asarray(rng.integers(t // 2, t + 1, b), jnp.int32); pl = tot // 4
    ref = np.asarray(capture_arrays(dataclasses.replace(base, attention_impl="einsum"), p32, tok, pl, tot), np.float64)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    out = {}
    for impl in ("einsum", "auto"):
        y = np.asarray(capture_arrays(dataclasses.replace(base, attention_impl=impl), p16, tok, pl, tot), np.float64)
        rel = np.linalg.norm(y - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        out[impl] = f"median {np.median(rel):.2e} max {rel.max():.2e}"
    print(f"{b}x{t}: bf16 vs float32 relative error per vector: einsum {out['einsum']}; fused {out['auto']}", flush=True)
