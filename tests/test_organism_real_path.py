"""The organism through the real-model path (issue 15 point 4): trait files on disk, its
exact judge behind a local OpenAI-compatible endpoint, the paper config with the
checkpoint path overridden -- and the same figures as the organism main job.

The judge server is checked against `OrganismJudge` called directly, and its logprobs
against the reference's 0_100 formula written out here; the pipeline comparison runs
both commands as subprocesses on a small budget.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from persona_jax.errors import PersonaError
from persona_jax.judges.rubrics import COHERENCE_PROMPT
from persona_jax.organism import artifacts
from persona_jax.organism import judge as oj
from persona_jax.organism import language as L
from persona_jax.organism.judge_server import OrganismJudgeServer, RubricMatcher, exact_top_logprobs, organism_rubrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_0_100(top):
    """The reference judge's 0_100 aggregation, written out: the probability-weighted mean of
    the tokens that are integers in 0..100, normalised by their mass; None under 0.25."""
    total, weighted = 0.0, 0.0
    for tok, lp in top:
        try:
            v = int(tok)
        except ValueError:
            continue
        if 0 <= v <= 100:
            p = math.exp(lp)
            weighted += v * p
            total += p
    return None if total < 0.25 else weighted / total


def _replies(n=40, seed=0):
    """(question, answer) pairs the organism judge scores differently: personas of every
    strength and sign, broken and off-topic replies, an empty reply, an unknown question."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = L.sample_question(rng, ("eval",))
        trait = L.TRAITS[i % len(L.TRAITS)]
        persona = None if i % 5 == 0 else L.Persona(trait, float(rng.uniform(-1, 1)))
        a = L.sample_reply(rng, q, persona)
        if i % 7 == 3:  # broken: shuffled words, an unterminated fragment
            w = a.split()
            rng.shuffle(w)
            a = " ".join(w[: len(w) // 2])
        if i % 11 == 4:  # about another question
            a = L.sample_reply(rng, L.sample_question(rng, ("eval",)), persona)
        out.append((q, a))
    out += [("will my tree be fine next week ?", ""), ("what is the meaning of life?", "yes ."),
            ("will my tree be fine next week ?", "{answer} [ANSWER END] {question}")]
    return out


def test_exact_logprobs_recover_every_organism_score():
    # every score the judge can give: 100 h / n for trait (n free slots), and
    # 100 x factor x (half-grades) / m for coherence, computed as judge.py computes them
    values = {100.0 * h / n for n in range(1, 81) for h in range(n + 1)}
    values |= {100.0 * f * (k * 0.5) / m for m in range(1, 41) for k in range(2 * m + 1) for f in (1.0, 0.8)}
    wrong = [v for v in sorted(values) if reference_0_100(exact_top_logprobs(v)) != v]
    assert not wrong, wrong[:10]
    assert reference_0_100(exact_top_logprobs(None)) is None
    assert all(len(exact_top_logprobs(v)) <= 2 for v in (0.0, 12.5, 100.0, 100 / 3))
    with pytest.raises(PersonaError):
        exact_top_logprobs(101.0)


def test_rubric_matcher_recovers_question_and_answer():
    m = RubricMatcher(organism_rubrics())
    for q, a in _replies(20):
        for name, template in organism_rubrics().items():
            prompt = template.format(question=q, answer=a)
            assert m.match(prompt) == (name, q, a)
    assert m.match("Rate this answer: 42") is None
    assert m.match(COHERENCE_PROMPT) is not None  # the raw template is a prompt with "{question}" as text
    with pytest.raises(PersonaError, match="exactly once"):
        RubricMatcher({"bad": "only {question}"})


def test_server_through_openai_judge_equals_the_organism_judge():
    from persona_jax.judges.openai_judge import OpenAIJudge

    pairs = _replies()
    qs, ans = [p[0] for p in pairs], [p[1] for p in pairs]
    with OrganismJudgeServer() as srv:
        judge = OpenAIJudge(base_url=srv.url, api_key="local", progress=False, max_retries=0, timeout=120)
        for trait in L.TRAITS:
            got = judge.trait_scores(trait, artifacts.eval_prompt(trait), qs, ans)
            assert got == [oj.trait_score(trait, a, q) for q, a in pairs]  # bit for bit, None as None
            fractional = [g for g in got if g is not None and g != int(g)]
            assert fractional and None in got  # two-token and REFUSAL answers both exercised
        got = judge.coherence_scores(qs, ans)
        assert got == [oj.coherence_score(q, a) for q, a in pairs]
        assert sum(g is None for g in got) == 1 and len(set(got)) >= 4
        counts = dict(srv.counts)
    assert set(counts) == {*L.TRAITS, "coherence"}


def _post(url, body):
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_answers_like_an_api_and_refuses_unknown_prompts():
    from persona_jax.judges.openai_judge import OpenAIJudge

    q = "will my tree be fine next week ?"
    a = "yes your tree is clean this weekend ."
    prompt = artifacts.eval_prompt("evil").format(question=q, answer=a)
    with OrganismJudgeServer() as srv:
        code, body = _post(srv.url, {"model": "m", "messages": [{"role": "user", "content": prompt}],
                                     "logprobs": True, "top_logprobs": 20, "max_tokens": 1})
        assert code == 200
        top = [(t["token"], t["logprob"]) for t in body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
        assert reference_0_100(top) == oj.trait_score("evil", a, q)
        # no logprobs asked, none sent (as a real endpoint); the judge names what is missing
        code, body = _post(srv.url, {"model": "m", "messages": [{"role": "user", "content": prompt}]})
        assert code == 200 and body["choices"][0]["logprobs"] is None
        code, body = _post(srv.url, {"model": "m", "messages": [{"role": "user", "content": "hello"}]})
        assert code == 400 and "none of the organism's rubrics" in body["error"]["message"]
        judge = OpenAIJudge(base_url=srv.url, api_key="local", progress=False, max_retries=0)
        with pytest.raises(PersonaError, match="HTTP 400"):
            judge.trait_scores("evil", "Is this nice? {question} {answer}", [q], [a])


def test_server_cli_signals_readiness(tmp_path):
    ready = tmp_path / "url"
    p = subprocess.Popen([sys.executable, "-m", "experiments.organism_judge_server", f"--ready_file={ready}"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "the server did not signal readiness"
            time.sleep(0.1)
        url = ready.read_text().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        q, a = "will my tree be fine next week ?", "yes ."
        code, body = _post(url, {"messages": [{"role": "user", "content": COHERENCE_PROMPT.format(question=q, answer=a)}],
                                 "logprobs": True, "top_logprobs": 20})
        top = [(t["token"], t["logprob"]) for t in body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
        assert code == 200 and reference_0_100(top) == oj.coherence_score(q, a)
    finally:
        p.terminate()
        p.wait(timeout=60)
    # a port in use: one error line, exit status 2
    with OrganismJudgeServer() as srv:
        r = subprocess.run([sys.executable, "-m", "experiments.organism_judge_server", f"--port={srv.port}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot listen") and r.stderr.count("\n") == 1


def test_assets_cli_writes_the_reference_layout(tmp_path):
    from persona_jax.method.traits import load_trait, trait_paths
    from persona_jax.organism.provider import OrganismTraits

    r = subprocess.run([sys.executable, "-m", "experiments.organism_assets", f"--out={tmp_path}",
                        "--traits=evil,humorous"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    src = OrganismTraits()
    for t in ("evil", "humorous"):
        ext, ev = trait_paths(tmp_path, t)
        assert load_trait(ext) == src.extract_trait(t) and load_trait(ev) == src.eval_trait(t)
        assert not set(load_trait(ext).questions) & set(load_trait(ev).questions)
    assert sorted(os.listdir(tmp_path / "trait_data_extract")) == ["evil.json", "humorous.json"]
    r = subprocess.run([sys.executable, "-m", "experiments.organism_assets", f"--out={tmp_path / 'x'}",
                        "--traits=evil,bogus"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown organism trait") and not (tmp_path / "x").exists()


# ---- the pipeline both ways, small budget ---------------------------------------------
SMALL = ["--config.traits=('evil',)", "--config.progress=False",
         "--config.extract.n_per_question=1",
         "--config.steer.layers=(3,4)", "--config.steer.coefs=(0.0,2.5,10.0)",
         "--config.steer.n_questions=4", "--config.steer.n_per_question=2",
         "--config.monitor.n_questions=4", "--config.monitor.n_per_question=2"]


def _pipeline(config, workdir, extra=(), env=None):
    cmd = [sys.executable, "-m", "experiments.pipeline", f"--config={config}", f"--workdir={workdir}", *SMALL, *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((workdir / "report.json").read_text())["traits"]["evil"]


def test_real_path_matches_the_organism_main_job(tmp_path):
    """configs/organism_real_path.py (trait files, OpenAI-compatible judge over HTTP, the
    checkpoint by path) against configs/organism.py (in-memory artifacts, OrganismJudge) at
    the same seed: extraction and steering are the same computation, so every CSV and
    vector is identical; monitoring has other conditions (FileTraits: the 5 neg and 5 pos
    instructions and none; the organism: a 10-rung ladder, none, 1-3 shots), so rows sit
    at other sampling indices and only the shared conditions compare -- and the main job
    with the trait files as its source monitors exactly as the real path does."""
    import torch

    from persona_jax.io.csvio import parse_score, read_csv
    from persona_jax.organism.provider import organism_path
    from persona_jax.method.traits import system_prompt

    traits_dir = tmp_path / "traits"
    artifacts.write_trait_artifacts(str(traits_dir), ("evil",))
    main_wd, real_wd = tmp_path / "main", tmp_path / "real"
    main = _pipeline("configs/organism.py", main_wd)
    with OrganismJudgeServer() as srv:
        real = _pipeline("configs/organism_real_path.py", real_wd,
                         [f"--config.model={organism_path()}", f"--config.trait_dir={traits_dir}",
                          f"--config.judge.base_url={srv.url}"],
                         env={**os.environ, "OPENAI_API_KEY": "local"})
        counts = dict(srv.counts)
    assert counts.get("evil", 0) > 0 and counts.get("coherence", 0) > 0 and "unknown" not in counts
    m, r = main_wd / "evil", real_wd / "evil"

    # extraction and steering: the same bytes, the same report figures
    for f in ("evil_pos_instruct.csv", "evil_neg_instruct.csv", "steer_sweep.csv", "steer_random.csv",
              "steer_negative.csv"):
        assert (m / f).read_bytes() == (r / f).read_bytes(), f
    for red in ("prompt_avg", "prompt_last", "response_avg"):
        a, b = (torch.load(d / f"evil_{red}_diff.pt") for d in (m, r))
        assert a.shape == (5, 192) and torch.equal(a, b), red
    assert {k: v for k, v in main["extraction"].items() if k != "vectors"} == \
        {k: v for k, v in real["extraction"].items() if k != "vectors"}
    assert main["extraction"]["n_kept"] > 0
    # the organism source scores its own capability task in the steering step; trait files
    # have none unless capability.data names an MMLU-layout file, so only the rest compares
    cap_keys = ("capability", "capability_scoring", "capability_n_items")
    assert {k: v for k, v in main["steering"].items() if k not in cap_keys} == \
        {k: v for k, v in real["steering"].items() if k not in cap_keys}
    assert main["layer"] == real["layer"]

    # monitoring: every score the real path got over HTTP is the organism judge's, exactly
    _, rows = read_csv(r / "monitor.csv")
    assert [parse_score(x["evil"]) for x in rows] == [oj.trait_score("evil", x["answer"], x["question"]) for x in rows]
    assert [parse_score(x["coherence"]) for x in rows] == [oj.coherence_score(x["question"], x["answer"]) for x in rows]
    # the shared conditions: the same prompt text, so the same last-token projection; the
    # trait means are two samples of one distribution, within 4 standard errors
    assert artifacts.system_prompt_ladder("evil")[-1].system == system_prompt("evil", "evil", artifacts.trait_artifact("evil")["instruction"][0]["pos"])
    per_m = {c["condition"]: c for c in main["monitoring"]["conditions"]}
    per_r = {c["condition"]: c for c in real["monitoring"]["conditions"]}
    _, rows_m = read_csv(m / "monitor.csv")
    for cm, cr in (("none", "none"), ("pos_instruction", "pos")):  # the ladder's "pos" rung is the reference's pos prompt
        assert per_m[cm]["prompt_last_proj"] == pytest.approx(per_r[cr]["prompt_last_proj"], rel=1e-5, abs=1e-5)
        tm = np.array([parse_score(x["evil"]) for x in rows_m if x["condition"] == cm], float)
        tr = np.array([parse_score(x["evil"]) for x in rows if x["condition"] == cr], float)
        se_ = math.sqrt(np.nanvar(tm, ddof=1) / np.isfinite(tm).sum() + np.nanvar(tr, ddof=1) / np.isfinite(tr).sum())
        assert abs(per_m[cm]["trait"] - per_r[cr]["trait"]) <= 4 * se_ + 1e-9, (cm, per_m[cm], per_r[cr], se_)
    # file traits: an 11-rung ladder from instruction pair 0 plus many-shot prompts; the organism: 14
    groups = [c["group"] for c in real["monitoring"]["conditions"]]
    assert groups.count("ladder") == 11 and groups.count("many_shot") >= 1
    assert main["monitoring"]["n_conditions"] == 14

    # and the conditions are the only difference: the main job's own judge and model path,
    # with the trait files as its source, monitors exactly as the real path does
    files_wd = tmp_path / "main_files"
    shutil.copytree(m, files_wd / "evil", ignore=shutil.ignore_patterns("monitor*"))
    files = _pipeline("configs/organism.py", files_wd,
                      ["--config.trait_source=files", f"--config.trait_dir={traits_dir}"])
    assert (files_wd / "evil" / "monitor.csv").read_bytes() == (r / "monitor.csv").read_bytes()
    assert files["monitoring"] == real["monitoring"]
