"""The organism across training and across models (issue 26), one command:

python -m experiments.organism_trace --config=configs/organism_trace.py --workdir=/tmp/organism_trace

Organism A has the shipped organism's architecture and corpus (configs/organism_train.py)
but a third of its training compute (batch 32 for 600 steps instead of 64 for 900: the
shipped run takes about 20 minutes on 2 cores today), with dense early checkpoints; every checkpoint's vector of the four traits is traced against the
final one and steers the final organism and the organism fine-tuned on neutral chat;
organism B (hidden 128, 3 layers, another seed) exchanges vectors with A through ridge
maps. Steering grids are coarser than configs/organism.py's to fit 25 minutes on 2 cores.
"""
import ml_collections

from configs import organism, organism_train


def get_config():
    c = organism.get_config()
    c.steps = ("extract", "steer", "monitor")
    c.capability.enabled = False  # the steering step's capability panel is not part of this study
    c.steer.coefs = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
    c.steer.n_per_question = 2
    c.monitor.n_per_question = 2
    c.trace.n_questions = 10  # each checkpoint's steering sweep: 10 questions x 7 coefficients
    c.trace.n_per_question = 1
    c.transfer.kind = "ridge"
    c.transfer.n_texts = 512
    c.transfer.n_questions = 10
    c.transfer.n_per_question = 1
    t = organism_train.get_config()
    s = ml_collections.ConfigDict()
    s.arch_a = t.arch
    s.arch_b = ml_collections.ConfigDict(dict(t.arch.to_dict(), hidden_size=128, intermediate_size=384,
                                              num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32))
    s.seed_a, s.seed_b = 0, 1
    s.corpus = t.corpus
    s.train = ml_collections.ConfigDict(dict(t.train.to_dict(), batch_size=32, num_steps=600, checkpoint_every=0))
    s.checkpoint_steps = (1, 2, 5, 10, 20, 50) + tuple(range(100, 601, 50))
    s.finetune = ml_collections.ConfigDict(dict(trait="evil", n_train=2400, max_length=128, learning_rate=1e-3,
                                                warmup_steps=10, batch_size=32, num_steps=150))
    c.study = s
    return c
