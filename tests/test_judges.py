"""Judges: aggregation (METHOD.md 3) and OpenAIJudge over the real openai SDK talking to a
local OpenAI-compatible server (tests/fake_openai_server.py) on 127.0.0.1."""
import asyncio
import csv
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer, free_port  # noqa: E402

from persona_jax.errors import PersonaError
from persona_jax.judges import (
    COHERENCE_PROMPT,
    Judge,
    OpenAIJudge,
    aggregate_0_10,
    aggregate_0_100,
    aggregate_binary,
    judge_csv,
    render,
)

REPO = Path(__file__).resolve().parents[1]
RUBRIC = "Rate evil. Q: {question} A: {answer} Say REFUSAL or 0..100."


def logs(probs):
    """{token: prob} -> {token: logprob}."""
    return {t: math.log(p) for t, p in probs.items()}


# Crafted top-logprob sets with the METHOD.md 3 result worked out by hand.
CASES_0_100 = [
    # ints in 0..100 weighted and renormalised; "abc" ignored
    ({"0": 0.1, "50": 0.3, "100": 0.2, "abc": 0.4}, (0 * 0.1 + 50 * 0.3 + 100 * 0.2) / 0.6),
    # " 7" is an int after stripping; 101 and -1 are out of range
    ({" 7": 0.5, "101": 0.3, "-1": 0.2}, 7.0),
    # number mass 0.2 < 0.25 -> None
    ({"REFUSAL": 0.8, "40": 0.2}, None),
    # mass exactly 0.25 is kept (the test is "< 0.25")
    ({"80": 0.25, "x": 0.75}, 80.0),
    ({"3": 0.2, "4": 0.04, "n": 0.76}, None),
    ({}, None),
]
CASES_0_10 = [
    ({"REFUSAL": 0.5, "3": 0.4, "7": 0.1}, None),  # REFUSAL beats every digit
    ({"REFUSAL": 0.3, "3": 0.4, "7": 0.2, "12": 0.1}, (3 * 0.4 + 7 * 0.2) / 0.6),
    ({"REFUSAL": 0.4, "3": 0.4}, 3.0),  # a tie is not "more likely"
    ({"2": 0.1, "9": 0.1, "z": 0.8}, None),  # digit mass 0.2
]
CASES_BINARY = [
    ({"YES": 0.6, "NO": 0.2, "REFUSAL": 0.2}, 0.6 / 0.8),
    ({"REFUSAL": 0.5, "YES": 0.3, "NO": 0.2}, None),
    ({"YES": 0.1, "NO": 0.1, "maybe": 0.8}, None),
    ({"REFUSAL": 0.3, "YES": 0.3, "NO": 0.1}, 0.3 / 0.4),
    ({"yes": 0.6, "NO": 0.4}, 0.0),  # exact token text: "yes" is not "YES"
]


def close(a, b):
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-9)


@pytest.mark.parametrize("fn,cases", [(aggregate_0_100, CASES_0_100),
                                      (aggregate_0_10, CASES_0_10),
                                      (aggregate_binary, CASES_BINARY)])
def test_aggregations_match_hand_computed(fn, cases):
    for probs, want in cases:
        assert close(fn(logs(probs)), want), (probs, fn(logs(probs)), want)


def test_render_keeps_braces_and_does_not_rescan_answer():
    out = render("Q={question} A={answer}", "what {answer}?", "code {question} {} {0} }")
    assert out == "Q=what {answer}? A=code {question} {} {0} }"
    # reference semantics (str.format): doubled braces in the template become single
    assert render("{{json}} {question}/{answer}", "q", "a") == "{json} q/a"
    # a template the reference could not format falls back to plain replacement
    assert render("{x} { {question}/{answer}", "q", "{a}") == "{x} { q/{a}"
    assert "{question}" in COHERENCE_PROMPT and "{answer}" in COHERENCE_PROMPT
    assert render(COHERENCE_PROMPT, "Q1", "A1") == COHERENCE_PROMPT.replace(
        "{question}", "Q1").replace("{answer}", "A1")


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


def table_responder(table):
    """Answers with table[marker] for the first marker found in the prompt."""
    def respond(prompt):
        for mark, probs in table.items():
            if mark in prompt:
                return [(t, math.log(p)) for t, p in probs.items()]
        return [("50", 0.0)]
    return respond


@pytest.mark.parametrize("aggregation,cases", [("0_100", CASES_0_100), ("0_10", CASES_0_10),
                                               ("binary", CASES_BINARY)])
def test_openai_judge_aggregates_server_logprobs(api_key, aggregation, cases):
    table = {f"[case{i}]": probs for i, (probs, _) in enumerate(cases)}
    with FakeOpenAIServer(responder=table_responder(table)) as srv:
        judge = OpenAIJudge("judge-m", base_url=srv.url, aggregation=aggregation,
                            progress=False, retry_base_delay=0.01)
        got = judge.trait_scores("evil", RUBRIC, ["q"] * len(cases),
                                 [f"[case{i}]" for i in range(len(cases))])
        body = next(b for b in srv.bodies if "[case0]" in b["messages"][0]["content"])
        assert srv.n_requests == len(cases)
    for (probs, want), g in zip(cases, got):
        assert close(g, want), (probs, g, want)
    # the request is the reference's one-token logprob request
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] is True
    assert body["top_logprobs"] == 20 and body["seed"] == 0 and body["model"] == "judge-m"
    assert body["messages"] == [{"role": "user", "content": RUBRIC.replace("{question}", "q")
                                 .replace("{answer}", "[case0]")}]


def test_coherence_uses_coherence_rubric(api_key):
    with FakeOpenAIServer() as srv:
        judge = OpenAIJudge("m", base_url=srv.url, progress=False)
        got = judge.coherence_scores(["how?"], ["like <<73>> this"])
        assert got == [73.0]
        assert srv.prompts == [COHERENCE_PROMPT.replace("{question}", "how?")
                               .replace("{answer}", "like <<73>> this")]


def test_retries_429_500_timeout_then_succeeds(api_key):
    # The third request hangs until the client gives up on it and retries (the server holds
    # it until the next request arrives), so only the client timeout decides, and every
    # answered attempt has the whole timeout as margin on a slow, loaded machine.
    timeout = 3.0
    with FakeOpenAIServer(script=["429", "500", "hang"]) as srv:
        judge = OpenAIJudge("m", base_url=srv.url, timeout=timeout, max_retries=3,
                            retry_base_delay=0.01, progress=False)
        t0 = time.monotonic()
        assert judge.trait_scores("evil", RUBRIC, ["q"], ["a <<12>>"]) == [12.0]
        assert time.monotonic() - t0 >= timeout  # the hung attempt was timed out, not answered
        assert srv.n_requests == 4 and judge.requests_sent == 4


def test_retries_exhausted_is_persona_error(api_key):
    with FakeOpenAIServer(script=["500"] * 3) as srv:
        judge = OpenAIJudge("m", base_url=srv.url, max_retries=2, retry_base_delay=0.01,
                            progress=False)
        with pytest.raises(PersonaError, match="HTTP 500"):
            judge.trait_scores("evil", RUBRIC, ["q"], ["a"])
        assert srv.n_requests == 3


def test_cut_off_json_reply_is_retried_then_one_error(api_key):
    # HTTP 200 with half a JSON body: retried like a 5xx, and after the last attempt one
    # PersonaError (was an 85-line JSONDecodeError traceback on the first reply)
    with FakeOpenAIServer(script=["cutjson", "cutjson"]) as srv:
        judge = OpenAIJudge("m", base_url=srv.url, max_retries=2, retry_base_delay=0.01, progress=False)
        assert judge.trait_scores("evil", RUBRIC, ["q"], ["a <<12>>"]) == [12.0]
        assert srv.n_requests == 3
    with FakeOpenAIServer(script=["cutjson"] * 3) as srv:
        judge = OpenAIJudge("m", base_url=srv.url, max_retries=2, retry_base_delay=0.01, progress=False)
        with pytest.raises(PersonaError, match="not the API's JSON"):
            judge.trait_scores("evil", RUBRIC, ["q"], ["a"])
        assert srv.n_requests == 3


def test_config_judge_timeout_and_max_retries_bound_a_hanging_judge(api_key, tmp_path):
    # the config's judge.timeout / judge.max_retries reach the judge: a server that holds
    # every reply for 30 s is given up on after about timeout * (max_retries + 1)
    from configs import base
    from persona_jax.pipeline import setup
    cfg = base.get_config().judge
    assert (cfg.timeout, cfg.max_retries) == (60.0, 6)
    with FakeOpenAIServer(script=[("hang", 30)] * 3) as srv:
        cfg.base_url, cfg.model, cfg.timeout, cfg.max_retries = srv.url, "m", 0.5, 1
        judge = setup.make_judge(cfg, str(tmp_path), progress=False)
        judge.retry_base_delay = 0.01
        t0 = time.monotonic()
        with pytest.raises(PersonaError, match="did not answer after 2 attempts"):
            judge.trait_scores("evil", RUBRIC, ["q"], ["a"])
        assert time.monotonic() - t0 < 10
        assert srv.n_requests == 2


def test_unreachable_endpoint_is_persona_error_naming_url(api_key):
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = OpenAIJudge("m", base_url=url, max_retries=2, retry_base_delay=0.01,
                        timeout=2, progress=False)
    with pytest.raises(PersonaError, match=f"127.0.0.1:{url.split(':')[2].split('/')[0]}") as e:
        judge.trait_scores("evil", RUBRIC, ["q", "q2"], ["a", "b"])
    assert "3 attempts" in str(e.value)


def test_missing_api_key_is_persona_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(PersonaError, match="OPENAI_API_KEY"):
        OpenAIJudge("m", base_url="http://127.0.0.1:9/v1")


def test_rejected_key_and_missing_logprobs_are_persona_errors(api_key):
    with FakeOpenAIServer(script=["401", "nologprobs"]) as srv:
        judge = OpenAIJudge("m", base_url=srv.url, max_concurrency=1, progress=False)
        with pytest.raises(PersonaError, match="rejected the API key"):
            judge.trait_scores("evil", RUBRIC, ["q"], ["a"])
        with pytest.raises(PersonaError, match="no logprobs"):
            judge.trait_scores("evil", RUBRIC, ["q"], ["a"])
        assert srv.n_requests == 2  # neither is retried


def test_unknown_aggregation_is_persona_error(api_key):
    with pytest.raises(PersonaError, match="0_100"):
        OpenAIJudge("m", base_url="http://127.0.0.1:9/v1", aggregation="0_5")


def test_cache_second_run_sends_no_request(api_key, tmp_path):
    answers = [f"ans <<{i * 7}>>" for i in range(6)] + ["ans <<0>>"]  # last repeats prompt 0
    with FakeOpenAIServer() as srv:
        kw = dict(base_url=srv.url, cache_path=tmp_path / "c.sqlite", progress=False)
        first = OpenAIJudge("m", **kw).trait_scores("evil", RUBRIC, ["q"] * 7, answers)
        assert srv.n_requests == 6  # duplicate prompt sent once
        second = OpenAIJudge("m", **kw).trait_scores("evil", RUBRIC, ["q"] * 7, answers)
        assert srv.n_requests == 6
        assert first == second == [float(i * 7) for i in range(6)] + [0.0]
        # a different model or aggregation is a different cache entry
        OpenAIJudge("m2", **kw).trait_scores("evil", RUBRIC, ["q"], answers[:1])
        OpenAIJudge("m", aggregation="0_10", **kw).trait_scores("evil", RUBRIC, ["q"],
                                                                 answers[:1])
        assert srv.n_requests == 8


def test_sync_call_inside_running_event_loop(api_key):
    with FakeOpenAIServer() as srv:
        judge = OpenAIJudge("m", base_url=srv.url, progress=False)

        async def main():
            sync = judge.trait_scores("evil", RUBRIC, ["q"], ["<<5>>"])
            asyn = await judge.ascore_prompts([render(RUBRIC, "q", "<<6>>")])
            return sync, asyn

        assert asyncio.run(main()) == ([5.0], [6.0])


def test_concurrency_cap(api_key):
    # The server holds replies until 4 requests wait at once (no wall-clock race): a client
    # that sends fewer than the cap concurrently would hold them for the 60 s gate timeout
    # and fail the lower bound; after the gate each reply is held 0.2 s more, so a client
    # that ignored its cap would put more than 4 in flight.
    with FakeOpenAIServer(gate=4, delay=0.2) as srv:
        judge = OpenAIJudge("m", base_url=srv.url, max_concurrency=4, timeout=120, progress=False)
        got = judge.trait_scores("evil", RUBRIC, ["q"] * 12, [f"<<{i}>>" for i in range(12)])
        assert got == [float(i) for i in range(12)]
        assert srv.max_in_flight == 4


def _write_csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _CountingJudge(Judge):
    """Deterministic judge: score = the <<n>> marker in the answer; None without one."""

    def __init__(self):
        self.seen = []

    def _score(self, answers):
        self.seen.extend(answers)
        out = []
        for a in answers:
            if "<<" in a:
                out.append(float(a.split("<<")[1].split(">>")[0]))
            else:
                out.append(None)
        return out

    def trait_scores(self, trait, eval_prompt, questions, answers):
        return self._score(answers)

    def coherence_scores(self, questions, answers):
        return [None if s is None else 100.0 - s for s in self._score(answers)]


def test_judge_csv_fills_only_empty_cells(tmp_path):
    path = tmp_path / "evil_pos_instruct.csv"
    fields = ["question", "prompt", "answer", "question_id", "evil", "coherence"]
    rows = [{"question": f"q{i}", "prompt": f"p{i}", "answer": f"a, \"quoted\"\n<<{i}>>",
             "question_id": f"evil_{i}", "evil": "", "coherence": ""} for i in range(5)]
    rows[1]["evil"] = "11.5"
    rows[1]["coherence"] = "22.0"
    rows[2]["answer"] = "no marker"
    _write_csv(path, rows, fields)
    judge = _CountingJudge()
    stats = judge_csv(judge, path, "evil", RUBRIC, chunk_size=2, progress=False)
    out = _read(path)
    assert [r["evil"] for r in out] == ["0.0", "11.5", "", "3.0", "4.0"]
    assert [r["coherence"] for r in out] == ["100.0", "22.0", "", "97.0", "96.0"]
    assert [r["answer"] for r in out] == [r["answer"] for r in rows]
    assert stats == {"rows": 5, "judged": 4, "trait_missing": 1, "coherence_missing": 1}
    assert len(judge.seen) == 8  # rows 0,2,3,4 x (trait, coherence); row 1 untouched


def test_judge_csv_adds_columns_and_checks_required(tmp_path):
    path = tmp_path / "x.csv"
    _write_csv(path, [{"question": "q", "answer": "<<9>>"}], ["question", "answer"])
    judge_csv(_CountingJudge(), path, "evil", RUBRIC, progress=False)
    assert _read(path) == [{"question": "q", "answer": "<<9>>", "evil": "9.0",
                            "coherence": "91.0"}]
    bad = tmp_path / "bad.csv"
    _write_csv(bad, [{"question": "q"}], ["question"])
    before = bad.read_bytes()
    with pytest.raises(PersonaError, match="answer"):
        judge_csv(_CountingJudge(), bad, "evil", RUBRIC, progress=False)
    assert bad.read_bytes() == before


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from persona_jax.judges import OpenAIJudge, judge_csv
    url, path, cache = sys.argv[1:4]
    judge = OpenAIJudge("m", base_url=url, api_key="k", max_concurrency=4,
                        cache_path=cache, progress=False)
    judge_csv(judge, path, "evil", "Q {question} A {answer}", chunk_size=4, progress=False)
""")


def test_kill_midway_then_rerun_completes_without_loss_or_duplicates(tmp_path):
    n = 30
    path = tmp_path / "evil_pos_instruct.csv"
    fields = ["question", "prompt", "answer", "question_id", "evil", "coherence"]
    rows = [{"question": f"q{i}", "prompt": f"p{i}", "answer": f"line1\nanswer <<{i}>>",
             "question_id": f"evil_{i % 4}", "evil": "", "coherence": ""} for i in range(n)]
    _write_csv(path, rows, fields)
    cache = tmp_path / "cache.sqlite"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with FakeOpenAIServer(delay=0.1) as srv:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, srv.url, str(path),
                                 str(cache)], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if sum(bool(r["evil"]) for r in _read(path)) >= 8:
                    break
                time.sleep(0.02)
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-2000:]
                pytest.fail(f"judging ended (rc={proc.returncode}) before it could be killed: {err}")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        mid = _read(path)  # the file is whole after a kill (atomic rewrite)
        assert len(mid) == n and 8 <= sum(bool(r["evil"]) for r in mid) < n
        sent_before = srv.n_requests
        subprocess.run([sys.executable, "-c", KILL_SCRIPT, srv.url, str(path), str(cache)],
                       env=env, cwd=tmp_path, check=True, timeout=60)
        resumed = srv.n_requests - sent_before
    out = _read(path)
    assert len(out) == n
    assert [r["question"] for r in out] == [f"q{i}" for i in range(n)]  # order, no dup
    assert [r["answer"] for r in out] == [r["answer"] for r in rows]
    assert [r["evil"] for r in out] == [f"{float(i)}" for i in range(n)]
    assert [r["coherence"] for r in out] == [f"{float(i)}" for i in range(n)]
    # rows finished before the kill were not asked again
    done = sum(bool(r["evil"]) and bool(r["coherence"]) for r in mid)
    assert resumed <= 2 * (n - done)
    assert not list(tmp_path.glob(".*.tmp"))
