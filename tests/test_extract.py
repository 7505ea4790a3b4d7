"""Vector extraction from reference CSVs equals an independent PyTorch computation (METHOD.md 4-5)."""
import csv
import os

import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.method import extract as ex
from persona_jax.errors import PersonaError
from persona_jax.testing import tiny_checkpoint
from persona_jax.io.vectors import import_pt

TRAIT = "evil"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qwen2"))
    tm = tiny_checkpoint(d, "qwen2")
    return tm, pj.load_model(d)


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "prompt", "answer", "question_id", TRAIT, "coherence"])
        w.writeheader()
        w.writerows(rows)


def _rows(side, scores):
    out = []
    for i, (t, c) in enumerate(scores):
        q = f"question {i}?"
        prompt = f"<|system|>You are {side}.<|end|><|user|>{q}<|end|><|assistant|>"
        out.append(dict(question=q, prompt=prompt, answer=f"{side} answer number {i}" + "!" * i,
                        question_id=f"{TRAIT}_{i}_{side}_0", **{TRAIT: t, "coherence": c}))
    return out


def _torch_reductions(tm, tok, prompt, answer):
    """The reference procedure: one sample per forward, output_hidden_states."""
    ids = tok(prompt + answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
    pl = len(tok.encode(prompt, add_special_tokens=False))
    with torch.no_grad():
        hs = torch.stack(tm(ids, output_hidden_states=True).hidden_states)[:, 0].double()
    return {"prompt_avg": hs[:, :pl].mean(1), "prompt_last": hs[:, pl - 1], "response_avg": hs[:, pl:].mean(1)}


def test_vectors_from_csvs_match_torch(tiny, tmp_path):
    tm, model = tiny
    # pair 1 fails (neg trait too high), pair 3 fails (pos coherence low), pair 4 has a missing score
    pos = _rows("pos", [(90, 80), (70, 90), (85, 60), (99, 20), ("", 90), (60, 55)])
    neg = _rows("neg", [(10, 80), (60, 90), (5, 70), (1, 90), (0, 90), (49, 50)])
    _write(tmp_path / "p.csv", pos)
    _write(tmp_path / "n.csv", neg)
    vecs, stats = ex.vectors_from_csvs(model, str(tmp_path / "p.csv"), str(tmp_path / "n.csv"), TRAIT,
                                       batch_size=2, progress=False)
    kept = [0, 2, 5]
    assert stats["n_kept"] == len(kept) and stats["n_pairs"] == 6
    for r in ex.REDUCTIONS:
        p = torch.stack([_torch_reductions(tm, model.tokenizer, pos[i]["prompt"], pos[i]["answer"])[r] for i in kept])
        n = torch.stack([_torch_reductions(tm, model.tokenizer, neg[i]["prompt"], neg[i]["answer"])[r] for i in kept])
        ref = (p.mean(0) - n.mean(0)).numpy()
        assert vecs[r].shape == (model.num_layers + 1, model.hidden_size)
        assert np.abs(vecs[r] - ref).max() <= 1e-4, r
    paths = ex.save_vectors(vecs, str(tmp_path), TRAIT, model.name, stats["n_kept"])
    loaded = torch.load(paths["response_avg"])
    assert loaded.dtype == torch.float32
    np.testing.assert_array_equal(loaded.numpy(), vecs["response_avg"])
    assert os.path.basename(paths["prompt_last"]) == "evil_prompt_last_diff.pt"
    np.testing.assert_array_equal(import_pt(paths["prompt_avg"]), vecs["prompt_avg"])


def test_everything_filtered_is_an_error(tiny, tmp_path):
    _, model = tiny
    _write(tmp_path / "p.csv", _rows("pos", [(10, 90), (20, 90)]))
    _write(tmp_path / "n.csv", _rows("neg", [(10, 90), (20, 90)]))
    with pytest.raises(PersonaError, match="filtered out"):
        ex.vectors_from_csvs(model, str(tmp_path / "p.csv"), str(tmp_path / "n.csv"), TRAIT, progress=False)


def test_csv_missing_columns(tiny, tmp_path):
    _, model = tiny
    with open(tmp_path / "p.csv", "w") as f:
        f.write("question,prompt,answer\nq,p,a\n")
    _write(tmp_path / "n.csv", _rows("neg", [(10, 90)]))
    with pytest.raises(PersonaError, match="missing column"):
        ex.vectors_from_csvs(model, str(tmp_path / "p.csv"), str(tmp_path / "n.csv"), TRAIT, progress=False)


def test_misaligned_csvs(tiny, tmp_path):
    _, model = tiny
    _write(tmp_path / "p.csv", _rows("pos", [(90, 90), (90, 90)]))
    _write(tmp_path / "n.csv", _rows("neg", [(10, 90)]))
    with pytest.raises(PersonaError, match="aligned"):
        ex.vectors_from_csvs(model, str(tmp_path / "p.csv"), str(tmp_path / "n.csv"), TRAIT, progress=False)
