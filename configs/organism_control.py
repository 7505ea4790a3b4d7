"""Open- against closed-loop control on the persona organism (issue 27), on a CPU.

python -m experiments.pipeline --config=configs/organism_control.py --workdir=/tmp/organism_control

Extraction as the main job; a small steering sweep at the organism's two best layers (it
picks the layer and the negative coefficient the control arms use); no monitoring step;
then the control step: every arm in settings A and B, with the organism's capability task.
"""
from configs import organism


def get_config():
    c = organism.get_config()
    c.steps = ("extract", "steer", "control")
    c.steer.layers = (3, 4)  # the main job's chosen layers (README table)
    c.steer.coefs = (0.0, 2.5, 5.0, 8.0, 12.0)
    c.steer.n_per_question = 2
    c.control.n_per_question = 2  # 40 replies per arm and setting
    c.control.max_new_tokens = 100
    c.control.batch_size = 256
    c.control.chunk_size = 2048
    return c
