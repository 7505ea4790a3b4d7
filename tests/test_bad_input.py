"""Bad input gives one clear line and a non-zero exit, never a traceback (issue 2).

Each case runs the real entry point, `python -m experiments.inspect_model`, in a fresh
process, and checks: exit status 2, stderr is exactly one line starting with `error:`
that names the problem, and no `Traceback` anywhere.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import persona_jax as pj
from persona_jax.errors import PersonaError
from persona_jax.testing import tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent


def inspect_model(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               XLA_FLAGS="", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "experiments.inspect_model", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(res, *words):
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    tiny_checkpoint(str(d), "llama")
    return d


def copy_of(good_dir, tmp_path, drop=()):
    d = tmp_path / "model"
    shutil.copytree(good_dir, d)
    for name in drop:
        (d / name).unlink()
    return d


def test_good_checkpoint_works(good_dir):
    """The baseline the failures below differ from: the CLI succeeds and prints a summary."""
    res = inspect_model(f"--model={good_dir}", "--prompt=Hi")
    assert res.returncode == 0, res.stderr
    assert "family: llama" in res.stdout and "parameters: " in res.stdout
    assert "top-5 next tokens:" in res.stdout
    assert res.stderr.strip() == "", res.stderr


def test_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    assert_one_line_error(inspect_model(f"--model={missing}"), str(missing), "does not exist")


def test_missing_safetensors(good_dir, tmp_path):
    d = copy_of(good_dir, tmp_path, drop=["model.safetensors"])
    assert_one_line_error(inspect_model(f"--model={d}"), "no *.safetensors", str(d))


def test_missing_shard_named_by_index(good_dir, tmp_path):
    d = copy_of(good_dir, tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    names = {k: "model-00001-of-00002.safetensors" for k in ("model.embed_tokens.weight",)}
    names["model.norm.weight"] = "model-00002-of-00002.safetensors"  # not on disk
    from persona_jax.model.safetensors_io import SafetensorsFile
    for k in SafetensorsFile(str(d / "model-00001-of-00002.safetensors")).keys():
        names.setdefault(k, "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    assert_one_line_error(inspect_model(f"--model={d}"), "model-00002-of-00002.safetensors", "missing")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(np.random.RandomState(0).bytes(4096))


def _bad_json_header(path):
    body = b"{this is not json}"
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 64)


@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _bad_json_header],
                         ids=["truncated", "garbage", "bad_json_header"])
def test_corrupt_safetensors(good_dir, tmp_path, corrupt):
    d = copy_of(good_dir, tmp_path)
    corrupt(d / "model.safetensors")
    line = assert_one_line_error(inspect_model(f"--model={d}"), "model.safetensors")
    assert "truncated" in line or "not a valid safetensors file" in line, line


def test_unsupported_family(good_dir, tmp_path):
    d = copy_of(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    line = assert_one_line_error(inspect_model(f"--model={d}"), "gpt2", "not supported")
    for fam in ("llama", "mistral", "qwen2", "qwen3"):  # names the supported ones
        assert fam in line


def test_invalid_config_json(good_dir, tmp_path):
    d = copy_of(good_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    assert_one_line_error(inspect_model(f"--model={d}"), "config.json", "not valid JSON")


def test_dtype_typo(good_dir):
    assert_one_line_error(inspect_model(f"--model={good_dir}", "--dtype=bf16"), "bf16", "float32", "bfloat16")


def test_unknown_flag_and_missing_model():
    assert_one_line_error(inspect_model("--modle=x"), "modle")
    assert_one_line_error(inspect_model(), "--model is required")


# ----------------------------------------------------------------------------- no chat template


@pytest.fixture(scope="module")
def no_template_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("no_template")
    tiny_checkpoint(str(d), "qwen2", chat_template=None)
    return d


def test_no_chat_template_loads_and_forwards_but_chat_fails(no_template_dir):
    model = pj.load_model(str(no_template_dir))
    assert model.tokenizer is not None and not model.tokenizer.chat_template
    ids = np.asarray([model.tokenizer("plain text", add_special_tokens=False)["input_ids"]])
    out = pj.forward(model, ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert np.isfinite(np.asarray(out.logits)).all()
    with pytest.raises(PersonaError, match="no chat template"):
        model.render_chat([{"role": "user", "content": "hi"}])


def test_no_chat_template_cli(no_template_dir):
    res = inspect_model(f"--model={no_template_dir}")  # no chat needed: works
    assert res.returncode == 0, res.stderr
    assert "chat template: no" in res.stdout
    res = inspect_model(f"--model={no_template_dir}", "--prompt=Hi")
    assert_one_line_error(res, "no chat template")
