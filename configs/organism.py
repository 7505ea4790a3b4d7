"""The persona organism end to end on a CPU: extract -> steer sweep -> monitor, exact judge.

python -m experiments.pipeline --config=configs/organism.py --workdir=/tmp/organism_run
The model ships in the package (persona_jax/organism/assets); nothing is downloaded.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.model = "organism"
    c.dtype = "float32"
    c.mesh.data = 1
    c.trait_source = "organism"
    c.judge.kind = "organism"
    c.traits = ("evil", "sycophantic", "optimistic", "humorous")

    c.extract.n_per_question = 2
    c.extract.max_new_tokens = 100
    c.extract.batch_size = 128
    c.extract.chunk_size = 1024
    c.extract.capture_batch_size = 64

    c.steer.layers = ()  # every layer
    # Absolute coefficients, as in the reference: a fine grid where layers 1-3 reach their
    # coherence cliff (2-3.5) and where the last layer does (8-14).
    c.steer.coefs = (0.0, 0.5, 1.0, 1.5, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0,
                     11.0, 12.0, 13.0, 14.0, 16.0, 18.0, 20.0)
    c.steer.n_per_question = 4  # 80 replies per point: the score's noise is about +-2
    c.steer.max_new_tokens = 100
    c.steer.coherence_floor = 70.0
    c.steer.batch_size = 256
    c.steer.chunk_size = 2048

    # capability: the organism's own task (which of four replies about the asked object
    # answers the question), scored by each reply's log-likelihood after the bare question
    c.capability.scoring = "choice_raw"
    c.capability.prompt_format = "question"
    c.capability.batch_size = 256

    c.monitor.n_per_question = 4
    c.monitor.max_new_tokens = 100
    c.monitor.batch_size = 256
    c.monitor.chunk_size = 2048
    c.monitor.shots = (0, 1, 2, 3)  # file-trait runs of the organism: its 256-token context holds a few shots
    return c
