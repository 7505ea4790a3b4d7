"""Data screening (METHOD.md 9, 11): the prompt_last stand-in and the generated projection
difference against numpy projections of `capture`'s hidden states and of transformers'
hidden states; thresholds against numpy's percentile; the `experiments.screen_data` runner
(corpus cut to two turns, prompt-length cap counted by the transformers tokenizer, judge
and delta filters, top / bottom / random k read back with pandas, dataset mean delta vs
shift against scipy); bad input: one error line, exit status 2, nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

import persona_jax as pj
from persona_jax.errors import PersonaError
from persona_jax.method import flagging as fl
from persona_jax.method import screening as sc
from persona_jax.runtime.capture import capture
from persona_jax.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAYER, NEW = 2, 5
TRAIT = "grumpy"


def conv(i, score=None, turns=1, system=False):
    """A conversation; the first reply carries the judge marker <<score>>."""
    msgs = [{"role": "system", "content": "be brief"}] if system else []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"q{i}.{t}" + "?" * (i % 5) * (t + 1)})
        reply = "ok" + " no" * (i % 4) + " yes" * ((i * 7) % 3) + (f" <<{score}>>" if score is not None and t == 0 else "")
        msgs.append({"role": "assistant", "content": reply})
    return {"messages": msgs}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("screen"))
    tm = tiny_checkpoint(d, "llama", initializer_range=0.3)
    vec = np.random.default_rng(5).standard_normal((4, 48)).astype(np.float32)
    return d, tm, pj.load_model(d, dtype="float32"), vec


def hf_proj(tm, tok, prompt, answer, u):
    """(proj of response_avg, proj of prompt_last) at LAYER from transformers' hidden states."""
    pl = len(tok.encode(prompt, add_special_tokens=False))
    ids = torch.tensor([tok.encode(prompt + answer, add_special_tokens=False)])
    with torch.no_grad():
        h = tm(ids, output_hidden_states=True).hidden_states[LAYER][0].double().numpy()
    return h[pl:].mean(0) @ u, h[pl - 1] @ u


def test_projection_differences_equal_numpy_projections_of_captured_states(tiny):
    _, tm, model, vec = tiny
    recs = [conv(i) for i in range(5)]
    res = fl.projection_difference(model, recs, vec, LAYER, max_new_tokens=NEW, batch_size=4, progress=False)
    approx = fl.prompt_last_difference(model, recs, vec, LAYER, batch_size=4, progress=False)
    prompts = [model.render_chat(r["messages"][:-1]) for r in recs]
    u = vec[LAYER].astype(np.float64) / np.linalg.norm(vec[LAYER].astype(np.float64))
    ds = capture(model, prompts, [r["messages"][-1]["content"] for r in recs])
    bs = capture(model, prompts, res.base_responses)
    assert len(ds["kept"]) == len(bs["kept"]) == 5
    want = ds["response_avg"][:, LAYER] @ u - bs["response_avg"][:, LAYER] @ u
    want_last = ds["response_avg"][:, LAYER] @ u - ds["prompt_last"][:, LAYER] @ u
    np.testing.assert_allclose(res.delta, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.delta_prompt_last, want_last, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(approx.delta, want_last, rtol=1e-6, atol=1e-6)
    assert approx.base_responses == [] and np.all(res.delta != res.delta_prompt_last)
    # and both against transformers' hidden states
    tok = model.tokenizer
    hf = np.array([hf_proj(tm, tok, p, r["messages"][-1]["content"], u) for p, r in zip(prompts, recs)])
    np.testing.assert_allclose(approx.delta, hf[:, 0] - hf[:, 1], rtol=1e-4, atol=1e-4)
    with pytest.raises(PersonaError, match="outside"):
        fl.prompt_last_difference(model, recs, vec, 9, progress=False)


def test_thresholds_filters_and_sets_against_numpy():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=40)
    ref[3] = np.nan
    assert sc.calibrate_threshold(ref, 95) == pytest.approx(np.percentile(ref[np.isfinite(ref)], 95), abs=0)
    assert sc.calibrate_threshold(ref, 50) == pytest.approx(np.median(ref[np.isfinite(ref)]))
    with pytest.raises(PersonaError, match="percentile"):
        sc.calibrate_threshold(ref, 0)
    with pytest.raises(PersonaError, match="no finite"):
        sc.calibrate_threshold([np.nan], 95)
    d, j = rng.normal(size=30), rng.uniform(0, 100, size=30)
    d[0], j[1] = np.nan, np.nan
    m = sc.filter_masks(d, j, 0.5, 60.0)
    np.testing.assert_array_equal(m["delta"], np.where(np.isnan(d), False, d > 0.5))
    np.testing.assert_array_equal(m["judge"], np.where(np.isnan(j), False, j > 60))
    np.testing.assert_array_equal(m["combined"], m["delta"] | m["judge"])
    assert sc.filter_summary(m)["combined"]["removed"] == int((m["delta"] | m["judge"]).sum())
    assert set(sc.filter_masks(d, None, 0.5, None)) == {"delta"}
    sets = sc.rank_sets(d, 4, seed=1)
    fin = np.flatnonzero(np.isfinite(d))
    np.testing.assert_array_equal(sets["top"], fin[np.argsort(d[fin])[::-1][:4]])
    np.testing.assert_array_equal(sets["bottom"], fin[np.argsort(d[fin])[:4]])
    assert len(set(sets["random"])) == 4 and set(sets["random"]) <= set(fin)
    with pytest.raises(PersonaError, match="k=30"):
        sc.rank_sets(d, 30)
    r = sc.shift_correlation({"a": 1.0, "b": 2.0, "c": 2.5, "x": 9.0}, {"a": 0.1, "b": 0.5, "c": 0.4})
    assert r["labels"] == ["a", "b", "c"]
    assert r["pearson_r"] == pytest.approx(sps.pearsonr([1, 2, 2.5], [0.1, 0.5, 0.4]).statistic)


def test_read_shifts_formats(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"a": 1.5, "b": -2}))
    assert sc.read_shifts(str(p)) == {"a": 1.5, "b": -2.0}
    p.write_text(json.dumps({"datasets": {"a": {"shift_response_avg": 3.0, "trait_change": 7.0},
                                          "b": {"shift_response_avg": None}}}))
    assert sc.read_shifts(str(p)) == {"a": 3.0} and sc.read_shifts(str(p), "trait_change") == {"a": 7.0}
    p.write_text(json.dumps({"traits": {"evil": {"finetune": {"datasets": {"n": {"shift_response_avg": 1.0}}}}}}))
    assert sc.read_shifts(str(p)) == {"n": 1.0}
    p.write_text(json.dumps({"a": "high"}))
    with pytest.raises(PersonaError, match="not a number"):
        sc.read_shifts(str(p))


def run(*args, srv=None):
    cmd = [sys.executable, "-m", "experiments.screen_data", "--dtype=float32", "--batch_size=4", *args]
    if srv is not None:
        cmd += [f"--judge_base_url={srv.url}", "--judge_model=fake"]
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    d, _, _, vec = tiny
    root = tmp_path_factory.mktemp("screen_files")
    # a corpus of multi-turn chats (some with a system prompt, one without a reply, some
    # with long prompts); a clean reference set; two datasets for the shift comparison
    corpus = [conv(i, score=(i * 37) % 100, turns=1 + i % 3, system=i % 4 == 0) for i in range(14)]
    corpus[5]["messages"][0]["content"] += " tell me more" * 3  # long prompts
    corpus[9]["messages"][-2]["content"] = "x" * 80  # a later turn, not part of the cut
    corpus.append({"messages": [{"role": "user", "content": "no reply"}]})
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    ref = [conv(100 + i, score=(i * 11) % 60) for i in range(8)]
    (root / "ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref))
    for k, lab in enumerate(("a", "b", "c")):
        (root / f"{lab}.jsonl").write_text("".join(json.dumps(conv(20 * k + i)) + "\n" for i in range(3 + k)))
    (root / "shifts.json").write_text(json.dumps({"datasets": {"a": {"shift_response_avg": 0.5},
                                                               "b": {"shift_response_avg": 2.0},
                                                               "c": {"shift_response_avg": -1.0}}}))
    trait = {"instruction": [{"pos": f"Be cross {k}.", "neg": f"Be kind {k}."} for k in range(5)],
             "questions": ["q one?", "q two?"], "eval_prompt": "Rate grumpiness. Q: {question} A: {answer}"}
    (root / "traits" / "trait_data_eval").mkdir(parents=True)
    (root / "traits" / "trait_data_eval" / f"{TRAIT}.json").write_text(json.dumps(trait))
    np.save(root / "v.npy", vec)
    return root, corpus, ref


def test_screen_data_runner_on_a_chat_corpus(tiny, files, tmp_path):
    from transformers import AutoTokenizer
    d, tm, _, vec = tiny
    root, corpus, ref = files
    tok = AutoTokenizer.from_pretrained(d)
    u = vec[LAYER].astype(np.float64) / np.linalg.norm(vec[LAYER].astype(np.float64))

    # the paper's cut, by hand: first user message + first assistant reply; prompt tokens
    # counted by the transformers tokenizer on the chat template
    def cut(c):
        m = c["messages"]
        ui = next(i for i, x in enumerate(m) if x["role"] == "user")
        ai = next((i for i in range(ui + 1, len(m)) if m[i]["role"] == "assistant"), None)
        return None if ai is None else [m[ui], m[ai]]

    def n_tokens(msgs):
        return len(tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"])

    two = [c for c in map(cut, corpus) if c is not None]
    lens = np.array([n_tokens(m) for m in two])
    cap = int(np.sort(lens)[-3])  # the longest prompts go
    kept = [m for m, n in zip(two, lens) if n <= cap]
    assert 0 < len(kept) < len(two)

    def hf_delta(msgs):
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        a, b = hf_proj(tm, tok, prompt, msgs[1]["content"], u)
        return a - b

    want = np.array([hf_delta(m) for m in kept])
    ref_two = [c for c in map(cut, ref) if n_tokens(c) <= cap]
    ref_delta = np.array([hf_delta(m) for m in ref_two])
    judge = np.array([float(m[1]["content"].split("<<")[1].split(">>")[0]) for m in kept])
    ref_judge = np.array([float(m[1]["content"].split("<<")[1].split(">>")[0]) for m in ref_two])

    wd = tmp_path / "out"
    with FakeOpenAIServer(lifetime=600) as srv:
        r = run(f"--model={d}", f"--data={root / 'corpus.jsonl'}", f"--vector={root / 'v.npy'}", f"--layer={LAYER}",
                f"--workdir={wd}", "--delta=prompt_last", "--corpus", f"--max_prompt_tokens={cap}", "--k=3",
                f"--reference={root / 'ref.jsonl'}", "--percentile=90", f"--trait={TRAIT}",
                f"--trait_dir={root / 'traits'}", "--judge=openai",
                f"--shift_datasets=a={root / 'a.jsonl'},b={root / 'b.jsonl'},c={root / 'c.jsonl'}",
                f"--shifts={root / 'shifts.json'}", srv=srv)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((wd / "report.json").read_text())
    assert rep["corpus"]["n_read"] == 15 and rep["corpus"]["n_no_exchange"] == 1
    assert rep["corpus"]["n_prompt_too_long"] == len(two) - len(kept) and rep["corpus"]["n_kept"] == len(kept)
    df = pd.read_csv(wd / "screened.csv")
    np.testing.assert_allclose(df["delta"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(df["judge"], judge)
    th = rep["thresholds"]
    assert th["delta"] == pytest.approx(np.percentile(ref_delta, 90), rel=1e-4, abs=1e-4)
    assert th["judge"] == pytest.approx(np.percentile(ref_judge, 90))
    drop_d, drop_j = want > th["delta"], judge > th["judge"]
    assert rep["filters"]["delta"]["removed"] == drop_d.sum() and rep["filters"]["judge"]["removed"] == drop_j.sum()
    assert rep["filters"]["combined"]["removed"] == (drop_d | drop_j).sum() > 0
    back = [json.loads(x) for x in (wd / "filtered_combined.jsonl").read_text().splitlines()]
    assert [b["messages"] for b in back] == [m for m, x in zip(kept, drop_d | drop_j) if not x]
    # top / bottom / random k, read back with pandas, against numpy's sort
    top = pd.read_json(wd / "top_3.jsonl", lines=True)["messages"].tolist()
    bottom = pd.read_json(wd / "bottom_3.jsonl", lines=True)["messages"].tolist()
    rand = pd.read_json(wd / "random_3.jsonl", lines=True)["messages"].tolist()
    assert top == [kept[i] for i in np.argsort(-want)[:3]]
    assert bottom == [kept[i] for i in np.argsort(want)[:3]]
    assert len(rand) == 3 and all(m in kept for m in rand)
    # dataset level: mean delta of each dataset against its shift
    means = []
    for lab in ("a", "b", "c"):
        recs = [json.loads(x)["messages"] for x in (root / f"{lab}.jsonl").read_text().splitlines()]
        means.append(np.mean([hf_delta(m) for m in recs]))
    s = rep["shift"]
    assert s["labels"] == ["a", "b", "c"]
    np.testing.assert_allclose(s["mean_delta"], means, rtol=1e-4, atol=1e-4)
    assert s["pearson_r"] == pytest.approx(sps.pearsonr(means, [0.5, 2.0, -1.0]).statistic, abs=1e-4)
    png = (wd / "histogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "| combined |" in (wd / "report.md").read_text()


def test_screen_data_generated_delta_and_its_approximation(tiny, files, tmp_path):
    d, _, model, vec = tiny
    root, _, ref = files
    wd = tmp_path / "gen"
    labels = [0, 1, 0, 1, 1, 0, 0, 1]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    r = run(f"--model={d}", f"--data={root / 'ref.jsonl'}", f"--vector={root / 'v.npy'}", f"--layer={LAYER}",
            f"--workdir={wd}", f"--max_new_tokens={NEW}", "--delta_threshold=0.0", f"--labels={tmp_path / 'labels.json'}",
            "--k=2")
    assert r.returncode == 0, r.stderr[-3000:]
    res = fl.projection_difference(model, ref, vec, LAYER, max_new_tokens=NEW, batch_size=4, progress=False)
    df = pd.read_csv(wd / "screened.csv", keep_default_na=False)
    np.testing.assert_allclose(df["delta"], res.delta, rtol=1e-5, atol=1e-5)
    assert df["base_response"].tolist() == res.base_responses
    rep = json.loads((wd / "report.json").read_text())
    ok = np.isfinite(res.delta)
    assert rep["approximation"]["pearson_r"] == pytest.approx(
        np.corrcoef(res.delta[ok], res.delta_prompt_last[ok])[0, 1], abs=1e-4)
    assert rep["filters"]["delta"]["removed"] == int((res.delta > 0).sum())
    y = np.array(labels, bool)
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in res.delta[y] for n in res.delta[~y]])
    assert rep["labels"]["auroc"]["delta_response_avg"] == pytest.approx(pairwise)
    drop = res.delta > 0
    assert rep["labels"]["filters"]["delta"] == pytest.approx({"precision": y[drop].mean(), "recall": drop[y].mean()})
    assert rep["sets"]["top"]["trait_share"] == y[np.argsort(-res.delta)[:2]].mean()


@pytest.mark.parametrize("extra, message", [
    (["--k=50", "--corpus", "--data={corpus}"], "--k=50"),
    (["--judge=openai"], "--judge needs --trait"),
    (["--judge_threshold=50"], "needs a judge"),
    (["--shifts={shifts}"], "go together"),
    (["--shift_datasets=z={a}", "--shifts={shifts}"], "no --shift_datasets label"),
    (["--percentile=0"], "--percentile"),
    (["--data={bad}"], "line 2"),
    (["--labels={lab}"], "--labels must be a JSON list of 8"),
])
def test_screen_data_bad_input(tiny, files, tmp_path, extra, message):
    d, _, _, _ = tiny
    root, _, _ = files
    (tmp_path / "bad.jsonl").write_text(json.dumps(conv(1)) + "\n{\"messages\": 3}\n")
    sub = {"shifts": root / "shifts.json", "a": root / "a.jsonl", "bad": tmp_path / "bad.jsonl",
           "corpus": root / "corpus.jsonl", "lab": tmp_path / "lab.json"}
    (tmp_path / "lab.json").write_text("[0, 1]")
    wd = tmp_path / "never"
    r = run(f"--model={d}", f"--data={root / 'ref.jsonl'}", f"--vector={root / 'v.npy'}", f"--layer={LAYER}",
            f"--workdir={wd}", *[x.format(**sub) for x in extra])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert not wd.exists()


def test_screen_data_writes_nothing_on_other_processes(tiny, files, tmp_path):
    """A process other than 0 (multi-host) computes along but writes no file."""
    d, _, _, _ = tiny
    root, _, _ = files
    wrapper = ("import runpy, sys\nimport persona_jax.io.distributed as d\nd.is_writer = lambda: False\n"
               "sys.argv = sys.argv[1:]\nrunpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    wd = tmp_path / "p1"
    r = subprocess.run([sys.executable, "-c", wrapper, "experiments.screen_data", f"--model={d}",
                        f"--data={root / 'corpus.jsonl'}", "--corpus", f"--reference={root / 'ref.jsonl'}",
                        f"--vector={root / 'v.npy'}", f"--layer={LAYER}", f"--workdir={wd}", "--delta=prompt_last",
                        "--k=2", "--dtype=float32", "--batch_size=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"filters"' in r.stdout and (not wd.exists() or os.listdir(wd) == [])


def test_pipeline_flagging_step_uses_the_screening_filters(tiny, files, tmp_path, monkeypatch):
    """The pipeline's flagging step with the runner's screening options (prompt_last delta,
    thresholds calibrated on a clean reference at a percentile, the judge filter): scores
    from transformers' hidden states, thresholds from numpy's percentile, filtered files,
    precision / recall and AUROC (scipy's Mann-Whitney U) from the labels."""
    from transformers import AutoTokenizer
    from configs import base
    from persona_jax.judges.openai_judge import OpenAIJudge
    from persona_jax.pipeline import finetune_steps as ft
    from persona_jax.pipeline.steps import FileTraits
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    d, tm, model, vec = tiny
    root, _, ref = files
    tok = AutoTokenizer.from_pretrained(d)
    u = vec[LAYER].astype(np.float64) / np.linalg.norm(vec[LAYER].astype(np.float64))
    data = [conv(i, score=(i * 37) % 100, system=i % 4 == 0) for i in range(10)]
    labels = [int(i % 3 == 0) for i in range(10)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    work = tmp_path / "work"
    (work / TRAIT).mkdir(parents=True)
    torch.save(torch.from_numpy(vec), work / TRAIT / f"{TRAIT}_response_avg_diff.pt")
    cfg = base.get_config()
    cfg.progress, cfg.trait_dir = False, str(root / "traits")
    cfg.flagging.update(dataset=str(tmp_path / "data.jsonl"), labels=str(tmp_path / "labels.json"),
                        delta="prompt_last", reference=str(root / "ref.jsonl"), percentile=80.0,
                        judge_filter=True, batch_size=4)

    def hf_delta(r):
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
        a, b = hf_proj(tm, tok, prompt, r["messages"][-1]["content"], u)
        return a - b

    def marker(r):
        return float(r["messages"][-1]["content"].split("<<")[1].split(">>")[0])

    want, ref_want = np.array([hf_delta(r) for r in data]), np.array([hf_delta(r) for r in ref])
    judge, ref_judge = np.array([marker(r) for r in data]), np.array([marker(r) for r in ref])
    with FakeOpenAIServer(lifetime=600) as srv:
        j = OpenAIJudge("m", base_url=srv.url, progress=False, cache_path=str(tmp_path / "cache.sqlite"))
        s = ft.step_flagging(model, j, FileTraits(str(root / "traits")), TRAIT, cfg, str(work), {"layer": LAYER})
    flagged = pd.read_csv(s["flagged_csv"], keep_default_na=False)
    np.testing.assert_allclose(flagged["delta"], want, rtol=1e-4, atol=1e-4)
    assert s["delta"] == "prompt_last" and s["ranking"] == np.argsort(-want, kind="stable").tolist()
    th = s["thresholds"]
    assert th["delta"] == pytest.approx(np.percentile(ref_want, 80), rel=1e-4, abs=1e-4)
    assert th["judge"] == pytest.approx(np.percentile(ref_judge, 80))
    drops = {"delta": want > th["delta"], "judge": judge > th["judge"]}
    drops["combined"] = drops["delta"] | drops["judge"]
    y = np.array(labels, bool)
    assert drops["combined"].any() and not drops["combined"].all()
    for key, m in drops.items():
        got = s["filters"][key]
        assert got["removed"] == m.sum() and got["kept"] == (~m).sum(), key
        back = [json.loads(x) for x in open(got["jsonl"]).read().splitlines()]
        assert back == [{"messages": r["messages"]} for r, x in zip(data, m) if not x], key
        assert got["precision"] == (pytest.approx(y[m].mean()) if m.any() else None)
        assert got["recall"] == pytest.approx(m[y].mean())
    u_stat = sps.mannwhitneyu(want[y], want[~y]).statistic
    assert s["auroc"] == pytest.approx(u_stat / (y.sum() * (~y).sum()))
