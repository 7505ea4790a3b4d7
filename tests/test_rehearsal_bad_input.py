"""Bad input on the real-model path (issue 15, point 5) and the pipeline's fine-tuning and
flagging steps on real datasets, without a model run: each mistake is one PersonaError
(one `error:` line, exit status 2 from the runners) raised before the model is loaded or a
file is written; the dataset choice for prevention follows the config or the measured trait;
the pipeline's files are written by process 0 only."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from rehearsal_helpers import REPO, env_for, write_datasets, write_traits  # noqa: E402

from configs import qwen25_7b_evil  # noqa: E402
from persona_jax.errors import PersonaError  # noqa: E402
from persona_jax.pipeline import finetune_steps, setup  # noqa: E402
from persona_jax.pipeline.steps import FileTraits  # noqa: E402


@pytest.fixture
def layout(tmp_path):
    write_traits(tmp_path / "traits", "evil", 2, 2)
    write_datasets(tmp_path / "dataset" / "evil", 3)
    return tmp_path


def _header_only_checkpoint(d: Path) -> Path:
    """A directory that passes the pre-load checkpoint check (config.json, a whole
    safetensors file) but is no model: every check below comes before the model is loaded."""
    import numpy as np
    from safetensors.numpy import save_file
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"x": np.zeros((4, 4), np.float32)}, str(d / "model.safetensors"))
    return d


def _cfg(root: Path, url: str = "http://127.0.0.1:9/v1", **steps):
    cfg = qwen25_7b_evil.get_config()
    cfg.model = str(_header_only_checkpoint(root / "model"))
    cfg.trait_dir = str(root / "traits")
    cfg.judge.base_url = url
    cfg.steps = ("extract", "steer", "monitor", "finetune", "flagging")
    cfg.finetune.dataset_dir = str(root / "dataset" / "evil")
    cfg.flagging.dataset = str(root / "dataset" / "evil" / "misaligned_2.jsonl")
    return cfg


def _edit_trait(root: Path, split: str, **changes):
    p = root / "traits" / split / "evil.json"
    data = json.loads(p.read_text())
    data.update(changes)
    p.write_text(json.dumps(data))


def _fails_before_writing(cfg, work: Path, match: str):
    with pytest.raises(PersonaError, match=match) as e:
        setup.setup(cfg, str(work))
    assert "\n" not in str(e.value).strip()
    written = [p.name for p in work.rglob("*") if p.is_file()] if work.exists() else []
    assert not [n for n in written if not n.startswith("judge_cache")], written  # nothing half-written
    return str(e.value)


@pytest.mark.parametrize("split", ["trait_data_extract", "trait_data_eval"])
def test_trait_json_without_questions(layout, split):
    _edit_trait(layout, split, questions=[])
    msg = _fails_before_writing(_cfg(layout), layout / "work", "question")
    assert split in msg


@pytest.mark.parametrize("rubric,missing", [("Rate {answer} from 0 to 100 or REFUSAL.", "{question}"),
                                            ("Rate {question} from 0 to 100 or REFUSAL.", "{answer}")])
def test_eval_prompt_without_placeholder(layout, rubric, missing):
    _edit_trait(layout, "trait_data_eval", eval_prompt=rubric)
    _fails_before_writing(_cfg(layout), layout / "work", missing.strip("{}"))


def test_judge_server_without_logprobs(layout, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with FakeOpenAIServer(responder=lambda prompt: "73") as srv:  # text replies, no logprobs
        msg = _fails_before_writing(_cfg(layout, srv.url), layout / "work", "no logprobs")
        assert srv.url.split("/v1")[0] in msg and srv.n_requests == 1  # one probe, then stop


@pytest.mark.parametrize("missing", ["normal.jsonl", "misaligned_2.jsonl"])
def test_dataset_dir_without_expected_files(layout, missing):
    (layout / "dataset" / "evil" / missing).unlink()
    msg = _fails_before_writing(_cfg(layout), layout / "work", missing)
    assert "misaligned_1" in msg  # names the layout it expects


def test_dataset_dir_missing_and_flagging_dataset_missing(layout):
    cfg = _cfg(layout)
    cfg.finetune.dataset_dir = str(layout / "nowhere")
    _fails_before_writing(cfg, layout / "work", "is not a directory")
    cfg = _cfg(layout)
    cfg.flagging.dataset = str(layout / "none.jsonl")
    _fails_before_writing(cfg, layout / "work", "flagging.dataset")


def test_cli_error_is_one_line_exit_2(layout):
    """Through the runner: the no-questions trait file gives one `error:` line, status 2."""
    _edit_trait(layout, "trait_data_extract", questions=[])
    env = env_for({})
    proc = subprocess.run([sys.executable, "-m", "experiments.pipeline", "--config=configs/qwen25_7b_evil.py",
                           f"--workdir={layout / 'work'}", f"--config.model={layout / 'm'}",
                           f"--config.trait_dir={layout / 'traits'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "question" in lines[0]
    assert not (layout / "work").exists()


# ---- the finetune / flagging steps' inputs ------------------------------------------
def test_reference_layout_is_ordered_by_level(layout):
    cfg = _cfg(layout)
    extra = layout / "extra.jsonl"
    extra.write_text((layout / "dataset" / "evil" / "normal.jsonl").read_text())
    cfg.finetune.datasets = {"mine": str(extra)}
    got = FileTraits(str(layout / "traits")).finetune_datasets("evil", "", cfg)
    d = layout / "dataset" / "evil"
    assert list(got) == ["normal", "misaligned_1", "misaligned_2", "mine"]
    assert got["misaligned_1"] == (str(d / "misaligned_1.jsonl"), 1.0)
    assert got["mine"][0] == str(extra) and got["mine"][1] != got["mine"][1]  # NaN: level unknown


def test_flagging_dataset_unlabelled_and_labelled(layout):
    cfg = _cfg(layout)
    src = FileTraits(str(layout / "traits"))
    assert src.flagging_dataset("evil", "", cfg) == (cfg.flagging.dataset, None)
    labels = layout / "labels.json"
    labels.write_text("[0, 1, 0]")
    cfg.flagging.labels = str(labels)
    assert src.flagging_dataset("evil", "", cfg) == (cfg.flagging.dataset, [0, 1, 0])
    labels.write_text('["a"]')
    with pytest.raises(PersonaError, match="0/1"):
        src.flagging_dataset("evil", "", cfg)


@pytest.mark.parametrize("named,levels,traits,want", [
    ("", [float("nan")] * 3, [10.0, 40.0, 25.0], "b"),  # unknown levels: the highest measured trait
    ("", [float("nan")] * 3, [None, None, 5.0], "c"),  # a missing trait never wins
    ("", [0.0, 1.0, 2.0], [50.0, 40.0, 25.0], "c"),  # known levels: the highest level
    ("a", [0.0, 1.0, 2.0], [1.0, 40.0, 25.0], "a"),  # named in the config
])
def test_prevention_dataset_choice(named, levels, traits, want):
    datasets = {k: (f"{k}.jsonl", lv) for k, lv in zip("abc", levels)}
    runs, chosen = {}, None
    for k, t in zip("abc", traits):  # the loop of step_finetune
        runs[k] = {"trait": t}
        if chosen is None or finetune_steps._prefer(k, runs, datasets, named, chosen):
            chosen = k
    assert chosen == want


def test_pipeline_files_written_by_process_0_only(tmp_path, monkeypatch):
    """On another process the pipeline's writers leave no file (they wait for process 0)."""
    import numpy as np

    from persona_jax.io import distributed
    from persona_jax.method.flagging import FlagResult
    from persona_jax.pipeline import steps

    monkeypatch.setattr(distributed, "is_writer", lambda: False)
    data = tmp_path / "d.jsonl"
    write_datasets(tmp_path / "ds", 2)
    data.write_text((tmp_path / "ds" / "normal.jsonl").read_text())
    res = FlagResult(delta=np.array([1.0, 2.0]), dataset_proj=np.array([1.0, 2.0]), base_proj=np.zeros(2),
                     base_responses=["a", "b"])
    finetune_steps._write_flagged_csv(str(tmp_path / "flagged.csv"), res, None)
    assert finetune_steps._filter_jsonl(str(data), str(tmp_path / "cleaned.jsonl"), res, drop_fraction=0.5) is None
    setup._write_config(str(tmp_path / "config.json"), {"a": 1})
    steps.write_summary(str(tmp_path / "s.json"), {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "ds"]
    monkeypatch.setattr(distributed, "is_writer", lambda: True)  # and process 0 writes them
    finetune_steps._write_flagged_csv(str(tmp_path / "flagged.csv"), res, None)
    setup._write_config(str(tmp_path / "config.json"), {"a": 1})
    assert (tmp_path / "flagged.csv").is_file() and json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("name", ["../evil", "sub/evil", "/tmp/evil", "evil.json", ""])
def test_trait_name_outside_a_safe_pattern(layout, name):
    """A trait name is a path component of the workdir and the trait files: `../evil` read
    and wrote outside the workdir, `sub/evil` made a nested layout. Both now stop first."""
    cfg = _cfg(layout)
    cfg.traits = (name,)
    if name == "../evil":  # a real file there: the name alone must stop it, not a missing file
        write_traits(layout / "traits" / "sub", "evil", 2, 2)
        cfg.trait_dir = str(layout / "traits" / "sub" / "trait_data_extract")
    _fails_before_writing(cfg, layout / "work", "trait name")


@pytest.mark.parametrize("field,value,match", [
    ("steer.coefs", (0.0, float("inf")), "finite"),
    ("steer.coefs", (0.0, float("nan")), "finite"),
    ("steer.coefs", ("(0.0,nan)",), "not a tuple"),  # what the flag parser leaves of an unparsable tuple
])
def test_config_values_checked_first(layout, field, value, match):
    cfg = _cfg(layout)
    section, name = field.split(".")
    setattr(cfg[section], name, value)
    _fails_before_writing(cfg, layout / "work", match)


@pytest.mark.parametrize("field,value,match", [
    ("percentiles", (50.0, 150.0), "percentiles"),
    ("coef", -2.0, "coef must be > 0"),
    ("ridge", -0.5, "ridge"),
    ("n_per_question", 0, "n_per_question"),
])
def test_control_options_checked_first(layout, field, value, match):
    """issue 27: the control step's options fail before anything is written."""
    cfg = _cfg(layout)
    cfg.steps = cfg.steps + ("control",)
    setattr(cfg.control, field, value)
    _fails_before_writing(cfg, layout / "work", match)


def test_unparsable_tuple_flag_is_one_line(layout):
    proc = subprocess.run([sys.executable, "-m", "experiments.steer", "--config=configs/organism.py",
                           f"--workdir={layout / 'work'}", "--config.steer.coefs=(0.0,nan)"],
                          cwd=REPO, env=env_for({}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config.steer.coefs"), proc.stderr
    assert not (layout / "work").exists()


@pytest.mark.parametrize("flags_, match", [
    (["--config.stear.coefs=(0.0,1.0)"], "error: --config.stear.coefs: the config has no field 'stear'; Did you mean \"steer\""),
    (["--config.judge.max_retriez=1"], "error: --config.judge.max_retriez: the config has no field 'max_retriez'"),
    (["--config.steer.coefs=(0,1)", "--config.steer.coefs=(0,1e999)"], "error: --config.steer.coefs is given twice"),
])
def test_unknown_field_and_repeated_tuple_flag_are_one_line(layout, flags_, match):
    proc = subprocess.run([sys.executable, "-m", "experiments.steer", "--config=configs/organism.py",
                           f"--workdir={layout / 'work'}", *flags_],
                          cwd=REPO, env=env_for({}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(match), proc.stderr
    assert not (layout / "work").exists()


@pytest.mark.parametrize("where, match", [
    ("file", "is a file, not a folder"),
    ("under_file", "which is a file, not a folder"),
    ("read_only", "is not writable"),  # /sys is read-only even for root
])
def test_workdir_problems_are_one_line_before_writing(layout, where, match):
    if where == "file":
        work = layout / "work"
        work.write_text("not a folder")
    elif where == "under_file":
        (layout / "afile").write_text("x")
        work = layout / "afile" / "work"
    else:
        if os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
            pytest.skip("no read-only filesystem to write under")
        work = Path("/sys/persona_jax_test_work")
    cfg = _cfg(layout)
    cfg.steps = ("extract",)
    with pytest.raises(PersonaError, match=match) as e:
        setup.setup(cfg, str(work), need_judge=False)
    assert "\n" not in str(e.value)
    assert not (work.is_dir() and any(work.iterdir()))


def test_truncated_checkpoint_stops_before_anything_is_written(layout, monkeypatch):
    """config.json and judge_cache.sqlite were left in the workdir by a checkpoint that
    failed to load after the judge probe; now the checkpoint is checked first."""
    import numpy as np
    from safetensors.numpy import save_file
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    model = layout / "truncated"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": np.ones((64, 64), np.float32)}, str(model / "model.safetensors"))
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    with FakeOpenAIServer() as srv:
        cfg = _cfg(layout, srv.url)
        cfg.model = str(model)
        with pytest.raises(PersonaError, match="truncated") as e:
            setup.setup(cfg, str(layout / "work"))
        assert srv.n_requests == 0
    assert "\n" not in str(e.value)
    assert not (layout / "work").exists()


def test_busy_workdir_names_the_other_process(layout):
    import os
    import socket
    from persona_jax.io import workdir_lock

    work = layout / "work"
    work.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / workdir_lock.LOCK_NAME).write_text(f"{other.pid}@{socket.gethostname()}\n")
        cfg = _cfg(layout)
        cfg.steps = ("extract",)
        with pytest.raises(PersonaError, match=f"in use by process {other.pid}"):
            setup.setup(cfg, str(work), need_judge=False)
        assert not (work / "config.json").exists()
    finally:
        other.kill()
        other.wait()
    # the same lock once its process is gone: stale, taken over (the run goes on to the model)
    cfg = _cfg(layout)
    cfg.steps = ("extract",)
    with pytest.raises(Exception) as e:
        setup.setup(cfg, str(work), need_judge=False)
    assert "in use" not in str(e.value)
    assert (work / workdir_lock.LOCK_NAME).read_text().startswith(f"{os.getpid()}@")
    workdir_lock.release(str(work / workdir_lock.LOCK_NAME))
