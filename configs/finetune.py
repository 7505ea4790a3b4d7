"""Standalone SFT (METHOD.md 8): LoRA r=32, alpha=64, rsLoRA, all projections, lr 1e-5,
5 warmup steps, linear schedule, weight decay 0.01, effective batch 16, one epoch, 10% of
the data held out for the eval loss when no eval file is given (the reference's
`training.py` defaults); optional preventative steering / CAFT at one or more layers.

python -m experiments.finetune --config=configs/finetune.py --config.model=DIR \
    --config.data=train.jsonl[,more.jsonl] --workdir=/tmp/ft [--config.steer.vector=evil_response_avg_diff.pt \
    --config.steer.layers="(20,)" --config.steer.coef=5.0]
"""
import ml_collections

from configs import base


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ""
    c.dtype = "bfloat16"  # params as loaded; master weights of the trained part stay float32
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    c.distributed = False
    c.scan_decode = False  # the runner does not generate; kept so runner.setup-style loading works
    c.seed = 0
    c.data = ""  # reference JSONL(s): {"messages": [...]} per line; several comma-separated
    c.eval_data = ""  # empty: hold out eval_fraction of the training conversations
    c.eval_fraction = 0.1  # the reference's train_test_split(test_size=0.1); 0 = no eval loss
    c.export = "merged"  # "merged" (HF checkpoint) | "adapter" (PEFT layout) | "both"
    c.finetune = base.get_config().finetune
    c.finetune.eval_every = 0
    c.finetune.epochs = 1  # used when num_steps = 0
    c.finetune.schedule = "linear"  # "linear" | "cosine" | "constant" | "constant_with_warmup"
    c.finetune.weight_decay = 0.01  # the reference's default
    c.finetune.lora_dropout = 0.0  # the reference's default; > 0: dropout on the adapter input (PEFT)
    c.steer = ml_collections.ConfigDict(dict(
        vector="",  # .pt / .npy / Orbax dir: preventative steering (kind=add) or CAFT (kind=ablate)
        layer=20,  # used when layers is empty
        layers=(),  # several hidden-state indices: the vector's row l added (or ablated) at each
        coef=5.0, kind="add", positions="all",
        all_layers=False,  # steer (or ablate: CAFT) at every layer 1..L (appendix J.4)
        incremental=False,  # add v[l] - v[l-1] at each steered layer (appendix J.3); kind=add
        coefs=(),  # a preventative-coefficient sweep: one fine-tune per coefficient, workdir/coef_<c>/
    ))
    # Scoring of the fine-tuned model(s) on a trait (empty trait: no scoring): greedy answers
    # to its evaluation questions (n_per_question=1; sampled at `temperature` otherwise),
    # judged with the trait's rubric.
    c.eval = ml_collections.ConfigDict(dict(
        trait="", trait_dir="data_generation", n_questions=0, n_per_question=1, max_new_tokens=1000,
        temperature=1.0, top_p=1.0, batch_size=64))
    c.eval.judge = base.get_config().judge
    return c
