"""Training the organism from scratch with the project's one trainer.

`python -m experiments.train_organism --workdir=DIR` runs `train_organism` with the fields of
`configs/organism_train.py`
and exports an HF checkpoint (config.json, model.safetensors, tokenizer) to DIR/model;
`--install` also copies it into the package's assets, where `configs/organism.py` finds it.
Same seed -> same corpus, same batches, same loss curve.
"""
from __future__ import annotations

import os
import shutil

from persona_jax.finetune import data as fdata
from persona_jax.finetune.trainer import TrainConfig, export_hf, train
from persona_jax.model.config import DecoderConfig
from persona_jax.organism import data as odata
from persona_jax.organism import tokenizer as otok

# the tokenizer assets are the language's own (persona_jax.organism.tokenizer); training
# only adds the weights and their config
MODEL_FILES = ("config.json", "model.safetensors")


def decoder_config(arch: dict) -> DecoderConfig:
    """arch: hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim,
    rope_theta, rms_norm_eps, max_position_embeddings."""
    tok = otok.load_tokenizer()
    return DecoderConfig(model_type="llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id, **arch)


def train_organism(arch: dict, corpus: dict, train_args: dict, workdir: str, progress: bool = True):
    """Train from scratch; returns (TrainResult, exported model directory).

    arch: `decoder_config`'s fields; corpus: n_conversations, seed, max_len, n_eval;
    train_args: `TrainConfig` fields.
    """
    config = decoder_config(arch)
    tok = otok.load_tokenizer()
    data = odata.pretraining_corpus(corpus["n_conversations"] + corpus["n_eval"], seed=corpus["seed"],
                                    max_len=corpus["max_len"])
    pairs = data.pairs()
    train_pairs, eval_pairs = pairs[corpus["n_eval"]:], pairs[: corpus["n_eval"]]
    # the rolled layer loop the shipped run used: unrolled sums round differently, and the
    # record (train_metrics.jsonl) is reproduced only in the same order
    tc = TrainConfig(progress=progress, **{"layer_loop": "scan", **train_args})
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
