"""One llama-like Flax Linen decoder for every supported family.

Blocks are stacked with `nn.scan` (params carry a leading [L] axis) so compile time does
not grow with depth. Interventions are not written here: they are interceptors around
`Block.__call__` (see `persona_jax/steering/interceptor.py`) that read per-layer slices of the
`interventions` collection, which is scanned with the layers.

Slots vs positions: a sequence lives in `S` cache slots (or `T` slots without a cache).
Causality is by slot index (padding keeps its slot), RoPE and sliding windows use the
token's real position, so left- or right-padded rows compute what unpadded rows do.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from persona_jax.model.config import DecoderConfig

_ACTS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, weight applied after casting back (as transformers does).

    offset: scale by (offset + weight) (Gemma: 1, weights initialised at 0).
    scale_f32: apply the weight to the float32 value, then cast back (Gemma, OLMo 2).
    """

    eps: float
    dtype: jnp.dtype
    offset: float = 0.0
    scale_f32: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        w = self.param("weight", init, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.scale_f32:
            return (xf * (self.offset + w.astype(jnp.float32))).astype(x.dtype)
        return (self.offset + w) * xf.astype(x.dtype) if self.offset else w * xf.astype(x.dtype)


def norm(c: DecoderConfig, dtype, name=None) -> RMSNorm:
    """The family's RMSNorm (offset and float32 scaling from the config)."""
    return RMSNorm(c.rms_norm_eps, dtype, c.norm_offset, c.norm_scale_f32, name=name)


def softcap(x, cap):
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); identity when cap is None."""
    return x if not cap else jnp.tanh(x / cap) * cap


def _dense(features, bias, dtype, name):
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


def rope(x, positions, inv_freq, attention_factor=1.0):
    """Rotary embedding, rotate-half convention, on the first 2 * len(inv_freq) features
    (the rest pass through: partial rotary).

    x: [B, T, heads, head_dim]; positions: [B, T] int; inv_freq: [rot // 2] or per row
    [B, rot // 2] float32; attention_factor multiplies cos and sin (longrope).
    """
    if inv_freq.ndim == 2:
        inv_freq = inv_freq[:, None, :]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = (jnp.cos(emb) * attention_factor).astype(x.dtype)[:, :, None, :]
    sin = (jnp.sin(emb) * attention_factor).astype(x.dtype)[:, :, None, :]
    rot = emb.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return out if rot == x.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


def layer_inv_freq(c: DecoderConfig, positions, window):
    """The inverse frequencies one layer uses in one call: [rot // 2], or per row [B, rot // 2].

    Sliding-window layers take the local rope when `rope_local_theta` is set (Gemma 3;
    `window` is the layer's traced window); `longrope` picks each row's short or long
    factors from its largest position in the call (see `DecoderConfig`).
    """
    inv = jnp.asarray(c.inv_freq())
    if c.rope_type == "longrope":
        long = positions.max(axis=1) + 1 > c.rope_original_max_position  # [B]
        inv = jnp.where(long[:, None], jnp.asarray(c.inv_freq("long"))[None], inv[None])
    if c.rope_local_theta is not None:
        inv = jnp.where(window > 0, jnp.asarray(c.inv_freq("local")), inv)
    return inv


def fused_attention_impl(c: DecoderConfig, dtype):
    """`jax.nn.dot_product_attention`'s implementation for a fused call, or None (einsum path)."""
    if c.attention_impl == "einsum" or any(c.layer_windows) or c.attn_logit_softcap:
        return None
    if c.attention_impl in ("xla", "cudnn"):
        return c.attention_impl
    ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and c.head_dim % 8 == 0 and c.head_dim <= 128)
    return "cudnn" if ok else None


class Attention(nn.Module):
    config: DecoderConfig
    dtype: jnp.dtype
    # the caller guarantees every row's real tokens come first (padding only at the end), so
    # cache-free calls may use a fused causal kernel (`DecoderConfig.attention_impl`)
    right_padded: bool = False

    @nn.compact
    def __call__(self, x, ctx, window, cache):
        c = self.config
        b, t, _ = x.shape
        q = _dense(c.num_heads * c.head_dim, c.qkv_bias, self.dtype, "q_proj")(x)
        k = _dense(c.num_kv_heads * c.head_dim, c.qkv_bias, self.dtype, "k_proj")(x)
        v = _dense(c.num_kv_heads * c.head_dim, c.qkv_bias, self.dtype, "v_proj")(x)
        if c.qk_norm and c.qk_norm_full:  # OLMo 2: over all heads' features at once
            q, k = norm(c, self.dtype, "q_norm")(q), norm(c, self.dtype, "k_norm")(k)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm and not c.qk_norm_full:
            q, k = norm(c, self.dtype, "q_norm")(q), norm(c, self.dtype, "k_norm")(k)
        inv_freq = layer_inv_freq(c, ctx["positions"], window)
        q = rope(q, ctx["positions"], inv_freq, c.rope_attention_factor)
        k = rope(k, ctx["positions"], inv_freq, c.rope_attention_factor)

        impl = fused_attention_impl(c, q.dtype) if cache is None and self.right_padded else None
        if impl is not None:
            # Every row's real tokens are a prefix, so causal masking alone gives the real
            # positions exactly what the explicit mask would (padded positions attend to
            # earlier padding too; nothing reads them).
            out = jax.nn.dot_product_attention(q, k, v, scale=c.attn_scale, is_causal=True,
                                               implementation=impl)
            out = out.reshape(b, t, c.num_heads * c.head_dim)
            return _dense(c.hidden_size, c.o_bias, self.dtype, "o_proj")(out), None

        if cache is not None:
            # cache layout (see `empty_cache`): k [B, KV, hd, S], v [B, KV, S, hd], so the
            # decode-step dots read the cache as it lies, without a transposed copy per step.
            idx = ctx["cache_index"]
            if "ring" in cache:  # the engine's decode step (runtime/engine.py): every row
                # writes column idx; kv_valid alone says what a row sees (no causality by slot)
                k_all, v_all, new_cache = _ring_cache_update(cache, idx, k, v)
                q_slots = jnp.full((t,), k_all.shape[-1])
            else:
                k_all = jax.lax.dynamic_update_slice(
                    cache["k"], jnp.transpose(k, (0, 2, 3, 1)).astype(cache["k"].dtype), (0, 0, 0, idx))
                v_all = jax.lax.dynamic_update_slice(
                    cache["v"], jnp.transpose(v, (0, 2, 1, 3)).astype(cache["v"].dtype), (0, 0, idx, 0))
                new_cache = {"k": k_all, "v": v_all}
                q_slots = idx + jnp.arange(t)
        else:  # the cache's layouts, so both paths run the same dots
            k_all, v_all, new_cache = jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)), None
            q_slots = jnp.arange(t)
        s = ctx["kv_valid"].shape[1]
        kv_slots = jnp.arange(s)

        # [B, T, S] allowed: causal by slot, key is a real token, inside the sliding window.
        allowed = (kv_slots[None, None, :] <= q_slots[None, :, None]) & ctx["kv_valid"][:, None, :]
        dist = ctx["positions"][:, :, None] - ctx["kv_pos"][:, None, :]
        allowed &= (window == 0) | (dist < window)

        if cache is None and t > 2 * CAUSAL_BLOCK:
            # causal by slot: a block of queries sees no key after its last slot, so each
            # block attends to its prefix only (skips the masked half of the scores)
            out = jnp.concatenate([
                _attend(c, q[:, i:i + CAUSAL_BLOCK], k_all[..., :i + CAUSAL_BLOCK], v_all[:, :, :i + CAUSAL_BLOCK],
                        allowed[:, i:i + CAUSAL_BLOCK, :i + CAUSAL_BLOCK])
                for i in range(0, t, CAUSAL_BLOCK)], axis=1)
        else:
            out = _attend(c, q, k_all, v_all, allowed)
        return _dense(c.hidden_size, c.o_bias, self.dtype, "o_proj")(out), new_cache


CAUSAL_BLOCK = 64  # query block of the cache-free causal attention (benchmarks/attention_cpu.py)


def _attend(c: DecoderConfig, q, k_all, v_all, allowed):
    """Attention of q [B, T, H, hd] over k_all [B, KV, hd, S], v_all [B, KV, S, hd] where
    allowed [B, T, S]; returns [B, T, H * hd]."""
    b, t, _, hd = q.shape
    kv, groups, s = c.num_kv_heads, c.num_heads // c.num_kv_heads, k_all.shape[-1]
    # queries as [B, KV, G*T, hd]: per (row, KV head) one plain [G*T, hd] x [hd, S] and
    # [G*T, S] x [S, hd] matmul. With T between the batch dimensions (an einsum
    # "btkgd,bkds->bkgts"), XLA on CPU ran these dots 2-5x slower.
    qm = jnp.transpose(q.reshape(b, t, kv, groups, hd), (0, 2, 3, 1, 4)).reshape(b, kv, groups * t, hd)
    scores = jnp.einsum("bkmd,bkds->bkms", qm, k_all.astype(q.dtype)).reshape(b, kv, groups, t, s)
    scores = softcap(scores * c.attn_scale, c.attn_logit_softcap).astype(jnp.float32)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kv, groups * t, s)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v_all.astype(q.dtype))
    return jnp.transpose(out.reshape(b, kv, groups, t, hd), (0, 3, 1, 2, 4)).reshape(b, t, c.num_heads * hd)


def _ring_cache_update(cache, idx, k, v):
    """The engine's decode-step cache write (runtime/engine.py): every row writes its new
    keys and values at column `idx` (a scalar, the same for every row) with one
    dynamic_update_slice, in place. The cache is one layer's ({k, v, ring}) or, with a
    "layer" entry (a traced layer index), the stacked [L, ...] cache of every layer
    (a loop over layers carries the whole cache and writes only the new column).
    Returns (this layer's keys [B, KV, hd, S], values [B, KV, S, hd], the new cache with
    the same entries)."""
    layer = cache.get("layer")
    kn = jnp.transpose(k, (0, 2, 3, 1)).astype(cache["k"].dtype)
    vn = jnp.transpose(v, (0, 2, 1, 3)).astype(cache["v"].dtype)
    if layer is None:
        kc = jax.lax.dynamic_update_slice(cache["k"], kn, (0, 0, 0, idx))
        vc = jax.lax.dynamic_update_slice(cache["v"], vn, (0, 0, idx, 0))
        return kc, vc, {**cache, "k": kc, "v": vc}
    kc = jax.lax.dynamic_update_slice(cache["k"], kn[None], (layer, 0, 0, 0, idx))
    vc = jax.lax.dynamic_update_slice(cache["v"], vn[None], (layer, 0, 0, idx, 0))
    return kc[layer], vc[layer], {**cache, "k": kc, "v": vc}


def empty_cache(config: DecoderConfig, batch: int, length: int, dtype) -> dict:
    """A zero KV cache for `length` slots: k [L, B, KV, hd, S], v [L, B, KV, S, hd]."""
    c = config
    return {"k": jnp.zeros((c.num_layers, batch, c.num_kv_heads, c.head_dim, length), dtype),
            "v": jnp.zeros((c.num_layers, batch, c.num_kv_heads, length, c.head_dim), dtype)}


class XIELU(nn.Module):
    """Apertus' xIELU activation: alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n);
    alpha_p x^2 + beta x for x > 0, (expm1(min(x, eps)) - x) alpha_n + beta x otherwise.
    a_p, a_n are learned ([1] each, as transformers stores them); beta, eps are fixed."""

    dtype: jnp.dtype
    beta: float = 0.5
    eps: float = -1e-6

    @nn.compact
    def __call__(self, x):
        a_p = self.param("alpha_p", nn.initializers.constant(float(np.log(np.expm1(0.8)))), (1,), self.dtype)
        a_n = self.param("alpha_n", nn.initializers.constant(float(np.log(np.expm1(0.8 - self.beta)))), (1,),
                         self.dtype)
        alpha_p, alpha_n = jax.nn.softplus(a_p), self.beta + jax.nn.softplus(a_n)
        return jnp.where(x > 0, alpha_p * x * x + self.beta * x,
                         (jnp.expm1(jnp.minimum(x, self.eps)) - x) * alpha_n + self.beta * x).astype(x.dtype)


class MLP(nn.Module):
    config: DecoderConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = XIELU(self.dtype, name="act_fn") if c.hidden_act == "xielu" else _ACTS[c.hidden_act]
        up = _dense(c.intermediate_size, c.mlp_bias, self.dtype, "up_proj")(x)
        if not c.mlp_gated:
            return _dense(c.hidden_size, c.mlp_bias, self.dtype, "down_proj")(act(up))
        gate = _dense(c.intermediate_size, c.mlp_bias, self.dtype, "gate_proj")(x)
        return _dense(c.hidden_size, c.mlp_bias, self.dtype, "down_proj")(act(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder block; `__call__` is what interceptors wrap.

    Args (per scan step):
      h: [B, T, D] residual stream (the scan carry).
      layer_in: dict with `window` (scalar int) and optionally `cache` {k: [B, KV, hd, S], v: [B, KV, S, hd]}.
      ctx: dict broadcast to every layer: positions [B, T], kv_valid [B, S] bool,
        kv_pos [B, S], cache_index scalar.
    Returns (h_out, new_cache or None).
    """

    config: DecoderConfig
    dtype: jnp.dtype
    right_padded: bool = False  # see Attention

    @nn.compact
    def __call__(self, h, layer_in, ctx):
        c = self.config
        where = c.norm_placement  # pre (Llama), sandwich (Gemma), post (OLMo 2)
        # Apertus names its two pre-norms after what they feed
        first, second = (("attention_layernorm", "feedforward_layernorm") if c.model_type == "apertus"
                         else ("input_layernorm", "post_attention_layernorm"))
        x = h if where == "post" else norm(c, self.dtype, first)(h)
        a, new_cache = Attention(c, self.dtype, self.right_padded, name="self_attn")(
            x, ctx, layer_in["window"], layer_in.get("cache"))
        h = h + (a if where == "pre" else norm(c, self.dtype, "post_attention_layernorm")(a))
        pre_mlp = second if where == "pre" else "pre_feedforward_layernorm"
        x = h if where == "post" else norm(c, self.dtype, pre_mlp)(h)
        m = MLP(c, self.dtype, name="mlp")(x)
        h = h + (m if where == "pre" else norm(c, self.dtype, "post_feedforward_layernorm")(m))
        return h, new_cache


def scale_embedding(c: DecoderConfig, h):
    """Gemma's sqrt(hidden) factor, rounded to the model dtype first (as transformers does)."""
    if c.embed_scale is None:
        return h
    return h * jnp.asarray(np.float32(c.embed_scale)).astype(h.dtype)


class Embedding(nn.Module):
    """Token embedding; `__call__` is wrapped by interceptors as hidden state 0."""

    config: DecoderConfig
    dtype: jnp.dtype

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                    (self.config.vocab_size, self.config.hidden_size), self.dtype)

    def __call__(self, tokens, ctx):
        del ctx  # read by interceptors (intervention position masks, readout weights)
        return scale_embedding(self.config, jnp.take(self.embedding, tokens, axis=0))

    def head_kernel(self):
        """The tied LM head's [D, V] weight."""
        return self.embedding.T


class _Weight(nn.Module):
    """One bare parameter named `kernel` (the untied LM head, [D, V])."""

    shape: tuple
    dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.normal(0.02), self.shape, self.dtype)


def head_kernel(c: DecoderConfig, params):
    """The LM head's [D, V] weight in a param tree (the embedding's transpose when tied)."""
    return params["embed_tokens"]["embedding"].T if c.tie_word_embeddings else params["lm_head"]["kernel"]


def lm_logits(c: DecoderConfig, h, kernel):
    """h [..., D] after the final norm -> float32 logits [..., V]: h @ kernel, then the
    final-logit soft-cap. The one definition for `Decoder` and the per-layer decode step."""
    return softcap((h @ kernel).astype(jnp.float32), c.final_logit_softcap)


class Decoder(nn.Module):
    """The whole model. Hidden state l (HF `output_hidden_states` index) is the output of
    `Embedding` for l = 0 and of block l-1 otherwise; the last one is additionally passed
    through the final norm by the caller's readout (the HF quirk; see steering/interceptor.py).

    __call__(tokens [B, T], ctx, cache=None, logits="all") ->
      (logits [B, T, V] float32 ("all"), [B, 1, V] ("last") or None ("none"),
       h_final [B, T, D] after the final norm,
       new_cache (the same layout as `cache`) or None)
    """

    config: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # recompute block activations in the backward pass (training memory)
    right_padded: bool = False  # see Attention
    # the layer scan unrolled into straight-line code (the same stacked params): on CPU a
    # training step's backward pass through the rolled loop copies each layer's residuals
    # (benchmarks/train_step.py); rolled, a deep model compiles one block
    unroll_layers: bool = False

    @nn.compact
    def __call__(self, tokens, ctx, cache=None, logits: Literal["all", "last", "none"] = "all"):
        c = self.config
        embed = Embedding(c, self.dtype, name="embed_tokens")
        h = embed(tokens, ctx)
        layer_in = {"window": jnp.asarray(c.layer_windows, jnp.int32)}
        if cache is not None:
            layer_in["cache"] = cache
        block = nn.remat(Block, prevent_cse=False) if self.remat else Block
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0, "interventions": 0},
            variable_broadcast=False,
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=c.num_layers,
            unroll=c.num_layers if self.unroll_layers else 1,
        )(c, self.dtype, self.right_padded, name="layers")
        h, new_cache = blocks(h, layer_in, ctx)
        h = norm(c, self.dtype, "norm")(h)
        h_final = h
        out = None
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none'; got {logits!r}")
        if logits == "last":  # sampling needs only the last position's logits
            h = h[:, -1:]
        if logits != "none":
            kernel = (embed.head_kernel() if c.tie_word_embeddings
                      else _Weight((c.hidden_size, c.vocab_size), self.dtype, name="lm_head")())
            out = lm_logits(c, h, kernel)
        return out, h_final, new_cache


def make_ctx(attention_mask, positions=None, cache_index=0, kv_valid=None, kv_pos=None):
    """Per-call context broadcast to every block.

    attention_mask: [B, T] (1 = real token, 0 = padding). positions default to the count
    of real tokens before each slot, so padded rows get the positions of unpadded ones.
    kv_valid/kv_pos [B, S] default to the mask/positions themselves (no cache).
    """
    mask = jnp.asarray(attention_mask).astype(bool)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    ctx = {
        "positions": positions.astype(jnp.int32),
        "kv_valid": mask if kv_valid is None else kv_valid.astype(bool),
        "kv_pos": positions.astype(jnp.int32) if kv_pos is None else kv_pos.astype(jnp.int32),
        "cache_index": jnp.asarray(cache_index, jnp.int32),
    }
    return ctx


def prefill_ctx(mask, cache_len: int):
    """Context of a left-padded prompt prefill into an empty cache of `cache_len` slots.

    mask: [B, P] (1 = real token). Prompt slots get their real positions; the slots after
    the prompt get the positions the following tokens will have (n_prompt, n_prompt + 1, ...).
    Returns (ctx, n_prompt [B], kv_pos [B, cache_len]); decode steps reuse kv_pos.
    """
    b, p = mask.shape
    n_prompt = mask.sum(axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    kv_valid = jnp.zeros((b, cache_len), bool).at[:, :p].set(mask.astype(bool))
    kv_pos = jnp.concatenate(
        [positions, n_prompt[:, None] + jnp.arange(cache_len - p)[None]], axis=1).astype(jnp.int32)
    return make_ctx(mask, positions=positions, kv_valid=kv_valid, kv_pos=kv_pos), n_prompt, kv_pos


def init_params(config: DecoderConfig, rng, dtype=jnp.float32):
    """Random params (normal(0.02) kernels, unit norms): for training from scratch."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    ctx = make_ctx(jnp.ones((1, 1), jnp.int32))
    return Decoder(config, dtype).init(rng, tokens, ctx)["params"]


def param_shapes(config: DecoderConfig, dtype=jnp.float32):
    """ShapeDtypeStruct pytree of the params, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), dtype))
