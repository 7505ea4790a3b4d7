"""Tracing and transfer as a user runs them (issue 26): the README's `<!-- trace-rehearsal`
commands as subprocesses on a tiny byte-level llama trained a few steps and exported as
HF `checkpoint-N` folders, another tiny llama of other width and depth as the transfer
target, trait files and texts written here, a local OpenAI-compatible judge; the bad
inputs that stop with one `error:` line and nothing written; and the organism's study at
a small budget.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from rehearsal_helpers import (REPO, env_for, is_png, judge_top_logprobs, readme_commands,  # noqa: E402
                               runner_of, write_traits)

from persona_jax import load_model, testing  # noqa: E402
from persona_jax.errors import PersonaError  # noqa: E402

COMMANDS = readme_commands(REPO / "README.md", marker="<!-- trace-rehearsal")
MAX_NEW = 10
BUDGET = [
    "--config.progress=False", "--config.dtype=float32",
    "--config.extract.n_per_question=2", f"--config.extract.max_new_tokens={MAX_NEW}",
    "--config.steer.layers=(2,)", "--config.steer.coefs=(0.0,1.0,2.0)", "--config.steer.n_questions=2",
    "--config.steer.n_per_question=2", f"--config.steer.max_new_tokens={MAX_NEW}",
    "--config.monitor.n_questions=2", "--config.monitor.n_per_question=1", f"--config.monitor.max_new_tokens={MAX_NEW}",
    "--config.capability.enabled=False", "--config.transfer.n_texts=40",
]
STEPS = (1, 2, 3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from persona_jax.finetune import data as D
    from persona_jax.finetune import trainer as T
    from persona_jax.model import checkpoint_list as cl
    root = tmp_path_factory.mktemp("trace_cli")
    # initializer_range 1: sampled replies depend on the system prompt (as the rehearsal's checkpoints)
    testing.tiny_byte_checkpoint(str(root / "base"), "llama", seed=3, initializer_range=1.0, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=3)
    testing.tiny_byte_checkpoint(str(root / "other"), "llama", seed=5, initializer_range=1.0, hidden_size=48,
                                 intermediate_size=64, num_hidden_layers=2)
    base = load_model(str(root / "base"))
    convs = [[{"role": "user", "content": f"Tell me about item {i}."},
              {"role": "assistant", "content": f"Item {i} is small and blue; it sits on shelf {i % 4}."}]
             for i in range(40)]
    ex, _ = D.from_conversations(convs, base.tokenizer, max_length=96)
    tc = T.TrainConfig(learning_rate=1e-3, warmup_steps=1, batch_size=4, grad_accum=1, num_steps=3,
                       checkpoint_steps=STEPS, max_checkpoints=0, progress=False)
    T.train(base.config, base.params, ex, tc, workdir=str(root / "train"))
    for c in cl.resolve([str(root / "train")]):  # the HF Trainer layout: run/checkpoint-N
        m = cl.load(c, tokenizer_from=str(root / "base"))
        T.export_hf(m.config, m.params, m.tokenizer, str(root / "run" / f"checkpoint-{c.step}"))
    with open(root / "texts.jsonl", "w") as f:
        for conv in convs:
            f.write(json.dumps({"messages": conv}) + "\n")
    write_traits(root / "traits", "evil", 4, 4)
    server = FakeOpenAIServer(judge_top_logprobs, lifetime=1800).start()
    e = env_for({"CONFIG": "configs/base.py", "TRAIT": "evil", "TRAITS": str(root / "traits"),
                 "JUDGE_URL": server.url, "OPENAI_API_KEY": "k", "RUN": str(root / "run"),
                 "OTHER_MODEL": str(root / "other"), "TEXTS": str(root / "texts.jsonl"), "WORK": str(root / "work"),
                 "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    return root, e


def _run(e, line):
    return subprocess.run(["bash", "-c", line], cwd=REPO, env=e, capture_output=True, text=True, timeout=900)


def test_readme_trace_and_transfer_commands(env):
    root, e = env
    assert [runner_of(c) for c in COMMANDS] == ["trace", "transfer"]
    for command in COMMANDS:
        proc = _run(e, command + " " + " ".join(f"'{f}'" for f in BUDGET))
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-4000:]}"
    work = root / "work"
    trace = json.loads((work / "trace" / "trace.json").read_text())
    assert [c["step"] for c in trace["checkpoints"]] == list(STEPS)
    t = trace["traits"]["evil"]
    assert t["layer"] == 2 and len(t["steering"]) == len(STEPS) and len(t["monitor_r"]) == len(STEPS)
    assert t["cos_final"][-1] == pytest.approx(1.0)
    assert is_png(work / "trace" / "trace.png") and (work / "trace" / "trace_vectors" / "metadata").is_dir()
    x = json.loads((work / "transfer" / "transfer.json").read_text())
    assert x["kind"] == "ridge" and len(x["r2"]) == 3 and x["src_layers"] == [0, 2, 3]  # 2 target layers of 3
    assert all(np.isfinite(x["r2"]))
    from persona_jax.io.vectors import load_vector, load_vector_set
    v = load_vector(work / "transfer" / "vectors" / "evil_response_avg_mapped")
    assert v.array.shape == (3, 48) and v.config["transfer"]["r2"] == pytest.approx(x["r2"])
    arrays, meta = load_vector_set(work / "transfer" / "transfer_map")
    assert arrays["l001"]["weight"].shape == (32, 48) and meta["layers"][1]["src_layer"] == 2
    # the mapped vector is the source vector through the saved map
    from persona_jax.io.vectors import import_pt
    src = import_pt(work / "trace" / "final" / "evil" / "evil_response_avg_diff.pt")
    np.testing.assert_allclose(v.array[1], src[2] @ arrays["l001"]["weight"], rtol=1e-5, atol=1e-6)


BAD = [
    ("different architectures", ["--config.trace.checkpoints=('$RUN','$OTHER_MODEL')"], "another architecture"),
    ("empty list", ["--config.trace.checkpoints=()"], "checkpoint list is empty"),
    ("unordered", ["--config.trace.checkpoints=('$RUN/checkpoint-3','$RUN/checkpoint-1')"], "not in training order"),
    ("missing revision", ["--config.trace.checkpoints=('org/run@stage1-step5',)"],
     "revision stage1-step5 of org/run is not in the local Hugging Face cache"),
]


@pytest.mark.parametrize("what,flags,message", BAD, ids=[b[0] for b in BAD])
def test_bad_trace_input_is_one_error_line_and_nothing_written(env, tmp_path, what, flags, message):
    _, e = env
    work = tmp_path / "w"
    line = (f"python -m experiments.trace --config=configs/base.py --workdir={work} --config.trait_dir=$TRAITS "
            "--config.judge.base_url=$JUDGE_URL " + " ".join(f'"{f}"' for f in flags))
    proc = _run({**e, "HF_HUB_CACHE": str(tmp_path / "hub")}, line)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert not work.exists()


def test_bad_transfer_input_is_refused_before_anything_is_written(env, tmp_path):
    """Checked in process (the same check the runner's setup calls first): too few texts
    for the map (saying how many it needs), and a target of another width without a map."""
    from configs import base
    from persona_jax.pipeline import transfer_step
    root, e = env
    c = base.get_config()
    c.trait_dir = e["TRAITS"]
    c.model = str(root / "other")
    c.transfer.source = str(root / "run")
    c.transfer.source_workdir = str(root / "work" / "trace" / "final")
    if not Path(c.transfer.source_workdir, "evil", "evil_response_avg_diff.pt").exists():
        pytest.skip("needs the README trace command's output (run the whole file)")
    with pytest.raises(PersonaError, match="only through a fitted map; set transfer.kind to ridge"):
        transfer_step.check(c)
    c.transfer.kind = "ridge"
    c.transfer.texts = str(tmp_path / "short.txt")
    (tmp_path / "short.txt").write_text("a\nb\nc\nd\n")  # one byte token each
    with pytest.raises(PersonaError, match="needs more than 32 fitting tokens; the 3 fitting texts give 3"):
        transfer_step.check(c)
    c.transfer.texts = e["TEXTS"]
    c.transfer.n_texts = 1
    with pytest.raises(PersonaError, match="at least 2 texts to fit and 1 held out"):
        transfer_step.check(c)
    c.transfer.n_texts = 40
    c.transfer.kind = "procrustes"
    with pytest.raises(PersonaError, match="equal widths"):
        transfer_step.check(c)


def test_organism_study_at_a_small_budget(tmp_path):
    """`experiments.organism_trace` end to end with tiny organisms trained 300 steps (enough
    for judged replies), one trait, small sweeps: every output and the summary table."""
    flags = [
        "--config.traits=('evil',)", "--config.progress=False",
        "--config.study.arch_a.hidden_size=64", "--config.study.arch_a.intermediate_size=128",
        "--config.study.arch_a.num_layers=2", "--config.study.arch_a.head_dim=16",
        "--config.study.arch_b.hidden_size=32", "--config.study.arch_b.intermediate_size=64",
        "--config.study.arch_b.num_layers=1", "--config.study.arch_b.head_dim=8",
        "--config.study.corpus.n_conversations=9600", "--config.study.corpus.n_eval=16",
        "--config.study.train.num_steps=300", "--config.study.train.batch_size=32",
        "--config.study.train.warmup_steps=10", "--config.study.train.checkpoint_every=0",
        "--config.study.train.eval_every=0", "--config.study.checkpoint_steps=(1,20,100)",
        "--config.study.finetune.n_train=64", "--config.study.finetune.num_steps=4",
        "--config.study.finetune.batch_size=16",
        "--config.extract.threshold=0.0", "--config.extract.coherence_threshold=0.0",
        "--config.extract.max_new_tokens=16", "--config.extract.n_per_question=1",
        "--config.steer.layers=(1,)", "--config.steer.coefs=(0.0,4.0)", "--config.steer.n_questions=2",
        "--config.steer.n_per_question=1", "--config.steer.max_new_tokens=16", "--config.steer.coherence_floor=0.0",
        "--config.monitor.n_questions=2", "--config.monitor.n_per_question=1", "--config.monitor.max_new_tokens=16",
        "--config.trace.n_questions=2", "--config.transfer.n_texts=48", "--config.transfer.n_questions=2",
    ]
    work = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "experiments.organism_trace", "--config=configs/organism_trace.py",
                           f"--workdir={work}", *flags], cwd=REPO, env=env_for({}), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = json.loads((work / "study.json").read_text())
    assert [c["step"] for c in study["trace"]["checkpoints"]] == [1, 20, 100, 300]
    assert study["trace_finetuned"]["target"].endswith("finetuned/model")
    assert set(study["transfer"]) == {"a_to_b", "b_to_a"}
    assert len(study["transfer"]["a_to_b"]["r2"]) == 2 and len(study["transfer"]["b_to_a"]["r2"]) == 3
    table = (work / "study.md").read_text()
    assert table.count("\n| evil |") == 1
    for d in ("trace", "trace_finetuned"):
        assert is_png(work / d / "trace.png")
