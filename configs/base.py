"""Base config of every persona pipeline run; other configs start from it.

Every field is the record of the experiment: runners take `--config=configs/x.py`
and `--config.field=value` overrides, and copy the final config into report.json.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ""  # local HF checkpoint directory, or a hub id already in the HF cache
    c.dtype = "bfloat16"  # "float32" | "bfloat16"
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))  # -1: all devices on that axis
    c.distributed = False  # multi-host: call jax.distributed.initialize() first
    c.scan_decode = False  # True: decode holds the weights once (slower; see Model.scan_decode)
    c.seed = 0
    c.traits = ("evil",)
    c.trait_source = "files"  # "files" (trait_dir, reference layout) | "organism"
    c.trait_dir = "data_generation"  # holds trait_data_extract/ and trait_data_eval/
    c.antonym = "helpful"  # assistant name of the neg side (METHOD.md 2)
    c.steps = ("extract", "steer", "monitor")
    c.progress = True

    c.judge = ml_collections.ConfigDict(dict(
        kind="openai",  # "openai" | "local" | "organism"
        model="gpt-4.1-mini-2025-04-14",
        base_url="",  # empty: api.openai.com; any OpenAI-compatible endpoint otherwise
        api_key_env="OPENAI_API_KEY",
        aggregation="0_100",
        max_concurrency=32,
        timeout=60.0,  # seconds per request; a judge that hangs is given up on after
        max_retries=6,  # about timeout * (max_retries + 1) plus the backoff
        local_model="",  # kind=local: checkpoint of the judging model
        local_dtype="bfloat16",
    ))

    c.extract = ml_collections.ConfigDict(dict(
        n_per_question=10, temperature=1.0, top_p=1.0, max_new_tokens=1000,
        threshold=50.0, coherence_threshold=50.0,
        batch_size=64, chunk_size=1024, capture_batch_size=16,
    ))

    c.steer = ml_collections.ConfigDict(dict(
        reduction="response_avg",
        layers=(),  # empty: every layer 1..L
        coefs=(0.0, 0.5, 1.0, 1.5, 2.0, 2.5),
        positions="response",
        n_questions=0,  # 0: every evaluation question
        n_per_question=10, temperature=1.0, top_p=1.0, max_new_tokens=1000,
        coherence_floor=50.0,
        batch_size=64, chunk_size=1024,
    ))

    c.monitor = ml_collections.ConfigDict(dict(
        reduction="response_avg",
        layer=config_dict.placeholder(int),  # None: the layer the steering step chose (else the last)
        n_questions=0, n_per_question=5, temperature=1.0, top_p=1.0, max_new_tokens=1000,
        batch_size=64, chunk_size=1024,
        shots=(0, 5, 10, 15, 20),  # file traits: many-shot counts from the kept pos responses; () = none
    ))

    # issue 27: open- against closed-loop control at the chosen layer (step "control"):
    # no steering, constant negative steering, conditional steering, guards that cap or
    # subtract at percentiles of the unsteered tokens' projections, each also whitened
    c.control = ml_collections.ConfigDict(dict(
        reduction="response_avg",
        coef=config_dict.placeholder(float),  # None: the steering step's best negative coefficient
        percentiles=(50.0, 90.0),  # guard ceilings: percentiles of setting B's unsteered token projections
        whiten=True, ridge=0.01,  # the "_w" arms: (Sigma + ridge * mean eigenvalue * I)^-1 v
        capability=True,  # setting B's capability task (the capability config's items)
        timing=True,  # each arm's warm generation time on setting B's prompts at full length, against none
        n_questions=0, n_per_question=2, temperature=1.0, top_p=1.0, max_new_tokens=1000,
        batch_size=64, chunk_size=1024,
    ))

    # METHOD.md 8: LoRA SFT, then shift / preventative / CAFT / post-hoc (step "finetune")
    c.finetune = ml_collections.ConfigDict(dict(
        reduction="response_avg",
        datasets={},  # {label: path.jsonl} for real models; the organism writes its own
        # the reference's layout dataset/<name>/{normal,misaligned_1,misaligned_2}.jsonl: the
        # directory dataset/<name>; its three files join `datasets`, ordered by level 0, 1, 2
        dataset_dir="",
        # label of the dataset that preventative steering, CAFT and post-hoc steering use;
        # empty: the highest trait fraction when every dataset has one (the organism), else
        # the dataset whose fine-tuned model shows the highest measured trait
        prevent_dataset="",
        ratios=(0.0, 0.25, 0.5, 0.75, 1.0), n_train=2400, trait_strength=1.0,  # organism datasets
        method="lora", lora_rank=32, lora_alpha=64.0, rslora=True,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        learning_rate=1e-5, warmup_steps=5, batch_size=2, grad_accum=8, num_steps=0,  # 0: one epoch
        weight_decay=0.0, compute_dtype="bfloat16", remat=False, checkpoint_every=100,
        max_length=2048, overflow="truncate",
        preventative_coef=5.0,
        # preventative steering and CAFT at the chosen layer, or at these hidden-state
        # indices, or at every layer 1..L; incremental: add v[l] - v[l-1] at each (J.3)
        preventative_layers=(), preventative_all_layers=False, preventative_incremental=False,
        posthoc_coefs=(0.5, 1.0, 1.5, 2.0, 2.5), posthoc_positions="response",
        coherence_floor=50.0,
        n_questions=0, eval_n_per_question=5, temperature=1.0, top_p=1.0, max_new_tokens=1000,
        batch_size_generate=64, chunk_size=1024, progress=True,
    ))
    # METHOD.md 11: multiple-choice capability at the chosen layer over the steering grid
    # (steering step; issue 18). data: a local cais/mmlu-layout JSONL / CSV / parquet file;
    # empty: the trait source's own task (the organism's), or none.
    c.capability = ml_collections.ConfigDict(dict(
        enabled=True, data="", limit=0, scoring="letter", prompt_format="mmlu", chat=True, batch_size=16,
        n_items=100,  # the organism task's size
    ))
    # METHOD.md 9: projection difference on a candidate dataset (step "flagging")
    c.flagging = ml_collections.ConfigDict(dict(
        reduction="response_avg", dataset="",
        labels="",  # optional JSON list of 0/1 (1 = trait sample): AUROC; empty: an unlabelled corpus
        drop_fraction=0.1,  # unlabelled: cleaned.jsonl drops this top share by delta (labelled: the labels' share)
        n=400, dataset_samples=400,
        max_new_tokens=1000, temperature=0.0, batch_size=64,
        # the screening filters (METHOD.md 9, appendix K; as experiments/screen_data.py):
        delta="response_avg",  # "prompt_last": the last prompt token stands in, no generation
        reference="",  # a clean JSONL: thresholds at its `percentile` (unless given below)
        percentile=95.0,
        delta_threshold=config_dict.placeholder(float),  # drop delta > this (filtered_delta.jsonl)
        judge_filter=False,  # judge each dataset response with the trait rubric
        judge_threshold=config_dict.placeholder(float),  # drop score > this (filtered_judge.jsonl)
    ))
    # issue 26: a persona vector at every checkpoint of one run (experiments.trace)
    c.trace = ml_collections.ConfigDict(dict(
        # in training order: model dirs, a training output dir (checkpoint-N), a trainer
        # workdir (Orbax steps), HUB_ID[@REV,...|@*] of revisions in the local HF cache
        checkpoints=(),
        tokenizer="",  # a model dir of the run (Orbax steps hold no tokenizer); "": the first model dir
        final_workdir="",  # the final checkpoint's finished extract step; "": run it in <workdir>/final
        target="",  # the model steered and monitored; "": the final checkpoint
        target_workdir="",  # the target's finished extract / steer / monitor steps; "": <workdir>/target
        steer=True, monitor=True,
        n_questions=0, n_per_question=0,  # the steering share's sweep; 0: as the steer step
        cosine_threshold=0.9, share_threshold=0.8,
    ))
    # issue 26: a vector from another model (experiments.transfer); the target is c.model
    c.transfer = ml_collections.ConfigDict(dict(
        source="",  # the source model
        source_workdir="",  # its pipeline workdir with a finished extract step
        target_workdir="",  # the target's extract / steer steps; "": <workdir>/target
        kind="direct",  # "direct" (same width and depth) | "ridge" | "procrustes" (equal widths)
        ridge=1e-3,  # relative to the mean eigenvalue of the source states' covariance
        rescale=False,  # scale each mapped row by the target's over the source's hidden-state norm
        texts="",  # neutral texts: a JSONL of {"messages": [...]} or one text per line; "": the organism's
        n_texts=256, holdout_fraction=0.25,
        steer=True, n_questions=0, n_per_question=0,  # the steering share's sweep; 0: as the steer step
    ))
    return c
