"""Standalone SFT (METHOD.md 8): LoRA r=32, alpha=64, rsLoRA, all projections, lr 1e-5,
5 warmup steps, effective batch 16, one epoch; optional preventative steering / CAFT.

python -m experiments.finetune --config=configs/finetune.py --config.model=DIR \
    --config.data=train.jsonl --workdir=/tmp/ft [--config.steer.vector=evil_response_avg_diff.pt \
    --config.steer.layer=20 --config.steer.coef=5.0]
"""
import ml_collections

from configs import base


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ""
    c.dtype = "bfloat16"  # params as loaded; master weights of the trained part stay float32
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    c.distributed = False
    c.seed = 0
    c.data = ""  # reference JSONL: {"messages": [...]} per line
    c.eval_data = ""
    c.export = "merged"  # "merged" (HF checkpoint) | "adapter" (PEFT layout) | "both"
    c.finetune = base.get_config().finetune
    c.finetune.eval_every = 0
    c.steer = ml_collections.ConfigDict(dict(
        vector="",  # .pt / .npy / Orbax dir: preventative steering (kind=add) or CAFT (kind=ablate)
        layer=20, coef=5.0, kind="add", positions="all"))
    return c
