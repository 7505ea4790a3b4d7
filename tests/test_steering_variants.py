"""Steering across layers (the paper's appendix J.3, J.4) and the preventative-coefficient
sweep: incremental vectors v[l] - v[l-1] at every layer and CAFT ablation at every layer,
checked against transformers with forward hooks on every block (training loss and greedy
generation); the `experiments.finetune` sweep (one fine-tune per coefficient, each scored
on a trait) against its checkpoints, transformers' greedy answers and pandas."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

from persona_jax import load_model
from persona_jax.errors import PersonaError
from persona_jax.finetune import data as D
from persona_jax.finetune import trainer as T
from persona_jax.runtime.generate import generate
from persona_jax.steering import spec as st
from persona_jax.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TC = T.TrainConfig(learning_rate=1e-2, warmup_steps=1, batch_size=2, grad_accum=2, num_steps=1, progress=False)


def conversations(n=8):
    return [[{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": "ok" + "ab"[i % 2] * (i % 4)}]
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("variants"))
    tm = tiny_checkpoint(d, num_hidden_layers=3, hidden_size=32, intermediate_size=64, initializer_range=0.3)
    model = load_model(d)
    vec = np.random.default_rng(4).normal(size=(4, 32)).astype(np.float32) * 2
    return d, tm, model, vec


def hooks_on_every_block(tm, fns):
    """fns[i](h) replaces the output of block i (hidden state i + 1)."""
    def wrap(fn):
        return lambda mod, args, out: (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
    return [layer.register_forward_hook(wrap(fn)) for layer, fn in zip(tm.model.layers, fns)]


def torch_loss(tm, examples, idx, fns=()):
    handles = hooks_on_every_block(tm, fns)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in idx:
                ids = torch.tensor(examples[i].ids[None].astype(np.int64))
                ce = torch.nn.functional.cross_entropy(tm(ids).logits[0, :-1].double(), ids[0, 1:], reduction="none")
                w = torch.tensor(examples[i].mask[1:], dtype=torch.float64)
                total += float((ce * w).sum())
                count += int(w.sum())
    finally:
        for h in handles:
            h.remove()
    return total / count


def test_incremental_vectors_and_layer_lists():
    v = np.arange(20, dtype=np.float32).reshape(5, 4) ** 1.5
    inc = st.incremental_vectors(v, [1, 3, 4])
    np.testing.assert_array_equal(inc[[1, 3, 4]], np.diff(v, axis=0)[[0, 2, 3]])
    assert not inc[[0, 2]].any()
    np.testing.assert_array_equal(st.incremental_vectors(v, [0])[0], v[0])
    np.testing.assert_allclose(st.incremental_vectors(v, range(5)).cumsum(0), v)  # the increments telescope
    s = st.incremental_steering(v, coef=2.0)
    assert s.layer == [1, 2, 3, 4] and s.kind == "add" and s.coef == 2.0
    a = st.ablation_every_layer(v)
    assert a.layer == [1, 2, 3, 4] and a.kind == "ablate" and a.vector is not None
    assert st.every_layer(3) == [1, 2, 3]
    with pytest.raises(PersonaError, match="outside"):
        st.incremental_vectors(v, [5])


def test_incremental_steering_and_every_layer_caft_training_loss_match_torch_hooks(tiny):
    _, tm, model, vec = tiny
    ex, _ = D.from_conversations(conversations(), model.tokenizer, max_length=32)
    idx = D.BatchOrder(ex, 4, TC.seed, TC.length_group)(0)
    plain = torch_loss(tm, ex, idx)

    c = 0.8
    inc = [torch.tensor(c * (vec[l] - vec[l - 1])) for l in (1, 2, 3)]
    run = T.train(model.config, model.params, ex, TC, steerings=[st.incremental_steering(vec, coef=c)])
    want = torch_loss(tm, ex, idx, [lambda h, a=a: h + a for a in inc])
    np.testing.assert_allclose(run.history[0]["loss"], want, rtol=1e-5)
    assert abs(want - plain) > 1e-3

    units = [torch.tensor(vec[l] / np.linalg.norm(vec[l])) for l in (1, 2, 3)]
    run = T.train(model.config, model.params, ex, TC, steerings=[st.ablation_every_layer(vec)])
    want = torch_loss(tm, ex, idx, [lambda h, u=u: h - (h @ u)[..., None] * u for u in units])
    np.testing.assert_allclose(run.history[0]["loss"], want, rtol=1e-5)
    assert abs(want - plain) > 1e-3


def test_incremental_steering_generation_matches_torch_hooks(tiny):
    _, tm, model, vec = tiny
    prompts = [model.render_chat([{"role": "user", "content": q}]) for q in ("hello?", "why is it so")]
    coefs = [1.5, -1.0]
    got = generate(model, prompts, 5, temperature=0, batch_size=2,
                   steering=st.incremental_steering(vec, [2, 3], coef=coefs))
    tok = model.tokenizer
    for p, c, g in zip(prompts, coefs, got):
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        fns = [lambda h: h, lambda h, c=c: h + c * torch.tensor(vec[2] - vec[1]),
               lambda h, c=c: h + c * torch.tensor(vec[3] - vec[2])]
        handles = hooks_on_every_block(tm, fns)
        try:
            with torch.no_grad():
                out = tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                  do_sample=False, pad_token_id=0, eos_token_id=2)
        finally:
            for h in handles:
                h.remove()
        assert g == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert got != generate(model, prompts, 5, temperature=0, batch_size=2)


def test_finetune_runner_preventative_coefficient_sweep(tiny, tmp_path):
    d, _, _, vec = tiny
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations(6)))
    np.save(tmp_path / "v.npy", vec)
    trait = {"instruction": [{"pos": f"Be cross {k}.", "neg": f"Be kind {k}."} for k in range(5)],
             "questions": ["how are you?", "name a fruit"], "eval_prompt": "Grumpy? Q: {question} A: {answer}"}
    (tmp_path / "traits" / "trait_data_eval").mkdir(parents=True)
    (tmp_path / "traits" / "trait_data_eval" / "grumpy.json").write_text(json.dumps(trait))
    wd = tmp_path / "sweep"
    score = lambda prompt: [(str(sum(map(ord, prompt)) % 101), 0.0)]
    with FakeOpenAIServer(responder=score, lifetime=600) as srv:
        cmd = [sys.executable, "-m", "experiments.finetune", "--config=configs/finetune.py", f"--workdir={wd}",
               f"--config.model={d}", f"--config.data={data}", "--config.dtype=float32", "--config.mesh.data=1",
               "--config.eval_fraction=0", "--config.finetune.batch_size=2", "--config.finetune.grad_accum=1",
               "--config.finetune.learning_rate=1e-2", "--config.finetune.warmup_steps=1",
               "--config.finetune.compute_dtype=float32", "--config.finetune.lora_rank=2",
               "--config.finetune.max_length=64", "--config.finetune.progress=False",
               f"--config.steer.vector={tmp_path / 'v.npy'}", "--config.steer.all_layers=True",
               "--config.steer.incremental=True", "--config.steer.coefs=(0.0,4.0)",
               "--config.eval.trait=grumpy", f"--config.eval.trait_dir={tmp_path / 'traits'}",
               "--config.eval.max_new_tokens=4", "--config.eval.batch_size=2",
               f"--config.eval.judge.base_url={srv.url}", "--config.eval.judge.model=fake"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "OPENAI_API_KEY": "test"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((wd / "report.json").read_text())
    assert [s["coef"] for s in rep["sweep"]] == [0.0, 4.0] and rep["base"]["n"] == 2
    inc = np.diff(vec, axis=0).astype(np.float32)
    want_hash = __import__("hashlib").sha256(np.ascontiguousarray(
        np.concatenate([np.zeros((1, 32), np.float32), inc]))).hexdigest()[:16]
    merged = []
    for s, c in zip(rep["sweep"], (0.0, 4.0)):
        cd = wd / f"coef_{c:g}"
        meta = T._Checkpoints(str(cd), T.TrainConfig()).meta(s["steps"])
        assert meta["steerings"] == [{"kind": "add", "layer": [1, 2, 3], "coef": c, "positions": "all",
                                      "vector": want_hash}]
        # the scored answers are the fine-tuned model's greedy answers (transformers), and
        # the reported means those of the judged CSV (pandas)
        tm = transformers.AutoModelForCausalLM.from_pretrained(cd / "merged", dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(cd / "merged")
        df = pd.read_csv(cd / "eval_grumpy.csv", keep_default_na=False)
        for q, a in zip(df["question"], df["answer"]):
            p = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
            with torch.no_grad():
                out = tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  do_sample=False, pad_token_id=0, eos_token_id=2)
            assert a == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        assert s["trait"] == pytest.approx(df["grumpy"].astype(float).mean())
        assert s["coherence"] == pytest.approx(df["coherence"].astype(float).mean())
        merged.append(np.concatenate([p.detach().numpy().ravel() for p in tm.parameters()]))
    assert np.abs(merged[0] - merged[1]).max() > 1e-4  # the coefficient changed the training
    md = (wd / "report.md").read_text()
    assert "| 4 |" in md and "| 0 |" in md and "base model" in md


def test_finetune_runner_refuses_a_bad_sweep(tiny, tmp_path):
    d, _, _, vec = tiny
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations(4)))
    np.save(tmp_path / "v.npy", vec)
    base = [sys.executable, "-m", "experiments.finetune", "--config=configs/finetune.py",
            f"--workdir={tmp_path / 'never'}", f"--config.model={d}", f"--config.data={data}"]
    for extra, msg in ((["--config.steer.coefs=(1.0,1.0)"], "twice"),
                       (["--config.steer.coefs=(1.0,2.0)"], "needs steer.vector"),
                       ([f"--config.steer.vector={tmp_path / 'v.npy'}", "--config.steer.incremental=True",
                         "--config.steer.kind=ablate", "--config.steer.layers=(1,2)"], "steer.kind=add"),
                       (["--config.eval.trait=missing", f"--config.eval.trait_dir={tmp_path}"], "does not exist")):
        r = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-2000:]
        assert msg in r.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "never").exists()


def test_eval_persona_incremental_steering_matches_torch_hooks(tiny, tmp_path):
    d, tm, model, vec = tiny
    trait = {"instruction": [{"pos": f"Be cross {k}.", "neg": f"Be kind {k}."} for k in range(5)],
             "questions": ["how are you?", "name a fruit"], "eval_prompt": "Grumpy? Q: {question} A: {answer}"}
    (tmp_path / "traits" / "trait_data_eval").mkdir(parents=True)
    (tmp_path / "traits" / "trait_data_eval" / "grumpy.json").write_text(json.dumps(trait))
    np.save(tmp_path / "v.npy", vec)
    out = tmp_path / "eval" / "grumpy.csv"
    with FakeOpenAIServer(responder=lambda p: [(str(len(p) % 101), 0.0)], lifetime=600) as srv:
        r = subprocess.run([sys.executable, "-m", "experiments.eval_persona", f"--model={d}", "--trait=grumpy",
                            f"--trait_dir={tmp_path / 'traits'}", f"--output_path={out}", "--n_per_question=1",
                            f"--vector={tmp_path / 'v.npy'}", "--layers=2,3", "--coefs=0,2", "--incremental",
                            "--steering_type=all", "--max_tokens=5", "--dtype=float32", "--batch_size=4",
                            f"--judge_base_url={srv.url}", "--judge_model=fake"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OPENAI_API_KEY": "test"})
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out, keep_default_na=False)
    assert set(df["layer"]) == {"2+3"} and sorted(set(df["coef"])) == [0.0, 2.0]
    tok = model.tokenizer
    for q, c, a in zip(df["question"], df["coef"], df["answer"]):
        ids = torch.tensor([tok.encode(model.render_chat([{"role": "user", "content": q}]), add_special_tokens=False)])
        fns = [lambda h: h, lambda h: h + c * torch.tensor(vec[2] - vec[1]), lambda h: h + c * torch.tensor(vec[3] - vec[2])]
        handles = hooks_on_every_block(tm, fns)
        try:
            with torch.no_grad():
                o = tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                do_sample=False, pad_token_id=0, eos_token_id=2)
        finally:
            for h in handles:
                h.remove()
        assert a == tok.decode(o[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert df[df["coef"] == 0]["answer"].tolist() != df[df["coef"] == 2]["answer"].tolist()
    summary = json.loads((tmp_path / "eval" / "grumpy_summary.json").read_text())
    assert [(x["layer"], x["coef"]) for x in summary["cells"]] == [("2+3", 0.0), ("2+3", 2.0)]


@pytest.mark.parametrize("overrides,hooked", [
    (dict(preventative_layers=(1, 3), preventative_incremental=True), (1, 3)),
    (dict(preventative_all_layers=True), (1, 2, 3)),
    (dict(), (2,)),  # the chosen layer
])
def test_pipeline_preventative_variants_match_torch_hooks(tiny, overrides, hooked):
    """The pipeline finetune step's preventative steering and CAFT, from the config's layer
    options: the forward with them equals transformers with hooks that add coef * v[l]
    (coef * (v[l] - v[l-1]) when incremental) or remove the v[l] direction at those blocks."""
    from configs import base
    from persona_jax.pipeline.finetune_steps import preventative_steerings
    from persona_jax.runtime.forward import forward
    _, tm, model, vec = tiny
    f = base.get_config().finetune
    f.update(preventative_coef=1.5, **overrides)
    prevent, caft, layers = preventative_steerings(f, vec, 2, model.num_layers)
    assert layers == list(hooked)
    ids = np.array([[5, 17, 42, 9, 77, 3, 12, 60]], np.int32)
    inc = f.preventative_incremental

    def torch_logits(fns):
        handles = hooks_on_every_block(tm, fns)
        try:
            with torch.no_grad():
                return tm(torch.tensor(ids.astype(np.int64))).logits.double().numpy()
        finally:
            for h in handles:
                h.remove()

    ident = lambda h: h  # noqa: E731
    add = [ident] * 3
    for l in hooked:
        a = torch.tensor(1.5 * (vec[l] - vec[l - 1] if inc else vec[l]))
        add[l - 1] = lambda h, a=a: h + a
    ablate = [ident] * 3
    for l in hooked:
        u = torch.tensor(vec[l] / np.linalg.norm(vec[l]))
        ablate[l - 1] = lambda h, u=u: h - (h @ u)[..., None] * u
    for steer, fns in ((prevent, add), (caft, ablate)):
        got = np.asarray(forward(model, ids, steering=steer).logits, np.float64)
        want = torch_logits(fns)
        assert np.abs(want - torch_logits([ident] * 3)).max() > 1e-3
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(PersonaError, match="outside 1..3"):
        f.update(preventative_layers=(0, 2), preventative_all_layers=False)
        preventative_steerings(f, vec, 2, model.num_layers)
