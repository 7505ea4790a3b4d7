"""Data flagging (METHOD.md 9) against an independent transformers computation: the base
model's own greedy answers, the projection difference per sample, and the
`experiments.flag_data` runner's per-sample CSV, cleaned JSONL and AUROC."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.method import flagging as fl
from persona_jax.method import stats
from persona_jax.errors import PersonaError
from persona_jax.testing import tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER, NEW = 2, 6
RECORDS = [{"messages": [{"role": "user", "content": f"question {i}?"},
                         {"role": "assistant", "content": "answer" + " yes" * (i % 3) + " no" * i}]}
           for i in range(6)]
LABELS = [0, 1, 0, 1, 1, 0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama"))
    tm = tiny_checkpoint(d, "llama", initializer_range=0.3)  # large weights: greedy answers differ per prompt
    vec = np.random.default_rng(3).standard_normal((4, 48)).astype(np.float32)
    return d, tm, pj.load_model(d, dtype="float32"), vec


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers: greedy base answers, then proj(response_avg) of dataset minus base answer."""
    _, tm, model, vec = tiny
    tok = model.tokenizer
    u = vec[LAYER] / np.linalg.norm(vec[LAYER])

    def proj(prompt, answer):
        pl = len(tok.encode(prompt, add_special_tokens=False))
        ids = torch.tensor([tok.encode(prompt + answer, add_special_tokens=False)])
        with torch.no_grad():
            h = tm(ids, output_hidden_states=True).hidden_states[LAYER][0, pl:].double().numpy()
        return h.mean(0) @ u

    deltas, bases = [], []
    for r in RECORDS:
        prompt = model.render_chat(r["messages"][:-1], add_generation_prompt=True)
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            out = tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, eos_token_id=2)
        base = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        bases.append(base)
        deltas.append(proj(prompt, r["messages"][-1]["content"]) - proj(prompt, base))
    return np.array(deltas), bases


def test_projection_difference_matches_transformers(tiny, reference):
    _, _, model, vec = tiny
    res = fl.projection_difference(model, RECORDS, vec, LAYER, max_new_tokens=NEW, batch_size=4, progress=False)
    want, bases = reference
    assert res.base_responses == bases and len(set(bases)) > 3
    np.testing.assert_allclose(res.delta, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.dataset_proj - res.base_proj, res.delta)
    with pytest.raises(PersonaError, match="outside"):
        fl.projection_difference(model, RECORDS, vec, 4, max_new_tokens=NEW, progress=False)
    with pytest.raises(PersonaError, match="one label per score"):
        stats.auroc(res.delta, LABELS[:-1])


def test_flag_data_runner_writes_scores_cleaned_data_and_auroc(tiny, reference, tmp_path):
    d, _, _, vec = tiny
    data, labels, vpath = tmp_path / "train.jsonl", tmp_path / "labels.json", tmp_path / "v.npy"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    labels.write_text(json.dumps(LABELS))
    np.save(vpath, vec)
    wd = tmp_path / "flag"
    cmd = [sys.executable, "-m", "experiments.flag_data", f"--model={d}", f"--data={data}", f"--vector={vpath}",
           f"--layer={LAYER}", f"--workdir={wd}", f"--labels={labels}", "--drop_fraction=0.5",
           f"--max_new_tokens={NEW}", "--dtype=float32", "--batch_size=4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want, bases = reference
    with open(wd / "flagged.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(x["delta"]) for x in rows], want, rtol=1e-4, atol=1e-4)
    assert [int(x["label"]) for x in rows] == LABELS and [x["base_response"] for x in rows] == bases
    # cleaned.jsonl keeps the half with the smallest reference deltas, in file order
    keep = sorted(np.argsort(-want)[3:])
    assert [json.loads(l) for l in open(wd / "cleaned.jsonl")] == [RECORDS[i] for i in keep]
    report = json.loads((wd / "report.json").read_text())
    pos, neg = want[np.array(LABELS) == 1], want[np.array(LABELS) == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert report["dropped"] == 3 and abs(report["auroc"] - pairwise) < 1e-9
    assert report["mean_delta"] == pytest.approx(want.mean(), rel=1e-4, abs=1e-4)


def test_flag_data_runner_refuses_labels_that_do_not_match_the_data(tiny, tmp_path):
    d, _, _, vec = tiny
    data, labels, vpath = tmp_path / "train.jsonl", tmp_path / "labels.json", tmp_path / "v.npy"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    labels.write_text(json.dumps(LABELS[:-1]))
    np.save(vpath, vec)
    cmd = [sys.executable, "-m", "experiments.flag_data", f"--model={d}", f"--data={data}", f"--vector={vpath}",
           f"--layer={LAYER}", f"--workdir={tmp_path / 'flag'}", f"--labels={labels}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--labels must be a JSON list of 6 0/1 values" in r.stderr
    assert not (tmp_path / "flag" / "flagged.csv").exists()
