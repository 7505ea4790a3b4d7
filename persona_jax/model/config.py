"""The one config that describes every llama-like decoder we support.

Each family converter (`families.py`) maps a Hugging Face `config.json` onto these
fields; the decoder (`decoder.py`) reads only this dataclass, never an HF config.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a llama-like decoder.

    Attributes:
      model_type: the HF family this came from (`llama`, `mistral`, `qwen2`, `qwen3`,
        `gemma2`, `gemma3_text` (also for the language model of `gemma3` checkpoints),
        `olmo2`, `olmo3`, `apertus`, `phi3`).
      vocab_size: rows of the token embedding.
      hidden_size: residual stream width D.
      intermediate_size: gated-MLP hidden width F.
      num_layers: decoder blocks L (hidden states come back as L+1 entries).
      num_heads: query heads H.
      num_kv_heads: key/value heads (GQA when < num_heads).
      head_dim: per-head width (Qwen3 sets it explicitly; may differ from D/H).
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base.
      rope_type: `default`, `linear`, `llama3` or `longrope` (inverse frequencies as in
        transformers). Gemma 3 applies it to global layers only (see rope_local_theta).
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position:
        scaling parameters of `linear` / `llama3`; `longrope` reads rope_original_max_position.
      rope_short_factor, rope_long_factor: `longrope` (Phi-3 128k, older configs call it
        `su`): per-frequency divisors of the inverse frequencies. A row of a call uses the
        long ones when its largest position + 1 exceeds rope_original_max_position, else
        the short ones (transformers decides per call over the whole batch; we decide per
        row, so results do not depend on batching; for one row they are the same).
      rope_attention_factor: multiplies RoPE's cos and sin (`longrope`: sqrt(1 + ln(s) /
        ln(original max)) for s = max_position_embeddings / original max, unless given).
      rope_local_theta: RoPE base of the sliding-window layers, which then use unscaled
        default RoPE (Gemma 3's `rope_local_base_freq`); None = every layer uses the rope above.
      rotary_dim: leading features of each head that RoPE rotates (Phi-3's
        `partial_rotary_factor` x head_dim); None = all of head_dim.
      qkv_bias: q/k/v projections have a bias (Qwen2, Llama with attention_bias).
      o_bias: the output projection has a bias (Llama/Qwen3 with attention_bias).
      mlp_bias: gate/up/down projections have biases (Llama mlp_bias).
      qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3).
      qk_norm_full: RMSNorm over the whole q and k projection outputs ([H * hd] and
        [KV * hd] features, OLMo 2) instead of per head; needs qk_norm.
      norm_offset: every RMSNorm scales by (norm_offset + weight): 1 for Gemma (weights
        stored around 0), 0 otherwise.
      norm_scale_f32: the RMSNorm weight multiplies the float32 normalised value before the
        cast back to the model dtype (Gemma, OLMo 2); False = after the cast (Llama).
      norm_placement: `pre` (Llama: `input_layernorm` before attention,
        `post_attention_layernorm` before the MLP); `sandwich` (Gemma 2/3: `input_layernorm`
        and `post_attention_layernorm` before and after attention, `pre_feedforward_layernorm`
        and `post_feedforward_layernorm` before and after the MLP, both post-norms on the
        sublayer output before the residual add); `post` (OLMo 2: no input norms,
        `post_attention_layernorm` / `post_feedforward_layernorm` on the sublayer outputs).
      embed_scale: token embeddings are multiplied by this factor, first rounded to the
        model dtype as transformers does (Gemma: sqrt(hidden_size)); None = no scaling.
        Hidden state 0 is the scaled embedding; a tied LM head uses the unscaled table.
      query_pre_attn_scalar: attention logits are scaled by query_pre_attn_scalar ** -0.5
        (Gemma); None = head_dim ** -0.5.
      attn_logit_softcap: attention logits become cap * tanh(logits / cap) before masking
        (Gemma 2); None = off.
      final_logit_softcap: the same on the LM head's logits (Gemma 2); None = off.
      fused_qkv, fused_gate_up: the checkpoint stores `self_attn.qkv_proj` (rows q, k, v)
        and `mlp.gate_up_proj` (rows gate, up) fused (Phi-3). Loading splits them, so the
        params (and their sharding, LoRA) always hold separate q/k/v and gate/up kernels.
      tie_word_embeddings: the LM head is the transposed embedding.
      hidden_act: MLP activation (`silu`, `gelu`, `gelu_pytorch_tanh`, or `xielu`: Apertus'
        xIELU with a learned alpha_p / alpha_n per layer, params mlp/act_fn/alpha_{p,n}).
      mlp_gated: down(act(gate(x)) * up(x)) (Llama); False: down(act(up(x))) (Apertus).
      layer_windows: per-layer sliding-window size, 0 = full attention.
      max_position_embeddings: informational; not enforced.
      bos_token_id, eos_token_ids, pad_token_id: special tokens from the config.
      attention_impl: how cache-free causal calls on right-padded rows (capture) compute
        attention: `auto` (cuDNN's fused kernel on a GPU in bf16/fp16 with head_dim a
        multiple of 8 up to 128 and no sliding window, else `einsum`), `einsum` (the
        explicit scores/softmax path every other call uses), `xla` or `cudnn`
        (`jax.nn.dot_product_attention` with that implementation). Models with sliding
        windows always take the einsum path.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    mlp_gated: bool = True
    layer_windows: tuple[int, ...] = ()
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    attention_impl: str = "auto"
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_attention_factor: float = 1.0
    rope_local_theta: float | None = None
    rotary_dim: int | None = None
    qk_norm_full: bool = False
    norm_offset: float = 0.0
    norm_scale_f32: bool = False
    norm_placement: str = "pre"
    embed_scale: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    module_prefix: str = "model."

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError("layer_windows needs one entry per layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.attention_impl not in ("auto", "einsum", "xla", "cudnn"):
            raise ValueError(f"attention_impl must be auto, einsum, xla or cudnn; got {self.attention_impl!r}")
        if self.norm_placement not in ("pre", "sandwich", "post"):
            raise ValueError(f"norm_placement must be pre, sandwich or post; got {self.norm_placement!r}")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise ValueError(f"rotary_dim must be even and in (0, head_dim]; got {self.rotary_dim}")
        if self.rope_type == "longrope":
            half = self.rope_dim // 2
            if len(self.rope_short_factor) != half or len(self.rope_long_factor) != half:
                raise ValueError(f"longrope needs short_factor and long_factor of length {half} (rotary dim / 2)")
        for name in ("rope_short_factor", "rope_long_factor", "layer_windows"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def rope_dim(self) -> int:
        """Features of each head that RoPE rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def attn_scale(self) -> float:
        """Factor on the attention logits q . k."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def inv_freq(self, variant: str = "global") -> np.ndarray:
        """RoPE inverse frequencies [rope_dim // 2], float32, as transformers computes them.

        variant: `global` (the configured rope; for `longrope` with the short factors),
        `long` (`longrope`'s long factors) or `local` (sliding-window layers when
        rope_local_theta is set: default rope with that base).
        """
        dim = self.rope_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        if variant == "local":
            return (1.0 / (np.float32(self.rope_local_theta) ** exponent)).astype(np.float32)
        if self.rope_type == "longrope":
            ext = np.asarray(self.rope_long_factor if variant == "long" else self.rope_short_factor, np.float32)
            return (1.0 / (ext * np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        inv = 1.0 / (self.rope_theta ** exponent)
        inv = inv.astype(np.float32)
        if self.rope_type == "linear":
            inv = inv / np.float32(self.rope_factor)
        elif self.rope_type == "llama3":
            factor = np.float32(self.rope_factor)
            low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
            old = self.rope_original_max_position
            low_wavelen, high_wavelen = old / low, old / high
            wavelen = (2 * math.pi / inv).astype(np.float32)
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        elif self.rope_type != "default":
            raise ValueError(f"unsupported rope_type {self.rope_type!r}")
        return inv
