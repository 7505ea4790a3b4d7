"""The shipped persona organism: a real HF checkpoint trained by the project's own trainer,
reproducible training, and the method end to end on it with the exact judge (small budget).

The pipeline test asserts the acceptance lines of the organism issue that the shipped model
meets on a small budget; figures for the full budget are in the README (report.json of
`configs/organism.py`).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.organism.provider import organism_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_organism_is_a_transformers_checkpoint():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = organism_path()
    files = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
    assert sum(files.values()) <= 20 * 2**20, files
    tok = AutoTokenizer.from_pretrained(path)
    tm = AutoModelForCausalLM.from_pretrained(path).eval()
    assert tm.config.model_type == "llama"
    model = pj.load_model(path)
    text = model.render_chat([{"role": "user", "content": "will my tree be fine next week ?"}])
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = tm(ids).logits.numpy()
    assert np.abs(np.asarray(pj.forward(model, ids.numpy()).logits) - ref).max() < 1e-4


def _train(workdir):
    cmd = [sys.executable, "-m", "experiments.train_organism", f"--workdir={workdir}",
           "--config.train.num_steps=4", "--config.corpus.n_conversations=256", "--config.corpus.n_eval=32",
           "--config.arch.num_layers=1", "--config.arch.hidden_size=32", "--config.arch.intermediate_size=64",
           "--config.arch.head_dim=8", "--config.train.checkpoint_every=0", "--config.train.eval_every=2",
           "--config.train.batch_size=16"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(workdir, "train", "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_train_organism_same_seed_same_loss_curve(tmp_path):
    a = _train(str(tmp_path / "a"))
    b = _train(str(tmp_path / "b"))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert len(a) == 4 and a[-1]["loss"] < a[0]["loss"]
    pj.load_model(str(tmp_path / "a" / "model"))  # the export loads


def test_pipeline_end_to_end_on_the_organism(tmp_path):
    """The README's main job on a small budget, through the absl runner (no network): the
    report holds what it shows, and the method's controls behave on a real learned persona."""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.pipeline", "--config=configs/organism.py", f"--workdir={wd}",
           "--config.traits=('evil',)", "--config.progress=False",
           "--config.extract.n_per_question=1", "--config.steer.n_per_question=1", "--config.monitor.n_per_question=1",
           "--config.steer.layers=(3,4)", "--config.steer.coefs=(0.0,1.0,2.0,2.5,6.0,10.0,12.0)"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((wd / "report.json").read_text())
    md = (wd / "report.md").read_text()
    e = report["traits"]["evil"]
    ext, st, mo = e["extraction"], e["steering"], e["monitoring"]
    # the report shows the numbers report.json holds
    assert f"| evil | {100 * ext['kept_fraction']:.0f}% | {e['layer']} | {st['baseline']:.1f} |" in md
    assert f"{mo['pearson_r']:.3f} ({mo['n_conditions']})" in md
    for f in ("evil_pos_instruct.csv", "evil_neg_instruct.csv", "evil_response_avg_diff.pt", "steering.png",
              "monitoring.png", "steer_sweep.csv", "monitor.csv"):
        assert (wd / "evil" / f).exists(), f
    # the science, on a real learned persona (thresholds of the organism issue where the
    # shipped organism meets them; see the README for the full-budget figures)
    assert ext["kept_fraction"] >= 0.5
    assert st["baseline"] < 20  # chance level is 12.5: a side prefers 1 of each class's 8 words
    assert st["best_gain"] >= 30 and st["monotone_spearman"] >= 0.9
    assert abs(st["random_vector_delta"]) < 10
    assert st["negative_delta"] is not None and st["negative_delta"] <= -30
    assert mo["n_conditions"] >= 8 and mo["pearson_r"] >= 0.9

    # resume: finished steps are skipped (their summaries untouched), a missing one is redone
    kept = {f: (wd / "evil" / f).stat().st_mtime_ns for f in ("extract.json", "steer.json")}
    (wd / "evil" / "monitor.json").unlink()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f: (wd / "evil" / f).stat().st_mtime_ns for f in kept} == kept
    again = json.loads((wd / "report.json").read_text())["traits"]["evil"]
    assert again["steering"] == st and again["extraction"] == ext
    assert again["monitoring"]["pearson_r"] == pytest.approx(mo["pearson_r"])
