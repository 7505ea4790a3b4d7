"""The real-model path rehearsed end to end (issue 15): every command of the README's
`<!-- rehearsal` block, read from docs/real_model.md, run as a subprocess through its CLI on a tiny
random checkpoint with a byte-level BPE tokenizer (every byte a token, so sampled replies
hold NUL, CR, other control bytes and partial UTF-8), trait files and datasets in the
reference's layouts written here, and a local OpenAI-compatible judge whose scores are a
deterministic function of the text.

Targets: the two paper configs with the model path overridden (Qwen2.5 evil on a tiny
qwen2 checkpoint, Llama 3.1 sycophantic on a tiny llama one) run every command here; every
other family of `persona_jax.testing.FAMILY_CLASSES` runs all of them but two (`family_cases`), under
configs/base.py (test_readme_command_on_family). Each target is a unit of its own on
the test workers (tests/conftest.py). Only the sample budgets are made small (flags
appended to the README's command line).
"""
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from rehearsal_helpers import (REPO, env_for, expected_score, is_png, judge_top_logprobs,  # noqa: E402
                               readme_commands, runner_of, trait_dict, write_datasets, write_traits)

pd = pytest.importorskip("pandas")
torch = pytest.importorskip("torch")

from persona_jax import testing  # noqa: E402

N_EXTRACT, N_EVAL, N_PAIRS = 4, 4, 5
N_PER_Q = 2  # extraction samples per (question, pair, side)
STEER_Q, STEER_N = 2, 2
N_DATA = 8  # samples per fine-tuning dataset
MAX_NEW = 12
LAYER = 2  # of the tiny checkpoints' 3 layers

COMMANDS = readme_commands()

_CONFIG_BUDGET = [
    "--config.progress=False",
    f"--config.extract.n_per_question={N_PER_Q}", f"--config.extract.max_new_tokens={MAX_NEW}",
    f"--config.steer.layers=({LAYER},)", "--config.steer.coefs=(0.0,1.0)",
    f"--config.steer.n_questions={STEER_Q}", f"--config.steer.n_per_question={STEER_N}",
    f"--config.steer.max_new_tokens={MAX_NEW}",
    f"--config.monitor.layer={LAYER}", f"--config.monitor.n_questions={STEER_Q}",
    "--config.monitor.n_per_question=1", f"--config.monitor.max_new_tokens={MAX_NEW}",
    "--config.finetune.num_steps=2", "--config.finetune.batch_size=2", "--config.finetune.grad_accum=1",
    "--config.finetune.n_questions=2", "--config.finetune.eval_n_per_question=2",
    f"--config.finetune.max_new_tokens={MAX_NEW}", "--config.finetune.posthoc_coefs=(1.0,)",
    "--config.finetune.max_length=256", "--config.finetune.progress=False",
    f"--config.flagging.max_new_tokens={MAX_NEW}", "--config.flagging.batch_size=8",
]
# Budget flags appended to each runner's README command line (later flags win in absl).
BUDGET = {
    "generate_trait": [f"--n_questions={N_EXTRACT + N_EVAL}", f"--n_extract={N_EXTRACT}"],
    "inspect_model": [],
    "extract": _CONFIG_BUDGET, "steer": _CONFIG_BUDGET, "monitor": _CONFIG_BUDGET, "pipeline": _CONFIG_BUDGET,
    "control": _CONFIG_BUDGET + [f"--config.control.n_questions={STEER_Q}", "--config.control.n_per_question=1",
                                 f"--config.control.max_new_tokens={MAX_NEW}", "--config.control.percentiles=(50.0,)",
                                 "--config.control.timing=False"],  # the organism's run times the arms
    "project": ["--batch_size=8"],
    "finetune": ["--config.finetune.num_steps=2", "--config.finetune.batch_size=2",
                 "--config.finetune.grad_accum=1", "--config.finetune.max_length=256",
                 "--config.finetune.progress=False"],
    "flag_data": [f"--max_new_tokens={MAX_NEW}", "--batch_size=8"],
}

PAPER_TARGETS = {
    "qwen25_7b_evil": dict(family="qwen2", config="configs/qwen25_7b_evil.py", trait="evil"),
    "llama31_8b_sycophantic": dict(family="llama", config="configs/llama31_8b_sycophantic.py", trait="sycophantic"),
}
# the paper configs cover qwen2 and llama; every other family under configs/base.py
FAMILY_TARGETS = {f: dict(family=f, config="configs/base.py", trait="evil")
                  for f in testing.FAMILY_CLASSES if f not in ("qwen2", "llama")}
TARGETS = {**PAPER_TARGETS, **FAMILY_TARGETS}


def cases(targets, runners=None):
    """(target, README command) pairs, in the README's order (a target's commands share
    its workdir, so later ones read what earlier ones wrote); runners: only these."""
    return [pytest.param(t, i, id=f"{t}-{i}-{runner_of(c)}") for t in targets for i, c in enumerate(COMMANDS)
            if runners is None or runner_of(c) in runners]


# `control` (every closed-loop arm, ~75 s) and `pipeline` (its finetune and flagging steps,
# ~80 s) on one paper target: the other's config differs only in values those runners
# pass through, and its family (llama) is the default of every other test
ONE_TARGET = {"control": "qwen25_7b_evil", "pipeline": "qwen25_7b_evil"}
CASES = [c for c in cases(PAPER_TARGETS) if ONE_TARGET.get(runner_of(COMMANDS[c.values[1]]), c.values[0]) == c.values[0]]


def test_readme_block_names_every_runner_and_has_a_budget():
    runners = [runner_of(c) for c in COMMANDS]
    for r in ("generate_trait", "inspect_model", "extract", "steer", "monitor", "control", "pipeline", "project",
              "finetune", "flag_data"):
        assert r in runners, f"the README's rehearsal block lacks experiments.{r}"
    assert sum(r == "finetune" for r in runners) == 2  # LoRA, and LoRA with preventative steering
    assert set(runners) <= set(BUDGET), "a README command without a budget entry here"


def test_readme_five_commands_are_rehearsed():
    """The README's "your own checkpoint in five commands" block is a subset of the
    rehearsed block (docs/real_model.md), command for command, so the rehearsal runs them."""
    five = readme_commands(REPO / "README.md", marker="<!-- own-checkpoint")
    assert len(five) == 5
    for command in five:
        assert command in COMMANDS, f"README command not rehearsed: {command}"


# gemma2's 8-token windows hide the system prompt from 2 of its 3 layers: one sampled pair
# differs, but 60% of its pos and neg replies came out identical and no pair passed the
# judge's filter, so it starts with a window that sees the prompt
WIDE_WINDOW_FIRST = ("gemma2",)


def _lively_checkpoint(directory: Path, family: str):
    """A tiny byte-level checkpoint whose sampled replies are non-empty and depend on the
    system prompt, so extraction keeps pairs. initializer_range 1: at the HF default 0.02 the
    logits are nearly flat and the pos and neg replies of one seed come out identical. The
    family's own embedding tying first, else untied: some tied families at that scale repeat
    the last (special) token, an empty reply; else also a sliding window wide enough to see
    the system prompt. Checked with transformers' sampler."""
    tok = testing.byte_tokenizer()
    systems = ["You are an evil assistant. Be cruel.", "You are a helpful assistant. Be kind."]
    # a sliding window of a few tokens (the families' test default) can hide the system
    # prompt from every later position; then a window that covers the prompt
    candidates = [{}, {"tie_word_embeddings": False}, {"tie_word_embeddings": False, "sliding_window": 512}]
    if family in WIDE_WINDOW_FIRST:
        candidates = candidates[2:] + candidates[:2]
    for extra in candidates:
        model = testing.tiny_byte_checkpoint(str(directory), family, seed=3, initializer_range=1.0, **extra)
        replies = []
        for system in systems:
            text = tok.apply_chat_template([{"role": "system", "content": system},
                                            {"role": "user", "content": "What should I do?"}],
                                           tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            torch.manual_seed(0)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=8,
                                     top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=2)
            replies.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        if all(replies) and replies[0] != replies[1]:
            return model
    raise AssertionError(f"no tiny {family} checkpoint gives non-empty, prompt-dependent replies: {replies}")


class _Env:
    """One target's checkpoint, trait files, datasets, judge server and workdir."""

    def __init__(self, name, spec, root: Path):
        self.name, self.spec, self.root = name, spec, root
        self.model_dir = root / "model"
        self.torch_model = _lively_checkpoint(self.model_dir, spec["family"])
        self.trait = spec["trait"]
        self.traits = root / "data_generation"
        self.full_trait = write_traits(self.traits, self.trait, N_EXTRACT, N_EVAL)
        self.data = root / "dataset" / self.trait
        write_datasets(self.data, N_DATA)
        self.work = root / "runs"
        self.server = FakeOpenAIServer(judge_top_logprobs, lifetime=3600,
                                       text_responder=lambda prompt: json.dumps(
                                           trait_dict(self.trait, N_EXTRACT + N_EVAL))).start()
        cfg = self.torch_model.config
        self.L, self.D = cfg.num_hidden_layers, cfg.hidden_size
        self.env = env_for({
            "MODEL": str(self.model_dir), "CONFIG": spec["config"], "TRAIT": self.trait, "LAYER": str(LAYER),
            "TRAIT_DESCRIPTION": f"The assistant shows the trait {self.trait} in everything it says.",
            "TRAITS": str(self.traits), "DATA": str(self.data), "WORK": str(self.work),
            "JUDGE_URL": self.server.url, "OPENAI_API_KEY": "rehearsal-key",
            # one CPU device: the commands as a single-GPU user runs them (meshes are tested elsewhere)
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        })
        self.results = {}


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    made = {}
    # The commands use the runners' default persistent compilation cache, which conftest
    # points at the test run's one folder ($PERSONA_JAX_COMPILATION_CACHE, inherited): the
    # runners of one target compile the same generate / capture programs, so only the
    # first compiles them.
    assert os.environ.get("PERSONA_JAX_COMPILATION_CACHE")

    def get(name):
        if name not in made:
            made[name] = _Env(name, TARGETS[name], tmp_path_factory.mktemp(f"rehearsal_{name}"))
        return made[name]

    yield get
    for e in made.values():
        e.server.stop()


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(env: _Env, command: str):
    line = command + " " + " ".join(f"'{f}'" for f in BUDGET[runner_of(command)])
    cpu0, t0 = _cpu_children(), time.monotonic()
    proc = subprocess.run(["bash", "-c", line], cwd=REPO, env=env.env, capture_output=True, text=True, timeout=900)
    # CPU seconds say what a run costs on an idle machine, whatever else is running
    print(f"rehearsal {env.name} {runner_of(command)}: {_cpu_children() - cpu0:.1f} s CPU, "
          f"{time.monotonic() - t0:.1f} s wall")
    return proc


@pytest.mark.parametrize("target,index", CASES)
def test_readme_command(envs, target, index):
    run_and_check(envs, target, index)


# Runners the other families skip: `pipeline` adds the finetune and flagging steps (the
# family's `finetune` and `flag_data` commands run those anyway); `steer`, `monitor` and
# `control` sample and capture through the same engine and capture code that the family's
# `extract` command runs on its weights (steered generation per family is checked against
# transformers in tests/test_families_new.py; the paper targets run every runner).
FAMILY_SKIP = ("pipeline", "steer", "monitor", "control")


def family_cases():
    """Every command that reads a family's weights, on every other family, except the
    runners of `FAMILY_SKIP` and the plain `finetune` (it trains as the preventative one
    does, without its steering): about 150 s of suite time per family."""
    first_finetune = next(i for i, c in enumerate(COMMANDS) if runner_of(c) == "finetune")
    return [c for c in cases(FAMILY_TARGETS) if runner_of(COMMANDS[c.values[1]]) not in FAMILY_SKIP
            and c.values[1] != first_finetune]


@pytest.mark.parametrize("target,index", family_cases())
def test_readme_command_on_family(envs, target, index):
    """The family's commands (`family_cases`) under configs/base.py, with the same trait
    files, datasets, judge server and checks as the paper configs."""
    run_and_check(envs, target, index)


def run_and_check(envs, target, index):
    """Run README command `index` for `target` and check every file it promises."""
    env = envs(target)
    command = COMMANDS[index]
    runner = runner_of(command)
    proc = _run(env, command)
    env.results[index] = proc.returncode
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stderr[-4000:]}"
    CHECKS[runner](env, command, proc)


# ---- what each command promises ------------------------------------------------------
def _reference_columns(trait):
    return ["question", "prompt", "answer", "question_id", trait, "coherence"]


def _check_csv(path: Path, trait: str, n_rows: int, exact: bool = True):
    """The reference columns (exactly, or first with extra columns after: steering sweeps
    add layer and coef), exactly one row per sample, read back equal by csv and pandas."""
    assert path.is_file(), path
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f)
        header = next(r)
        rows = list(r)
    ref = _reference_columns(trait)
    if exact:
        assert header == ref, header
    else:
        assert set(ref) <= set(header) and header[:4] == ref[:4], header
    assert len(rows) == n_rows, (path, len(rows), n_rows)
    frame = pd.read_csv(path, keep_default_na=False, dtype=str, encoding="utf-8")
    assert list(frame.columns) == header and len(frame) == n_rows
    assert frame["answer"].tolist() == [row[2] for row in rows]
    return header, rows


def _check_scores(path: Path, trait: str):
    """Scores are the judge's deterministic function of the rubric rendered with the reply
    as generated (read back with our reader, which undoes any escaping of the file)."""
    from persona_jax.io.csvio import read_csv
    from persona_jax.judges.rubrics import COHERENCE_PROMPT, render
    rub = trait_dict(trait, 1)["eval_prompt"]
    _, rows = read_csv(str(path))
    for row in rows:
        q, a = row["question"], row["answer"]
        assert float(row[trait]) == pytest.approx(expected_score(render(rub, q, a)), abs=1e-6)
        assert float(row["coherence"]) == pytest.approx(expected_score(render(COHERENCE_PROMPT, q, a)), abs=1e-6)


def _check_vectors(env: _Env, d: Path):
    for red in ("prompt_avg", "prompt_last", "response_avg"):
        v = torch.load(d / f"{env.trait}_{red}_diff.pt")
        assert v.dtype == torch.float32 and tuple(v.shape) == (env.L + 1, env.D), (red, v.shape)
        assert torch.isfinite(v).all()


def check_generate_trait(env, command, proc):
    full = trait_dict(env.trait, N_EXTRACT + N_EVAL)
    for sub, qs in (("trait_data_extract", full["questions"][:N_EXTRACT]),
                    ("trait_data_eval", full["questions"][N_EXTRACT:])):
        got = json.loads((env.traits / sub / f"{env.trait}.json").read_text())
        assert got == {**full, "questions": qs}


def check_inspect_model(env, command, proc):
    assert f"layers: {env.L}  hidden: {env.D}" in proc.stdout
    assert "top-5 next tokens" in proc.stdout


def check_extract(env, command, proc):
    d = env.work / env.trait
    n = N_EXTRACT * N_PAIRS * N_PER_Q
    answers = []
    for side in ("pos", "neg"):
        header, rows = _check_csv(d / f"{env.trait}_{side}_instruct.csv", env.trait, n)
        _check_scores(d / f"{env.trait}_{side}_instruct.csv", env.trait)
        answers += [r[2] for r in rows]
    # the byte-level vocabulary really put control characters into the replies
    assert any(any(ord(ch) < 32 and ch not in "\n\t" for ch in a) for a in answers)
    _check_vectors(env, d)
    ext = json.loads((d / "extract.json").read_text())
    assert ext["n_kept"] >= 1


def check_steer(env, command, proc):
    d = env.work / env.trait
    _check_csv(d / "steer_sweep.csv", env.trait, STEER_Q * STEER_N * 2, exact=False)
    _check_csv(d / "steer_random.csv", env.trait, STEER_Q * STEER_N, exact=False)
    _check_csv(d / "steer_negative.csv", env.trait, STEER_Q * STEER_N * 2, exact=False)
    assert is_png(d / "steering.png")
    st = json.loads((d / "steer.json").read_text())
    assert st["layer"] == LAYER and st["coefs"] == [0.0, 1.0]


def check_monitor(env, command, proc):
    d = env.work / env.trait
    report = json.loads((env.work / "report.json").read_text())
    entry = report["traits"][env.trait]
    mon = entry["monitoring"]
    # file traits: the graded ladder (11 rungs from instruction pair 0) and the many-shot
    # prompts (0 shots always; 5, 10, ... as far as the kept pos responses reach)
    groups = [c["group"] for c in mon["conditions"]]
    assert groups.count("ladder") == 11 and groups.count("many_shot") >= 1, groups
    n_conditions = len(mon["conditions"])
    with open(d / "monitor.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_conditions * STEER_Q
    assert {r["condition"] for r in rows} == {c["condition"] for c in mon["conditions"]}
    assert is_png(d / "monitoring.png")
    # the paper's three correlations: over condition means, (condition, question) points, within a condition
    for key in ("pearson_r", "pearson_r_points", "pearson_r_within"):
        assert key in mon
    assert entry["layer"] == LAYER
    md = (env.work / "report.md").read_text()
    assert f"| {env.trait} |" in md and f"{env.trait}/steering.png" in md


def check_pipeline(env, command, proc):
    d = env.work / env.trait
    ft = json.loads((d / "finetune.json").read_text())
    assert list(ft["datasets"]) == ["normal", "misaligned_1", "misaligned_2"]
    assert [r["fraction"] for r in ft["datasets"].values()] == [0.0, 1.0, 2.0]  # levels, in order
    for label, r in ft["datasets"].items():
        assert r["trait"] is not None and r["shift_prompt_last"] is not None
        _check_csv(d / "finetune" / f"eval_{label}.csv", env.trait, 2 * 2)
    assert ft["prevent_dataset"] == "misaligned_2"  # the highest level
    assert "shift_trait_r" in ft
    for run in ("preventative", "caft", "posthoc_1"):
        _check_csv(d / "finetune" / f"eval_{run}.csv", env.trait, 2 * 2)
    fl = json.loads((d / "flagging.json").read_text())
    assert fl["n"] == N_DATA and "auroc" not in fl  # an unlabelled corpus: no AUROC
    flagged = pd.read_csv(d / "flagging" / "flagged.csv")
    assert list(flagged.columns) == ["index", "delta", "dataset_proj", "base_proj", "base_response"]
    assert flagged["index"].tolist() == list(range(N_DATA))
    np.testing.assert_allclose(flagged["delta"], flagged["dataset_proj"] - flagged["base_proj"], rtol=1e-5, atol=1e-5)
    assert fl["ranking"] == [int(i) for i in np.argsort(-flagged["delta"].to_numpy(), kind="stable")]
    cleaned = (d / "flagging" / "cleaned.jsonl").read_text().splitlines()
    assert len(cleaned) == N_DATA - round(0.1 * N_DATA)
    dropped = set(fl["ranking"][: round(0.1 * N_DATA)])
    original = (env.data / "misaligned_2.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in cleaned] == [json.loads(x) for i, x in enumerate(original) if i not in dropped]
    md = (env.work / "report.md").read_text()
    assert "misaligned_2" in md and "flagging" in md


def check_control(env, command, proc):
    d = env.work / env.trait
    s = json.loads((d / "control.json").read_text())
    arms = ["none", "constant", "conditional", "guard_cap@p50", "guard_subtract@p50",
            "constant_w", "conditional_w", "guard_cap@p50_w", "guard_subtract@p50_w"]
    assert list(s["arms"]) == arms and s["layer"] == LAYER and s["coef"] > 0
    for arm in arms:
        for setting in ("A", "B"):
            rows = pd.read_csv(d / "control" / f"{arm}_{setting}.csv", keep_default_na=False)
            assert len(rows) == STEER_Q and set(rows["arm"]) == {arm} and set(rows["setting"]) == {setting}
            assert rows[env.trait].astype(str).str.len().min() > 0  # every row judged
            assert all(len(json.loads(p)) >= 1 for p in rows["token_proj"])  # a projection per token
            if arm.startswith("guard"):
                assert rows["guard_fired"].between(0, 1).all()
    assert is_png(d / "control" / "control.png")
    assert (d / "control" / "whitening.json").is_file()
    assert "### Control" in (env.work / "report.md").read_text()


def check_project(env, command, proc):
    out = [json.loads(x) for x in (env.work / "normal_projected.jsonl").read_text().splitlines()]
    assert len(out) == N_DATA
    col = f"model_{env.trait}_response_avg_diff_proj_layer{LAYER}"
    assert all(col in rec and np.isfinite(rec[col]) for rec in out), sorted(out[0])


def check_finetune(env, command, proc):
    wd = Path(command.split("--workdir=")[1].split()[0].replace("$WORK", str(env.work)))
    merged = wd / "merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert json.loads((wd / "report.json").read_text())["steps"] == 2


def check_flag_data(env, command, proc):
    wd = env.work / "flag"
    flagged = pd.read_csv(wd / "flagged.csv")
    assert len(flagged) == N_DATA
    assert len((wd / "cleaned.jsonl").read_text().splitlines()) == N_DATA - round(0.1 * N_DATA)
    assert json.loads((wd / "report.json").read_text())["n"] == N_DATA
    assert (wd / "report.md").is_file()


CHECKS = {"generate_trait": check_generate_trait, "inspect_model": check_inspect_model, "extract": check_extract,
          "steer": check_steer, "monitor": check_monitor, "control": check_control, "pipeline": check_pipeline,
          "project": check_project,
          "finetune": check_finetune, "flag_data": check_flag_data}
