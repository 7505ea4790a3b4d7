"""The shipped organism's training run: architecture, corpus and optimisation (the record
of how persona_jax/organism/assets was made; `experiments.train_organism` reads it)."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.arch = ml_collections.ConfigDict(dict(
        hidden_size=192, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=48,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256))
    c.corpus = ml_collections.ConfigDict(dict(n_conversations=60_000, seed=0, max_len=128, n_eval=512))
    c.train = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=50, batch_size=64, grad_accum=1, num_steps=900,
        weight_decay=0.01, max_grad_norm=1.0, seed=0, checkpoint_every=100, eval_every=100))
    return c
