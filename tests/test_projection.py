"""Projections, projection columns (reference names), AUROC and fine-tuning shift vs independent numpy/PyTorch."""
import csv
import json

import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.method import flagging as fl
from persona_jax.method import stats
from persona_jax.errors import PersonaError
from persona_jax.method.projection import column_name, project_file
from persona_jax.method.shift import finetuning_shift, mean_activations
from persona_jax.testing import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama"))
    tm = tiny_checkpoint(d, "llama")
    return tm, pj.load_model(d)


def _torch_states(tm, tok, prompt, answer):
    ids = tok(prompt + answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
    pl = len(tok.encode(prompt, add_special_tokens=False))
    with torch.no_grad():
        hs = torch.stack(tm(ids, output_hidden_states=True).hidden_states)[:, 0].double().numpy()
    return hs[:, pl - 1], hs[:, pl:].mean(1)


def test_project_csv_and_jsonl(tiny, tmp_path):
    tm, model = tiny
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((model.num_layers + 1, model.hidden_size)).astype(np.float32)
    vpath = tmp_path / "evil_response_avg_diff.npy"
    np.save(vpath, vec)
    convs = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "an answer" + " x" * i}]
             for i in range(3)]
    prompts = [model.render_chat(c[:1]) for c in convs]
    answers = [c[1]["content"] for c in convs]
    with open(tmp_path / "r.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "prompt", "answer", "question_id"])
        w.writeheader()
        for i, (p, a) in enumerate(zip(prompts, answers)):
            w.writerow(dict(question=f"q{i}", prompt=p, answer=a, question_id=str(i)))
    with open(tmp_path / "d.jsonl", "w") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}) + "\n")
    vectors = {"evil_response_avg_diff": vec}
    project_file(model, str(tmp_path / "r.csv"), vectors, [1, 3], progress=False)
    project_file(model, str(tmp_path / "d.jsonl"), vectors, [1, 3], progress=False)
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    recs = [json.loads(l) for l in open(tmp_path / "d.jsonl")]
    for i, (p, a) in enumerate(zip(prompts, answers)):
        last, avg = _torch_states(tm, model.tokenizer, p, a)
        for l in (1, 3):
            u = vec[l] / np.linalg.norm(vec[l])
            want = {"proj": avg[l] @ u, "prompt_last_proj": last[l] @ u,
                    "cos_sim": avg[l] @ u / np.linalg.norm(avg[l])}
            for kind, value in want.items():
                name = column_name(model.name, "evil_response_avg_diff", kind, l)
                assert name.endswith(f"_evil_response_avg_diff_{kind}_layer{l}")
                assert abs(float(rows[i][name]) - value) < 1e-4
                assert abs(recs[i][name] - value) < 1e-4
    with pytest.raises(PersonaError, match="shape"):
        project_file(model, str(tmp_path / "r.csv"), {"bad": vec[:, :5]}, [1], progress=False)
    with pytest.raises(PersonaError, match="outside"):
        project_file(model, str(tmp_path / "r.csv"), vectors, [model.num_layers + 1], progress=False)


def test_auroc_equals_pairwise_count():
    rng = np.random.default_rng(1)
    scores = np.round(rng.standard_normal(60), 1)  # rounding makes ties
    labels = rng.integers(0, 2, 60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert abs(stats.auroc(scores, labels) - pairwise) < 1e-12
    with pytest.raises(PersonaError):
        stats.auroc([1.0, 2.0], [1, 1])


def test_finetuning_shift_matches_numpy(tiny):
    tm, model = tiny
    prompts = [model.render_chat([{"role": "user", "content": f"hi {i}"}]) for i in range(3)]
    answers = ["yes", "no no", "maybe so"]
    means = mean_activations(model, prompts, answers, layer=2)
    ref_last = np.mean([_torch_states(tm, model.tokenizer, p, a)[0][2] for p, a in zip(prompts, answers)], 0)
    np.testing.assert_allclose(means["prompt_last"], ref_last, atol=1e-5)
    vec = np.zeros((model.num_layers + 1, model.hidden_size), np.float32)
    vec[2, 0] = 3.0
    shifted = {k: v + np.eye(model.hidden_size)[0] * 0.5 for k, v in means.items()}
    assert finetuning_shift(means, shifted, vec, 2) == pytest.approx({"prompt_last": 0.5, "response_avg": 0.5})
