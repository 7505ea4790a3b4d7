"""Tiny random Hugging Face checkpoints for tests and benchmarks (needs torch).

Nothing is downloaded: the model is random (transformers, PyTorch) and the tokenizer is
a character-level `tokenizers` model with a chat template, saved with `save_pretrained`.
"""
from __future__ import annotations

import string

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM"),
    "apertus": ("ApertusConfig", "ApertusForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}

# One config per family plus one that exercises GQA + tied embeddings + bias + q/k norm +
# llama3 rope scaling together where the family allows it.
FAMILY_KWARGS = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  attention_bias=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    # Gemma 2: sliding window of 8 on layers 0, 2, ...; soft-caps small enough to bite at
    # these sizes; query_pre_attn_scalar != head_dim.
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=8, attn_logit_softcapping=3.0, final_logit_softcapping=2.0),
    # Gemma 3: local (window 8, rope base 10000) / global (linear-scaled rope) alternating.
    "gemma3_text": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20,
                        sliding_window=8, sliding_window_pattern=2,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 100000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "olmo2": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
    # Apertus: per-head QK norm, ungated xIELU MLP (its learned alphas randomised below)
    "apertus": dict(num_attention_heads=4, num_key_value_heads=2),
    # OLMo 3: sliding (window 8, its own rope base) and full layers (llama3-scaled rope)
    "olmo3": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={"full_attention": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Phi-3: every layer windowed (8), longrope of a 128k-style checkpoint (original
    # context 16: rows longer than 16 tokens switch to the long factors), partial rotary.
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8, partial_rotary_factor=0.5,
                 original_max_position_embeddings=16,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                  "short_factor": [1.0, 1.3, 1.7], "long_factor": [2.0, 3.5, 6.0],
                                  "original_max_position_embeddings": 16, "partial_rotary_factor": 0.5}),
}


def char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A character-level fast tokenizer: printable ASCII + chat specials (< 128 ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", unk_token="?")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_checkpoint(directory: str, family: str = "llama", seed: int = 0, chat_template=CHAT_TEMPLATE,
                    num_hidden_layers: int = 3, hidden_size: int = 48, intermediate_size: int = 96,
                    vocab_size: int = 128, **overrides):
    """Save a random tiny `family` model + tokenizer into `directory`; returns the torch model."""
    import torch
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_hidden_layers, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(FAMILY_KWARGS[family])
    kwargs.update(overrides)
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: randomise so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or "act_fn.alpha" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    char_tokenizer(chat_template).save_pretrained(directory)
    return model


def tiny_gemma3_multimodal(directory: str, seed: int = 3, vocab_size: int = 128):
    """Save a random tiny `Gemma3ForConditionalGeneration` (a one-layer SigLIP tower and
    the projector around `tiny_checkpoint`'s gemma3_text language model) + tokenizer into
    `directory`; returns the torch model. Image ids 125-127 (keep text ids below them)."""
    import torch
    import transformers

    text = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512,
                initializer_range=0.1, **FAMILY_KWARGS["gemma3_text"])
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                                    image_token_index=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    char_tokenizer().save_pretrained(directory)
    return model


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of a byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


BYTE_VOCAB_SIZE = len(SPECIALS) + 256 + 4  # specials, every byte, the merges below


def byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE fast tokenizer like Llama 3's / Qwen's, built locally.

    Ids: the chat specials (0..5), then byte b at id 6 + b (every byte is a token, so a
    sampler can emit NUL, CR, other control bytes and partial UTF-8 sequences), then a
    few merges ("th", " t", "in", " a"); `BYTE_VOCAB_SIZE` ids in all.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _byte_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[b2u[b]] = len(SPECIALS) + b
    merges = [(b2u[ord(a)], b2u[ord(b)]) for a, b in ("th", " t", "in", " a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == BYTE_VOCAB_SIZE
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_byte_checkpoint(directory: str, family: str = "llama", seed: int = 0, **overrides):
    """`tiny_checkpoint` with the byte-level BPE tokenizer (`byte_tokenizer`) instead of the
    character-level one: what a real Llama 3 / Qwen checkpoint's tokenizer can emit."""
    overrides.setdefault("vocab_size", BYTE_VOCAB_SIZE)
    model = tiny_checkpoint(directory, family, seed=seed, **overrides)
    byte_tokenizer().save_pretrained(directory)
    return model
