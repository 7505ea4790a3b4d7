"""The organism through the real-model path: the paper config, the organism's budgets.

configs/qwen25_7b_evil.py (trait files, OpenAI-compatible judge, the reference's 0_100
aggregation) with the sampling budgets, coefficient grid, layer choice, dtype and mesh of
configs/organism.py, so its figures compare with the organism main job at the same seed.

    python -m experiments.organism_assets --out=/tmp/organism_traits
    python -m experiments.organism_judge_server --ready_file=/tmp/judge_url &
    OPENAI_API_KEY=local python -m experiments.pipeline --config=configs/organism_real_path.py \
        --workdir=/tmp/organism_real --config.model=persona_jax/organism/assets \
        --config.trait_dir=/tmp/organism_traits --config.judge.base_url=$(cat /tmp/judge_url)
"""
from configs import organism, qwen25_7b_evil


def get_config():
    c = qwen25_7b_evil.get_config()
    o = organism.get_config()
    c.model = ""  # the organism's checkpoint directory: --config.model=persona_jax/organism/assets
    c.dtype = o.dtype
    c.mesh = o.mesh
    c.extract = o.extract
    c.steer = o.steer  # every layer, the organism's coefficient grid (qwen: layer 20, 0..2.5)
    c.monitor = o.monitor  # layer chosen by the steering step
    return c
