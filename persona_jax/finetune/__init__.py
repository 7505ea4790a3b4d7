"""Fine-tuning and from-scratch training: one trainer (full params or LoRA), data loading
with assistant-only loss masks, LoRA merge/export, Hugging Face export."""
from persona_jax.finetune.data import (
    DataStats, Example, from_conversations, from_token_lists, load_jsonl, tokenize_conversation)
from persona_jax.finetune.lora import LoraConfig, export_adapter, load_adapter, merge
from persona_jax.finetune.trainer import TrainConfig, TrainResult, export_hf, lr_schedule, train
