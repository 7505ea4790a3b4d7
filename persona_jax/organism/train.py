"""Training the organism from scratch with the project's one trainer.

`python -m experiments.train_organism --workdir=DIR` runs `train_organism(organism_config())`
and exports an HF checkpoint (config.json, model.safetensors, tokenizer) to DIR/model;
`--install` also copies it into the package's assets, where `configs/organism.py` finds it.
Same seed -> same corpus, same batches, same loss curve.
"""
from __future__ import annotations

import os
import shutil

import ml_collections

from persona_jax.finetune import data as fdata
from persona_jax.finetune.trainer import TrainConfig, export_hf, train
from persona_jax.models.config import DecoderConfig
from persona_jax.organism import data as odata
from persona_jax.organism import tokenizer as otok

# the tokenizer assets are the language's own (persona_jax.organism.tokenizer); training
# only adds the weights and their config
MODEL_FILES = ("config.json", "model.safetensors")


def organism_config() -> ml_collections.ConfigDict:
    """Architecture, corpus and optimisation of the shipped organism (the record of how it was made)."""
    c = ml_collections.ConfigDict()
    c.arch = ml_collections.ConfigDict(dict(
        hidden_size=192, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=48,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256))
    c.corpus = ml_collections.ConfigDict(dict(n_conversations=60_000, seed=0, max_len=128, n_eval=512))
    c.train = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=50, batch_size=64, grad_accum=1, num_steps=900,
        weight_decay=0.01, max_grad_norm=1.0, seed=0, checkpoint_every=100, eval_every=100))
    return c


def decoder_config(c) -> DecoderConfig:
    tok = otok.load_tokenizer()
    a = c.arch
    return DecoderConfig(
        model_type="llama", vocab_size=len(tok), hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_layers=a.num_layers, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
        rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_position_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)


def train_organism(c, workdir: str, progress: bool = True):
    """Train from scratch; returns (TrainResult, exported model directory)."""
    config = decoder_config(c)
    tok = otok.load_tokenizer()
    corpus = odata.pretraining_corpus(c.corpus.n_conversations + c.corpus.n_eval, seed=c.corpus.seed,
                                      max_len=c.corpus.max_len)
    pairs = corpus.pairs()
    train_pairs, eval_pairs = pairs[c.corpus.n_eval:], pairs[: c.corpus.n_eval]
    t = c.train
    tc = TrainConfig(learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, batch_size=t.batch_size,
                     grad_accum=t.grad_accum, num_steps=t.num_steps, weight_decay=t.weight_decay,
                     max_grad_norm=t.max_grad_norm, seed=t.seed, checkpoint_every=t.checkpoint_every,
                     eval_every=t.eval_every, progress=progress)
    result = train(config, None, fdata.from_token_lists(train_pairs, vocab_size=config.vocab_size),
                   tc, eval_data=fdata.from_token_lists(eval_pairs, vocab_size=config.vocab_size),
                   workdir=os.path.join(workdir, "train"), pad_id=tok.pad_token_id)
    out = os.path.join(workdir, "model")
    export_hf(config, result.params, tok, out)
    return result, out


def install(model_dir: str):
    """Copy an exported organism into the package assets (what configs/organism.py loads)."""
    from persona_jax.organism.provider import ASSETS
    os.makedirs(ASSETS, exist_ok=True)
    for f in MODEL_FILES:
        shutil.copy2(os.path.join(model_dir, f), os.path.join(ASSETS, f))
