"""METHOD.md 8-9 on the persona organism: fine-tuning shift, preventative steering, CAFT,
post-hoc steering and data flagging, after extract -> steer -> monitor.

python -m experiments.pipeline --config=configs/organism_finetune.py --workdir=/tmp/organism_ft
Datasets are written by code: no system prompts, trait fractions 0 / 0.25 / 0.5 / 1.0,
trait replies at persona strength 0.6, every reply ends with a closing sentence the base
organism never says (the content the data teaches besides the trait), and a subtle
flagging mix (one trait sentence per flagged reply: its free slots all hold the trait's
words).
"""
from configs import organism


def get_config():
    c = organism.get_config()
    c.steps = ("extract", "steer", "monitor", "finetune", "flagging")
    # The coefficients below (preventative 7, post-hoc grid in steps of 2) are sized for
    # the last layer, so every trait uses it rather than the layer its steering sweep
    # picks (3 for humorous, where the same numbers are several times too strong).
    c.monitor.layer = 4
    f = c.finetune
    f.ratios = (0.0, 0.25, 0.5, 1.0)
    f.n_train = 2400
    # Trait replies at persona strength 0.6 (a free slot holds the trait's word about 60% of
    # the time; strength 1 gives 95%): a trait-heavy set that fine-tuning turns into a rise
    # of about 50 points. At strength 1 the rise is 81-86 points, more than steering reaches
    # at a coherent strength (+40-53), and preventative steering kept only 22-32% of it away.
    f.trait_strength = 0.6
    f.method = "full"  # the organism is small; LoRA is the default for real models
    f.learning_rate = 1e-3
    f.warmup_steps = 10
    f.batch_size = 32
    f.grad_accum = 1
    f.num_steps = 150
    f.weight_decay = 0.0
    f.compute_dtype = "float32"
    f.checkpoint_every = 50
    f.max_length = 128
    f.preventative_coef = 7.0  # at the chosen layer; see README for the prevention vs content trade-off
    f.posthoc_coefs = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0)
    f.posthoc_positions = "response"
    f.coherence_floor = 70.0
    f.eval_n_per_question = 10  # 200 replies per evaluation: the content metric's noise is about +-2 points
    f.max_new_tokens = 96
    f.batch_size_generate = 256
    f.chunk_size = 4096
    f.progress = False
    fl = c.flagging
    fl.n = 400
    fl.dataset_samples = 200
    fl.max_new_tokens = 96
    fl.batch_size = 128
    return c
