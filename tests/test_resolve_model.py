"""finetune.resolve: a hub id is looked up in the local Hugging Face cache only (offline),
training output directories resolve to their latest checkpoint-N or merged/ export, and
what cannot be found is one clear error."""
import os
import shutil

import numpy as np
import pytest

from persona_jax.errors import PersonaError
from persona_jax.finetune import resolve
from persona_jax.testing import tiny_checkpoint


def _fake_cache(cache, repo_id, model_dir):
    """The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return base / "snapshots" / commit


def test_hub_id_from_the_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    d = tmp_path / "src"
    tiny_checkpoint(str(d), "llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    cache = tmp_path / "hub"
    snap = _fake_cache(cache, "someorg/tiny-chat", d)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    assert resolve.cached_hub_dir("someorg/tiny-chat") == str(snap)
    model = resolve.load_any_model("someorg/tiny-chat")
    assert model.name == "someorg/tiny-chat" and model.num_layers == 2
    with pytest.raises(PersonaError, match="not in the Hugging Face cache"):
        resolve.load_any_model("someorg/absent-model")
    with pytest.raises(PersonaError, match="does not exist"):
        resolve.load_any_model(str(tmp_path / "nowhere"))


def test_training_output_dirs(tmp_path):
    d = tmp_path / "run"
    (d / "merged").mkdir(parents=True)
    (d / "merged" / "config.json").write_text("{}")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text("{}")
    assert resolve.model_dir(str(d)) == str(d / "merged")
    shutil.rmtree(d / "merged")
    assert resolve.model_dir(str(d)) == str(d / "adapter")
    hf = tmp_path / "hf_out"
    for n in (5, 40, 100):
        (hf / f"checkpoint-{n}").mkdir(parents=True)
        (hf / f"checkpoint-{n}" / "adapter_config.json").write_text("{}")
    (hf / "checkpoint-final").mkdir()
    assert resolve.model_dir(str(hf)) == str(hf / "checkpoint-100")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonaError, match="holds no model"):
        resolve.model_dir(str(tmp_path / "empty"))
