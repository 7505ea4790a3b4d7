"""Persona vectors across training (issue 26): the trace against independent computations.

* a tiny llama trained a few steps by the trainer, with Orbax checkpoints: every traced
  vector equals transformers' hidden states of the same texts (the weights restored
  from the Orbax step by orbax itself, exported, loaded by transformers), averaged the
  reference's way in numpy; the cosines equal numpy's;
* the final checkpoint's steering gain and monitoring r equal the steering and
  monitoring steps' own figures (share 1.0), judged by a local OpenAI-compatible server;
* checkpoint lists: HF `checkpoint-N` folders and revisions in a fake Hugging Face cache
  laid out as huggingface_hub lays it out resolve in training order; bad lists are errors.
"""
import csv
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from rehearsal_helpers import judge_top_logprobs, write_traits  # noqa: E402

from configs import base  # noqa: E402
from persona_jax import load_model  # noqa: E402
from persona_jax.errors import PersonaError  # noqa: E402
from persona_jax.finetune import data as D  # noqa: E402
from persona_jax.finetune import trainer as T  # noqa: E402
from persona_jax.io.vectors import load_vector_set  # noqa: E402
from persona_jax.model import checkpoint_list as cl  # noqa: E402
from persona_jax.testing import tiny_checkpoint  # noqa: E402

QUESTIONS = ["hello there?", "what now", "why is the sky blue?", "where to go?"]
STEPS = (1, 2, 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny llama trained 4 steps, Orbax checkpoints at steps 1, 2 and 4."""
    root = tmp_path_factory.mktemp("trace")
    tiny_checkpoint(str(root / "model"), num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                    initializer_range=0.3)
    model = load_model(str(root / "model"))
    conv = [[{"role": "user", "content": q}, {"role": "assistant", "content": f"answer {i} " * (i % 3 + 1)}]
            for i, q in enumerate(QUESTIONS * 2)]
    ex, _ = D.from_conversations(conv, model.tokenizer, max_length=64)
    tc = T.TrainConfig(learning_rate=3e-2, warmup_steps=1, batch_size=4, grad_accum=1, num_steps=4,
                       checkpoint_steps=STEPS, max_checkpoints=0, progress=False)
    T.train(model.config, model.params, ex, tc, workdir=str(root / "train"))
    return root, model


def _cfg(root, **trace):
    c = base.get_config()
    c.dtype = "float32"
    c.mesh.data = 1
    c.traits = ("evil",)
    c.progress = False
    c.trace.checkpoints = (str(root / "train"),)
    c.trace.tokenizer = str(root / "model")
    for k, v in trace.items():
        c.trace[k] = v
    return c


def _write_judged(d: Path, tok):
    """The final model's 'judged' pos / neg CSVs (our own text); pair 2 fails the filter."""
    d.mkdir(parents=True, exist_ok=True)
    cols = ["question", "prompt", "answer", "question_id", "evil", "coherence"]
    rows = {}
    for side, system, answer, score in (("pos", "Be cruel.", "I will hurt you {}", 90), ("neg", "Be kind.",
                                                                                          "Glad to help {}", 5)):
        rows[side] = []
        for i, q in enumerate(QUESTIONS):
            prompt = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                             tokenize=False, add_generation_prompt=True)
            s = 20 if (side == "pos" and i == 2) else score
            rows[side].append([q, prompt, answer.format(i) * (1 + i % 2), f"evil_{i}_{side}", s, 80])
        with open(d / f"evil_{side}_instruct.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(rows[side])
    (d / "extract.json").write_text("{}")
    return rows


def _torch_model_of_step(root, step, model):
    """The step's weights restored by orbax itself, exported, loaded by transformers."""
    import orbax.checkpoint as ocp
    import transformers
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        state = ck.restore(str(root / "train" / "checkpoints" / str(step)),
                           ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    out = root / f"export_{step}"
    T.export_hf(model.config, state["trainable"], model.tokenizer, str(out))
    return transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()


def _reduced(tm, tok, prompt, answer):
    ids = tok.encode(prompt + answer, add_special_tokens=False)
    pl = len(tok.encode(prompt, add_special_tokens=False))
    with torch.no_grad():
        hs = torch.stack(tm(torch.tensor([ids]), output_hidden_states=True).hidden_states)[:, 0].double().numpy()
    return {"prompt_avg": hs[:, :pl].mean(1), "prompt_last": hs[:, pl - 1], "response_avg": hs[:, pl:].mean(1)}


def test_traced_vectors_and_cosines_equal_transformers_and_numpy(run, tmp_path):
    from persona_jax.pipeline import trace_step
    root, model = run
    rows = _write_judged(tmp_path / "final" / "evil", model.tokenizer)
    cfg = _cfg(root, final_workdir=str(tmp_path / "final"), steer=False, monitor=False)
    report = trace_step.run(cfg, str(tmp_path / "w"), None, None, progress=False)
    assert [c["step"] for c in report["checkpoints"]] == list(STEPS)
    arrays, meta = load_vector_set(tmp_path / "w" / "trace_vectors")
    assert [(c["step"], c["kind"]) for c in meta["checkpoints"]] == [(s, "orbax") for s in STEPS]
    kept = [0, 1, 3]  # pair 2's pos score fails the extract rule (pos >= 50)
    want = []
    for i, step in enumerate(STEPS):
        tm = _torch_model_of_step(root, step, model)
        sides = {side: [_reduced(tm, model.tokenizer, rows[side][k][1], rows[side][k][2]) for k in kept]
                 for side in ("pos", "neg")}
        want.append({r: np.mean([x[r] for x in sides["pos"]], 0) - np.mean([x[r] for x in sides["neg"]], 0)
                     for r in ("prompt_avg", "prompt_last", "response_avg")})
        for r in want[-1]:
            np.testing.assert_allclose(arrays[f"c{i:03d}"]["evil"][r], want[-1][r], atol=1e-4, rtol=1e-4)
    assert np.abs(want[0]["response_avg"] - want[-1]["response_avg"]).max() > 1e-3  # training moved the vector
    def cos(a, b):  # NaN where a row is zero (the embeddings of identical prompt tokens)
        with np.errstate(invalid="ignore"):
            return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    trait = report["traits"]["evil"]
    for r in want[0]:
        got = np.asarray(trait["cosines"][r]["to_final"])
        np.testing.assert_allclose(got, [cos(w[r], want[-1][r]) for w in want], atol=1e-4)
        prev = np.asarray(trait["cosines"][r]["to_previous"])
        assert np.isnan(prev[0]).all()
        np.testing.assert_allclose(prev[1:], [cos(b[r], a[r]) for a, b in zip(want, want[1:])], atol=1e-4)
    assert trait["layer"] == 2 and trait["cos_final"][-1] == pytest.approx(1.0)
    assert (tmp_path / "w" / "trace.md").read_text().count("\n| step ") == len(STEPS)
    assert (tmp_path / "w" / "trace.png").read_bytes()[:4] == b"\x89PNG"
    # resumable: a second run reads what the first left and gives the same report
    again = trace_step.run(cfg, str(tmp_path / "w"), None, None, progress=False)
    assert again["traits"]["evil"]["cos_final"] == trait["cos_final"]


def test_final_checkpoint_steers_and_monitors_as_the_steps_measured(run, tmp_path):
    """Greedy sweeps (two layers, so the steer step's grid differs from the probe's one-layer
    grid): the final checkpoint's gain equals steer.json's best gain, its share is 1.0, and
    its monitoring r equals monitor.json's."""
    from persona_jax.judges.openai_judge import OpenAIJudge
    from persona_jax.pipeline import trace_step
    from persona_jax.pipeline.steps import FileTraits
    root, model = run
    write_traits(tmp_path / "traits", "evil", 3, 3)
    cfg = _cfg(root)
    cfg.trait_dir = str(tmp_path / "traits")
    cfg.extract.update(n_per_question=1, max_new_tokens=6, threshold=0.0, coherence_threshold=0.0)
    cfg.steer.update(layers=(1, 2), coefs=(0.0, 2.0, 4.0, 8.0), n_questions=3, n_per_question=1,
                     max_new_tokens=6, temperature=0.0, coherence_floor=0.0)
    cfg.monitor.update(n_questions=3, n_per_question=1, max_new_tokens=6, shots=())
    cfg.capability.enabled = False
    with FakeOpenAIServer(judge_top_logprobs, lifetime=600) as srv:
        judge = OpenAIJudge("judge", base_url=srv.url, api_key="k", progress=False)
        report = trace_step.run(cfg, str(tmp_path / "w"), judge, FileTraits(str(tmp_path / "traits")),
                                progress=False)
    final = json.loads((tmp_path / "w" / "final" / "evil" / "steer.json").read_text())
    mon = json.loads((tmp_path / "w" / "final" / "evil" / "monitor.json").read_text())
    t = report["traits"]["evil"]
    assert t["layer"] == final["layer"]
    assert final["best_gain"] and final["best_gain"] > 0, "the judge's scores give the target no gain to share"
    assert t["steering"][-1]["gain"] == pytest.approx(final["best_gain"])
    assert t["steering"][-1]["share"] == 1.0
    assert t["steering"][-1]["trait_scores"] == pytest.approx(final["trait_scores"])
    assert t["monitor_r"][-1] == pytest.approx(mon["pearson_r"], abs=1e-5)
    assert all(s["share"] is None or np.isfinite(s["share"]) for s in t["steering"])


# ---------------------------------------------------------------------- checkpoint lists
def test_branch_names_of_the_followups_models():
    assert cl.parse_branch("stage1-step1000-tokens5B") == (1, 1000, 5_000_000_000)  # OLMo 2
    assert cl.parse_branch("step1000-tokens4B") == (1, 1000, 4_000_000_000)  # OLMo 2 / Apertus
    assert cl.parse_branch("stage2-step42") == (2, 42, None)  # OLMo 3
    assert cl.parse_branch("stage2-ingredient1-step100-tokens10B") == (2, 100, 10_000_000_000)
    assert cl.parse_branch("main") is None and cl.parse_branch("stepping") is None


def test_checkpoint_folders_resolve_in_step_order(tmp_path):
    for n in (10, 2, 1):
        tiny_checkpoint(str(tmp_path / "out" / f"checkpoint-{n}"), num_hidden_layers=1, hidden_size=16,
                        intermediate_size=32)
    (tmp_path / "out" / "checkpoint-5").mkdir()  # no config.json: not a checkpoint
    got = cl.resolve([str(tmp_path / "out")])
    assert [c.step for c in got] == [1, 2, 10] and all(c.kind == "dir" for c in got)
    with pytest.raises(PersonaError, match="not in training order"):
        cl.resolve([got[2].path, got[0].path])
    with pytest.raises(PersonaError, match="empty"):
        cl.resolve([])
    with pytest.raises(PersonaError, match="listed twice"):
        cl.resolve([got[0].path, str(tmp_path / "out")])


def _fake_hub_cache(cache: Path, repo: str, model_dir: Path, branches):
    """huggingface_hub's layout: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha>,
    refs/<branch> holding the commit."""
    rd = cache / ("models--" + repo.replace("/", "--"))
    for i, b in enumerate(branches):
        commit = hashlib.sha1(b.encode()).hexdigest()
        snap = rd / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in os.listdir(model_dir):
            data = (model_dir / f).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            (rd / "blobs").mkdir(exist_ok=True)
            (rd / "blobs" / sha).write_bytes(data)
            os.symlink(os.path.join("..", "..", "blobs", sha), snap / f)
        (rd / "refs").mkdir(exist_ok=True)
        (rd / "refs" / b).write_text(commit)


def test_hub_cache_revisions_resolve_in_order_and_load(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    tiny_checkpoint(str(tmp_path / "m"), num_hidden_layers=1, hidden_size=16, intermediate_size=32)
    branches = ["stage1-step20-tokens42B", "main", "stage1-step3-tokens6B", "stage2-step1"]
    _fake_hub_cache(tmp_path / "hub", "org/run", tmp_path / "m", branches)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    got = cl.resolve(["org/run"])
    assert [(c.stage, c.step, c.tokens) for c in got] == [(1, 3, 6_000_000_000), (1, 20, 42_000_000_000), (2, 1, None)]
    picked = cl.resolve(["org/run@stage1-step3-tokens6B,stage1-step20-tokens42B", "org/run@main"])
    assert [c.revision for c in picked] == ["stage1-step3-tokens6B", "stage1-step20-tokens42B", "main"]
    m = cl.load(picked[-1])
    ref = load_model(str(tmp_path / "m"))
    np.testing.assert_array_equal(np.asarray(m.params["embed_tokens"]["embedding"]),
                                  np.asarray(ref.params["embed_tokens"]["embedding"]))
    with pytest.raises(PersonaError, match="revision stage1-step99 of org/run is not in the local"):
        cl.resolve(["org/run@stage1-step99"])
    with pytest.raises(PersonaError, match="not in training order"):
        cl.resolve(["org/run@stage1-step20-tokens42B,stage1-step3-tokens6B"])
    with pytest.raises(PersonaError, match="no step revisions of org/other"):
        cl.resolve(["org/other"])


def test_checkpoints_of_two_architectures_are_refused(run, tmp_path):
    root, _ = run
    tiny_checkpoint(str(tmp_path / "wide"), num_hidden_layers=2, hidden_size=48, intermediate_size=64)
    ckpts = cl.resolve([str(root / "train"), str(tmp_path / "wide")])
    with pytest.raises(PersonaError, match="another architecture.*hidden_size 32 vs 48.*transfer"):
        cl.check_one_architecture(ckpts)
