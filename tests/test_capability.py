"""Capability evaluation (METHOD.md 11, issue 18.1) against independent computations.

The reference is transformers (PyTorch) on the same tiny random checkpoint: letter
log-probabilities are `log_softmax` of the last prompt position's logits, choice
log-likelihoods the sum of the reply tokens' log-probabilities, steering a forward hook
that adds c * v[l] to block l-1's output at the positions generation would steer. The
prompt text is checked against lm-eval's MMLU format written out here.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.errors import PersonaError
from persona_jax.method import capability as cap
from persona_jax.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

ITEMS = [
    cap.MCItem("What is 2 + 2?", ["3", "4", "five", "22"], 1, "elementary_mathematics"),
    cap.MCItem("  Which one is a colour?  ", ["red", "dog"], 0, "misc"),
    cap.MCItem("Pick the longest word.", ["a", "ab", "abcdefghij"], 2, ""),
    cap.MCItem("Capital of France?", ["Rome", "Paris", "Berlin", "Oslo"], 1, "geography"),
    cap.MCItem("Opposite of up?", ["left", "down", "in", "out"], 1, "misc"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cap_llama")
    torch_model = tiny_checkpoint(str(d), "llama", seed=5)
    return pj.load_model(str(d)), torch_model


@pytest.fixture(scope="module")
def vec(tiny):
    model, _ = tiny
    return np.random.default_rng(3).standard_normal((model.num_layers + 1, model.hidden_size)).astype(np.float32)


def test_mmlu_prompt_is_lm_eval_format():
    want = ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
            "What is 2 + 2?\nA. 3\nB. 4\nC. five\nD. 22\nAnswer:")
    assert cap.mmlu_prompt(ITEMS[0]) == want
    assert cap.mmlu_prompt(ITEMS[2]) == "Pick the longest word.\nA. a\nB. ab\nC. abcdefghij\nAnswer:"


def hf_logprobs(torch_model, ids, hook=None):
    """[T, V] float64 log-softmax of transformers' logits for one sequence; `hook(l, fn)`
    pairs add fn(h) to the output of block l-1."""
    handles = []
    for layer, fn in hook or ():
        def h(module, args, out, fn=fn):
            return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
        handles.append(torch_model.model.layers[layer - 1].register_forward_hook(h))
    try:
        with torch.no_grad():
            logits = torch_model(torch.tensor([ids])).logits[0].double()
    finally:
        for x in handles:
            x.remove()
    return torch.log_softmax(logits, -1).numpy()


def reference(model, torch_model, items, chat=True, hook_for=None):
    """Letter log-probs and choice log-likelihood sums per item, from transformers.

    hook_for(prompt_len) -> hooks, or None."""
    tok = model.tokenizer
    letters, sums = [], []
    for it in items:
        text = cap.mmlu_prompt(it)
        prompt = (tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True) if chat else tok.bos_token + text)
        p_ids = tok.encode(prompt, add_special_tokens=False)
        delim = "" if chat else " "
        lp_letters = []
        for k in range(len(it.choices)):
            ids = tok.encode(prompt + delim + "ABCD"[k], add_special_tokens=False)
            lp = hf_logprobs(torch_model, ids, hook_for(len(p_ids)) if hook_for else None)
            lp_letters.append(sum(lp[t - 1, ids[t]] for t in range(len(p_ids), len(ids))))
        letters.append(lp_letters)
        s = []
        for c in it.choices:
            ids = tok.encode(prompt + delim + c, add_special_tokens=False)
            lp = hf_logprobs(torch_model, ids, hook_for(len(p_ids)) if hook_for else None)
            s.append(sum(lp[t - 1, ids[t]] for t in range(len(p_ids), len(ids))))
        sums.append(s)
    return letters, sums


def check_against(res, items, letters, sums, n_tokens):
    for row in res.rows:
        i = row["index"]
        np.testing.assert_allclose(row["letter_logprobs"], letters[i], atol=2e-4)
        np.testing.assert_allclose(row["choice_logprobs"], sums[i], atol=5e-4)
        assert row["choice_tokens"] == n_tokens[i]
    acc_letter = 100 * np.mean([int(np.argmax(letters[i])) == it.answer for i, it in enumerate(items)])
    acc_choice = 100 * np.mean([int(np.argmax(np.asarray(sums[i]) / n_tokens[i])) == it.answer
                                for i, it in enumerate(items)])
    acc_raw = 100 * np.mean([int(np.argmax(sums[i])) == it.answer for i, it in enumerate(items)])
    assert res.accuracy["letter"][0, 0] == pytest.approx(acc_letter)
    assert res.accuracy["choice"][0, 0] == pytest.approx(acc_choice)
    assert res.accuracy["choice_raw"][0, 0] == pytest.approx(acc_raw)


def test_scores_match_transformers_chat(tiny):
    """Chat template: the letter is one token after the generation prompt (the fast path,
    one forward per item); choices are the replies' token log-likelihoods."""
    model, torch_model = tiny
    res = cap.evaluate(model, ITEMS, scorings=cap.SCORINGS, batch_size=2)
    letters, sums = reference(model, torch_model, ITEMS)
    assert res.letter_tokens == [[model.tokenizer.convert_tokens_to_ids(x)] for x in "ABCD"]
    check_against(res, ITEMS, letters, sums, [[len(c) for c in it.choices] for it in ITEMS])


def test_scores_match_transformers_raw_text(tiny):
    """No chat template: lm-eval's " A" continuation, two tokens with this character
    tokenizer (the multi-token letter path), after the BOS-prefixed prompt."""
    model, torch_model = tiny
    res = cap.evaluate(model, ITEMS[:3], scorings=cap.SCORINGS, chat=False, batch_size=4)
    letters, sums = reference(model, torch_model, ITEMS[:3], chat=False)
    assert res.letter_tokens == [model.tokenizer.encode(" " + x, add_special_tokens=False) for x in "ABCD"]
    check_against(res, ITEMS[:3], letters, sums, [[len(c) + 1 for c in it.choices] for it in ITEMS[:3]])


@pytest.mark.parametrize("positions", ["all", "response"])
def test_steered_scores_match_transformers_hooks(tiny, vec, positions):
    """Steering at layer 2 with c = 3: `all` adds at every position; `response` at the last
    prompt token and every reply token (what generating the reply would steer)."""
    model, torch_model = tiny
    layer, coef = 2, 3.0
    v = torch.tensor(vec[layer])

    def hook_for(prompt_len):
        def fn(h):
            h = h.clone()
            start = 0 if positions == "all" else prompt_len - 1
            h[:, start:] += coef * v
            return h
        return [(layer, fn)]

    items = ITEMS[:3]
    res = cap.evaluate(model, items, vec, [layer], [coef], positions=positions, scorings=cap.SCORINGS, batch_size=3)
    letters, sums = reference(model, torch_model, items, hook_for=hook_for)
    check_against(res, items, letters, sums, [[len(c) for c in it.choices] for it in items])
    plain = cap.evaluate(model, items, scorings=("letter",))
    assert not np.allclose(plain.rows[0]["letter_logprobs"], res.rows[0]["letter_logprobs"], atol=1e-2)


def test_sweep_in_one_call_equals_separate_calls(tiny, vec):
    """Layers x coefficients as per-row steering in one call (rows sorted and batched
    across settings) give each setting's scores of a call of its own."""
    model, _ = tiny
    layers, coefs = [1, 3], [0.0, -4.0]
    one = cap.evaluate(model, ITEMS, vec, layers, coefs, scorings=cap.SCORINGS, batch_size=8)
    assert one.accuracy["letter"].shape == (2, 2)
    for i, l in enumerate(layers):
        for j, c in enumerate(coefs):
            sep = cap.evaluate(model, ITEMS, vec, [l], [c], scorings=cap.SCORINGS, batch_size=3)
            got = [r for r in one.rows if r["layer"] == l and r["coef"] == c]
            assert [r["index"] for r in got] == list(range(len(ITEMS)))
            for a, b in zip(got, sep.rows):
                np.testing.assert_allclose(a["letter_logprobs"], b["letter_logprobs"], atol=1e-5)
                np.testing.assert_allclose(a["choice_logprobs"], b["choice_logprobs"], atol=1e-4)
            for s in cap.SCORINGS:
                assert one.accuracy[s][i, j] == sep.accuracy[s][0, 0]
    # the public scorer with one per-row-coefficient Steering (no per-row layers) agrees
    rows3 = [r for r in one.rows if r["layer"] == 3]
    prompts = [cap.render_prompt(model, ITEMS[r["index"]]) for r in rows3]
    p_ids, c_ids = cap.continuation_ids(model, prompts, [ITEMS[r["index"]].choices[0] for r in rows3])
    got = cap.score_continuations(model, p_ids, c_ids, pj.Steering(vec, layer=3, coef=[r["coef"] for r in rows3],
                                                                    positions="response"), batch_size=4)
    np.testing.assert_allclose(got, [r["choice_logprobs"][0] for r in rows3], atol=1e-4)
    # coefficient 0 is the unsteered model at every layer
    plain = cap.evaluate(model, ITEMS, scorings=("letter",))
    for r in one.rows:
        if r["coef"] == 0.0:
            np.testing.assert_allclose(r["letter_logprobs"], plain.rows[r["index"]]["letter_logprobs"], atol=1e-5)


def test_sweep_on_a_mesh_equals_single_device(tiny, vec, tmp_path_factory):
    model, _ = tiny
    meshed = pj.load_model(model.name, mesh=pj.make_mesh(data=4, model=2))
    a = cap.evaluate(model, ITEMS[:4], vec, [2], [5.0], scorings=("letter", "choice"), batch_size=8)
    b = cap.evaluate(meshed, ITEMS[:4], vec, [2], [5.0], scorings=("letter", "choice"), batch_size=8)
    for x, y in zip(a.rows, b.rows):
        np.testing.assert_allclose(x["letter_logprobs"], y["letter_logprobs"], atol=1e-4)
        np.testing.assert_allclose(x["choice_logprobs"], y["choice_logprobs"], atol=1e-3)


# ------------------------------------------------------------------------------ readers
RECORDS = [
    {"question": "Q one?", "choices": ["a", "b, with a comma", "c \"quoted\"", "d"], "answer": 2, "subject": "s1"},
    {"question": "Q two?", "choices": ["x", "y"], "answer": 0, "subject": "s2"},
]


def expected_items():
    return [cap.MCItem(r["question"], r["choices"], r["answer"], r["subject"]) for r in RECORDS]


def test_read_jsonl(tmp_path):
    p = tmp_path / "items.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert cap.read_items(str(p)) == expected_items()
    assert cap.read_items(str(p), limit=1) == expected_items()[:1]
    # a letter answer is read as its index
    p.write_text(json.dumps({**RECORDS[0], "answer": "C"}) + "\n")
    assert cap.read_items(str(p))[0].answer == 2


def test_read_csv_written_by_pandas(tmp_path):
    import pandas as pd
    p = tmp_path / "items.csv"
    pd.DataFrame(RECORDS).to_csv(p, index=False)  # list cells as their Python repr
    assert cap.read_items(str(p)) == expected_items()
    frame = pd.DataFrame(RECORDS)
    frame["choices"] = frame["choices"].map(json.dumps)  # or as JSON lists
    frame.to_csv(p, index=False)
    assert cap.read_items(str(p)) == expected_items()


def test_read_parquet(tmp_path):
    import pandas as pd
    p = tmp_path / "items.parquet"
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(PersonaError, match="needs pyarrow"):
            cap.read_items(str(p))
        return
    pd.DataFrame(RECORDS).to_parquet(p)  # choices come back as numpy arrays
    assert cap.read_items(str(p)) == expected_items()


@pytest.mark.parametrize("record, match", [
    ({"question": "q", "choices": ["a", "b"]}, "lacks answer"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
    ({"question": "q", "choices": "not a list", "answer": 0}, "not a list"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "outside the 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": "Z"}, "outside the 2 choices"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "non-empty"),
])
def test_bad_items_are_user_errors(tmp_path, record, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(record) + "\n")
    with pytest.raises(PersonaError, match=match):
        cap.read_items(str(p))


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(PersonaError, match="does not exist"):
        cap.read_items(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(PersonaError, match="unknown multiple-choice file type"):
        cap.read_items(str(tmp_path / "x.txt"))
    (tmp_path / "y.jsonl").write_text("{not json\n")
    with pytest.raises(PersonaError, match="line 1 is not valid JSON"):
        cap.read_items(str(tmp_path / "y.jsonl"))


def test_letter_scoring_needs_the_options_shown(tiny):
    model, _ = tiny
    with pytest.raises(PersonaError, match="prompt_format='mmlu'"):
        cap.evaluate(model, ITEMS, prompt_format="question", scorings=("letter",))


# ------------------------------------------------------------------------ the organism
def test_organism_task_distractors_are_wrong_by_the_exact_judge():
    """Four replies about the asked object, one per question type: the exact judge gives
    the right one 100 and each distractor its wrong-answer score (on topic, x 0.8 because
    its first sentence answers another question type)."""
    from persona_jax.organism import judge as J
    from persona_jax.organism import language as L
    from persona_jax.organism.capability import task_items

    items = task_items(200, seed=1)
    assert items == task_items(200, seed=1) and items != task_items(200, seed=2)
    answers = [it.answer for it in items]
    assert set(answers) == {0, 1, 2, 3} and max(np.bincount(answers)) < 0.4 * len(items)
    for it in items:
        q = L.parse_question(it.question)
        assert L.question_split(it.question) == "eval" and len(set(it.choices)) == 4
        assert it.subject == q.topic
        assert J.coherence_score(it.question, it.choices[it.answer]) == 100.0
        frames = set()
        for k, c in enumerate(it.choices):
            first = L.parse_sentence(L.split_sentences(c)[0][0])
            assert first.obj == q.obj  # every reply is about the asked object
            frames.add(first.frame)
            if k != it.answer:
                assert J.coherence_score(it.question, c) == 100.0 * J.WRONG_ANSWER_FACTOR, (it.question, c)
        assert frames == set(L.ANSWER_FRAME.values())  # one reply per question type


def test_organism_answers_its_task_and_the_pipeline_hook(tmp_path):
    """The trained organism picks the right reply (>= 90%) unsteered; the steering step's
    hook returns one accuracy per coefficient, writes the CSV, and the report shows it."""
    from persona_jax.organism.provider import OrganismTraits, organism_path
    from persona_jax.pipeline import capability_step, steps
    from configs import organism as org_cfg

    model = pj.load_model(organism_path())
    cfg = org_cfg.get_config()
    with cfg.unlocked():
        cfg.capability.n_items = 40
    vec = np.random.default_rng(0).standard_normal((model.num_layers + 1, model.hidden_size)).astype(np.float32)
    (tmp_path / "evil").mkdir()
    coefs = [0.0, 3.0, 40.0]
    out = capability_step.steering_capability(model, OrganismTraits(), "evil", cfg, str(tmp_path), vec, 4, coefs)
    assert out["capability_scoring"] == cfg.capability.scoring and out["capability_n_items"] == 40
    assert len(out["capability"]) == len(coefs)
    assert out["capability"][0] >= 90
    assert out["capability"][-1] <= out["capability"][0] - 10  # a huge random push breaks it
    assert (tmp_path / "evil" / "capability.csv").exists()
    st = {"reduction": "response_avg", "layer": 4, "coefs": coefs, "trait_scores": [1.0, 2.0, 3.0],
          "coherence": [90.0, 80.0, 10.0], **out}
    steps.write_markdown({"model": "m", "traits": {"evil": {"steering": st, "layer": 4}}}, str(tmp_path / "r.md"))
    md = (tmp_path / "r.md").read_text()
    assert "| coef | trait | coherence | capability |" in md
    assert f"| 0 | 1.0 | 90.0 | {out['capability'][0]:.1f} |" in md
    with cfg.unlocked():
        cfg.capability.enabled = False
    assert capability_step.steering_capability(model, OrganismTraits(), "evil", cfg, str(tmp_path), vec, 4, coefs) == {}


# ------------------------------------------------------------------------------ runner
def test_runner_writes_csv_and_report(tiny, vec, tmp_path):
    model, _ = tiny
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps({"question": it.question, "choices": it.choices, "answer": it.answer,
                                          "subject": it.subject}) for it in ITEMS) + "\n")
    np.save(tmp_path / "v.npy", vec)
    wd = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.capability", f"--model={model.name}", f"--data={data}",
           f"--workdir={wd}", f"--vector={tmp_path / 'v.npy'}", "--layers=2", "--coefs=0,2", "--dtype=float32"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((wd / "report.json").read_text())
    want = cap.evaluate(model, ITEMS, vec, [2], [0.0, 2.0])
    assert report["layers"] == [2] and report["coefs"] == [0.0, 2.0]
    for s in ("letter", "choice"):
        np.testing.assert_allclose(report["accuracy"][s], want.accuracy[s])
    import pandas as pd
    frame = pd.read_csv(wd / "capability.csv")
    assert len(frame) == 2 * len(ITEMS)
    assert "| 2 | 2 |" in (wd / "report.md").read_text()


@pytest.mark.parametrize("args, match", [
    (["--data=/nonexistent/items.jsonl"], "does not exist"),
    (["--layers=3"], "need --vector"),
    (["--vector=v.npy"], "needs --layers"),
])
def test_runner_bad_input(tiny, tmp_path, args, match):
    model, _ = tiny
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    cmd = [sys.executable, "-m", "experiments.capability", f"--model={model.name}", f"--data={data}",
           f"--workdir={tmp_path / 'out'}"] + args
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1]
    assert not (tmp_path / "out" / "report.json").exists()
