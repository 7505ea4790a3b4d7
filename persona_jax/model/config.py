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
      model_type: the HF family this came from (`llama`, `mistral`, `qwen2`, `qwen3`).
      vocab_size: rows of the token embedding.
      hidden_size: residual stream width D.
      intermediate_size: gated-MLP hidden width F.
      num_layers: decoder blocks L (hidden states come back as L+1 entries).
      num_heads: query heads H.
      num_kv_heads: key/value heads (GQA when < num_heads).
      head_dim: per-head width (Qwen3 sets it explicitly; may differ from D/H).
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base.
      rope_type: `default`, `linear` or `llama3` (inverse frequencies as in transformers).
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position:
        scaling parameters of `linear` / `llama3`.
      qkv_bias: q/k/v projections have a bias (Qwen2, Llama with attention_bias).
      o_bias: the output projection has a bias (Llama/Qwen3 with attention_bias).
      mlp_bias: gate/up/down projections have biases (Llama mlp_bias).
      qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
      tie_word_embeddings: the LM head is the transposed embedding.
      hidden_act: MLP activation (`silu`, `gelu`, `gelu_pytorch_tanh`).
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
    layer_windows: tuple[int, ...] = ()
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    attention_impl: str = "auto"

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError("layer_windows needs one entry per layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.attention_impl not in ("auto", "einsum", "xla", "cudnn"):
            raise ValueError(f"attention_impl must be auto, einsum, xla or cudnn; got {self.attention_impl!r}")

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2], float32, as transformers computes them."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
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
