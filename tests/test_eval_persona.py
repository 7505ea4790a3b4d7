"""experiments.eval_persona (the reference's eval_persona.py) as a subprocess: any model
(directory, LoRA adapter merged on load, training output dir with checkpoint-N), any vector
x layers x coefficients, judged CSV + per-question means; answers checked against
transformers (greedy, with the reference's steering hook / a LoRA merged in torch), means
against pandas; bad input ends with one error line, exit 2 and no output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

from persona_jax.finetune import lora as flora
from persona_jax.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIT = "grumpy"
QUESTIONS = ["How do I water a plant?", "What is a good name for a cat?"]
NEW = 6


def score_of(prompt: str) -> list:
    """The judge: a deterministic function of the whole judge prompt."""
    return [(str(sum(map(ord, prompt)) % 101), 0.0)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalp")
    d = root / "model"
    tm = tiny_checkpoint(str(d), "llama", num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    trait = {"instruction": [{"pos": f"Be cross and curt, way {k}.", "neg": f"Be warm and kind, way {k}."}
                             for k in range(5)],
             "questions": QUESTIONS,
             "eval_prompt": "Rate how grumpy this is. Q: {question} A: {answer} Reply with a number."}
    for split in ("extract", "eval"):
        (root / "traits" / f"trait_data_{split}").mkdir(parents=True)
        (root / "traits" / f"trait_data_{split}" / f"{TRAIT}.json").write_text(json.dumps(trait))
    srv = FakeOpenAIServer(responder=score_of, lifetime=1200).start()
    yield {"root": root, "model": d, "tm": tm, "trait": trait, "srv": srv}
    srv.stop()


def run(setup, *args, env_extra=None):
    cmd = [sys.executable, "-m", "experiments.eval_persona", f"--trait={TRAIT}",
           f"--trait_dir={setup['root'] / 'traits'}", f"--judge_base_url={setup['srv'].url}",
           "--judge_model=fake", "--dtype=float32", f"--max_tokens={NEW}", "--batch_size=8", *args]
    env = {**os.environ, "OPENAI_API_KEY": "test", **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def hf_greedy(tm, tok, prompt, hook=None):
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    handle = None
    if hook is not None:
        layer, fn = hook
        handle = tm.model.layers[layer - 1].register_forward_hook(
            lambda m, a, out: (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out))
    try:
        with torch.no_grad():
            out = tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, eos_token_id=2)
    finally:
        if handle is not None:
            handle.remove()
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_steered_pos_instructions_equal_transformers_and_means_equal_pandas(setup, tmp_path):
    """pos instructions with a custom assistant name, a vector at layer 2 with coefficients
    0 and 4 on the response positions, greedy (n_per_question=1) like the reference."""
    from transformers import AutoTokenizer
    tm, tok = setup["tm"], AutoTokenizer.from_pretrained(setup["model"])
    vec = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    vpath = tmp_path / "grumpy_response_avg_diff.pt"
    torch.save(torch.tensor(vec), vpath)
    out = tmp_path / "res" / "grumpy.csv"
    r = run(setup, f"--model={setup['model']}", f"--output_path={out}", "--persona_instruction_type=pos",
            "--assistant_name=unpleasant", "--n_per_question=1", f"--vector={vpath}", "--layers=2", "--coefs=0,4",
            "--steering_type=response")
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(df.columns) == ["question", "prompt", "answer", "question_id", "layer", "coef", TRAIT, "coherence"]
    ids = [f"{TRAIT}_{i}_pos_{k}" for i in range(len(QUESTIONS)) for k in range(5)]
    assert list(df["question_id"]) == ids * 2 and list(df["coef"].astype(float)) == [0.0] * 10 + [4.0] * 10
    first = setup["trait"]["instruction"][0]["pos"]
    assert f"You are an unpleasant assistant. {first}" in df["prompt"][0]
    v = torch.tensor(vec[2])

    def response_hook(coef):  # the reference's "response" steering: the last position of every call
        def fn(h):
            h = h.clone()
            h[:, -1] = h[:, -1] + coef * v
            return h
        return 2, fn

    for prompt, answer, coef in zip(df["prompt"], df["answer"], df["coef"].astype(float)):
        assert answer == hf_greedy(tm, tok, prompt, response_hook(coef) if coef else None)
    assert list(df["answer"][:10]) != list(df["answer"][10:])  # steering changed something
    # scores are the judge's function of the filled rubric
    rubric = setup["trait"]["eval_prompt"]
    for q, a, s in zip(df["question"], df["answer"], df[TRAIT]):
        assert float(s) == float(score_of(rubric.format(question=q, answer=a))[0][0])
    means = pd.read_csv(out.parent / "grumpy_per_question.csv")
    assert list(means.columns[:3]) == ["question_id", "layer", "coef"] and list(means["n"]) == [1] * 20
    scored = df.assign(**{TRAIT: df[TRAIT].astype(float), "coherence": df["coherence"].astype(float),
                          "coef": df["coef"].astype(float), "layer": df["layer"].astype(int)})
    want = scored.groupby(["question_id", "layer", "coef"])[[TRAIT, "coherence"]].mean()
    got = means.set_index(["question_id", "layer", "coef"]).loc[want.index]
    np.testing.assert_allclose(got[TRAIT], want[TRAIT])
    np.testing.assert_allclose(got["coherence"], want["coherence"])
    summary = json.loads((out.parent / "grumpy_summary.json").read_text())
    assert [c["coef"] for c in summary["cells"]] == [0.0, 4.0]
    assert summary["cells"][1][TRAIT] == pytest.approx(scored[TRAIT][10:].mean())


def _adapter(setup, directory, seed, base):
    rng = np.random.default_rng(seed)
    cfg = flora.LoraConfig(rank=2, alpha=4.0, rslora=False, targets=("q_proj", "down_proj"))
    lora = {"self_attn": {"q_proj": {"A": rng.standard_normal((3, 32, 2)).astype(np.float32) * 2.0,
                                     "B": rng.standard_normal((3, 2, 32)).astype(np.float32) * 2.0}},
            "mlp": {"down_proj": {"A": rng.standard_normal((3, 64, 2)).astype(np.float32) * 2.0,
                                  "B": rng.standard_normal((3, 2, 32)).astype(np.float32) * 2.0}}}
    flora.export_adapter(lora, cfg, str(directory), str(base))
    return lora, cfg


def _merged_torch(setup, lora, cfg):
    """The adapter merged into a copy of the torch model: W += scale * B^T-layout (PEFT's rule)."""
    import copy
    tm = copy.deepcopy(setup["tm"])
    with torch.no_grad():
        for i, layer in enumerate(tm.model.layers):
            layer.self_attn.q_proj.weight += cfg.scale * torch.tensor(
                lora["self_attn"]["q_proj"]["B"][i].T @ lora["self_attn"]["q_proj"]["A"][i].T)
            layer.mlp.down_proj.weight += cfg.scale * torch.tensor(
                lora["mlp"]["down_proj"]["B"][i].T @ lora["mlp"]["down_proj"]["A"][i].T)
    return tm


def test_adapter_and_training_output_dir(setup, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(setup["model"])
    outdir = tmp_path / "train_out"
    _adapter(setup, outdir / "checkpoint-2", 1, setup["model"])
    lora, cfg = _adapter(setup, outdir / "checkpoint-10", 2, setup["model"])
    (outdir / "checkpoint-9").mkdir()  # an older, empty one: the largest N wins
    out = tmp_path / "ft.csv"
    r = run(setup, f"--model={outdir}", f"--output_path={out}", "--n_per_question=1")
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out, keep_default_na=False, dtype=str)
    merged = _merged_torch(setup, lora, cfg)
    for prompt, answer in zip(df["prompt"], df["answer"]):
        assert answer == hf_greedy(merged, tok, prompt)
    assert any(a != hf_greedy(setup["tm"], tok, p) for p, a in zip(df["prompt"], df["answer"]))


def assert_error(r, *fragments):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), lines[-1]


def test_bad_adapters_and_vectors(setup, tmp_path):
    out = tmp_path / "bad" / "x.csv"
    # an adapter whose base model is missing
    _adapter(setup, tmp_path / "orphan", 3, tmp_path / "no_such_base")
    assert_error(run(setup, f"--model={tmp_path / 'orphan'}", f"--output_path={out}"), "no_such_base",
                 "does not exist", "--base_model")
    # an adapter of another architecture (its base is wider than the model it is put on)
    other = tmp_path / "other"
    tiny_checkpoint(str(other), "llama", num_hidden_layers=3, hidden_size=48, intermediate_size=64)
    _adapter(setup, tmp_path / "narrow", 4, setup["model"])
    assert_error(run(setup, f"--model={tmp_path / 'narrow'}", f"--base_model={other}", f"--output_path={out}"),
                 "another architecture")
    # a vector of another depth (another width: tests/test_project_runner.py)
    for shape in ((6, 32),):
        vpath = tmp_path / f"v{shape[0]}x{shape[1]}.npy"
        np.save(vpath, np.ones(shape, np.float32))
        assert_error(run(setup, f"--model={setup['model']}", f"--output_path={out}", f"--vector={vpath}",
                         "--layers=1", "--coefs=1"), "shape", f"({shape[0]}, {shape[1]})")
    assert not out.parent.exists() or not any(out.parent.iterdir())
