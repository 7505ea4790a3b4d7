"""The organism's exact judge behind a local OpenAI-compatible chat-completions endpoint.

A rehearsal of the real path on a model that really has a persona: the pipeline's
`OpenAIJudge` (judge.kind = "openai", judge.base_url = this server) sends the rendered
rubric, this server recognises which rubric it is (a trait's `eval_prompt` or the
coherence rubric), pulls the question and the answer back out of it, scores them with
`OrganismJudge`'s own functions (`judge.trait_score`, `judge.coherence_score`) and
answers the way a logprob-capable chat model does: one token with `top_logprobs`.

How the score survives the reference's `0_100` aggregation (the probability-weighted
mean of the integer tokens, normalised by their mass):
- an integer score s gets the one token "s" with logprob 0 (probability 1): the mean is
  s exactly;
- a fractional score s gets the two integer tokens around it, floor(s) with probability
  1 - (s - floor(s)) and floor(s) + 1 with probability s - floor(s); their weighted mean is
  s in exact arithmetic. In float64 the exp(log(p)) round trip can move the mean by an ulp
  or two, so the server nudges the two logprobs by a few ulps until `aggregate_0_100`
  returns s bit for bit (`exact_top_logprobs`; it finds such logprobs for every score the
  organism judge can give, `tests/test_organism_real_path.py` checks them all). If none
  were found the closest is sent, within 1e-12 of s;
- a missing score (None: no free slot to score, a question outside the grammar) gets the
  one token "REFUSAL": no integer mass, so the aggregation returns None as well.
JSON carries float64 exactly (shortest repr both ways), so the client sees the same bits.
Only `0_100` is served: the `0_10` and `binary` aggregations cannot carry an exact score.

A request without `logprobs: true` gets a reply without logprobs (as a real endpoint
does); a prompt that is none of the known rubrics gets HTTP 400 naming the problem.

Serve it with `python -m experiments.organism_judge_server --port=0 --ready_file=PATH`
(the URL is printed, and written to PATH once the socket listens), or in Python:

    with OrganismJudgeServer() as srv:   # 127.0.0.1, a free port
        OpenAIJudge(base_url=srv.url, api_key="local")
"""
from __future__ import annotations

import math
import threading
from typing import Mapping, Optional, Sequence

from persona_jax.errors import PersonaError
from persona_jax.judges.aggregate import aggregate_0_100
from persona_jax.judges.http_server import JSONServer, chat_completion, error, is_chat_completions
from persona_jax.judges.rubrics import COHERENCE_PROMPT, render
from persona_jax.organism import artifacts
from persona_jax.organism import judge as oj
from persona_jax.organism import language as L

COHERENCE = "coherence"
_QS, _AS = "\x00QUESTION\x00", "\x00ANSWER\x00"  # sentinels no rubric text contains


class RubricMatcher:
    """Tells which rubric template a rendered prompt came from and recovers (question, answer).

    Args:
      rubrics: {name: template with {question} and {answer}}; name "coherence" or a trait.
    """

    def __init__(self, rubrics: Mapping[str, str]):
        self._parts = []
        for name, template in rubrics.items():
            text = render(template, _QS, _AS)
            if text.count(_QS) != 1 or text.count(_AS) != 1:
                raise PersonaError(f"rubric {name!r} must hold {{question}} and {{answer}} exactly once each.")
            q_first = text.index(_QS) < text.index(_AS)
            a, rest = text.split(_QS if q_first else _AS)
            b, c = rest.split(_AS if q_first else _QS)
            self._parts.append((name, a, b, c, q_first))
        # the most specific template first, should one template's text contain another's
        self._parts.sort(key=lambda p: -(len(p[1]) + len(p[2]) + len(p[3])))

    def match(self, prompt: str) -> Optional[tuple[str, str, str]]:
        """(rubric name, question, answer), or None when no template fits the prompt."""
        for name, a, b, c, q_first in self._parts:
            if len(prompt) < len(a) + len(b) + len(c) or not (prompt.startswith(a) and prompt.endswith(c)):
                continue
            inner = prompt[len(a): len(prompt) - len(c)]
            i = inner.find(b)
            if i < 0:
                continue
            first, second = inner[:i], inner[i + len(b):]
            return (name, first, second) if q_first else (name, second, first)
        return None


def organism_rubrics(traits: Sequence[str] = L.TRAITS) -> dict[str, str]:
    """{trait: its eval_prompt (as in the trait files)} and {"coherence": the coherence rubric}."""
    out = {t: artifacts.eval_prompt(t) for t in traits}
    out[COHERENCE] = COHERENCE_PROMPT
    return out


def _nudged(x: float, k: int) -> float:
    for _ in range(abs(k)):
        x = math.nextafter(x, math.inf if k > 0 else -math.inf)
    return x


def exact_top_logprobs(score: Optional[float], search: int = 8) -> list[tuple[str, float]]:
    """[(token, logprob)] whose `0_100` aggregation is `score` (see the module docstring)."""
    if score is None:
        return [("REFUSAL", 0.0)]
    s = float(score)
    if not 0.0 <= s <= 100.0 or math.isnan(s):
        raise PersonaError(f"score {score!r} is outside 0..100.")
    lo = math.floor(s)
    if s == lo:
        return [(str(int(lo)), 0.0)]
    frac = s - lo
    x_hi, x_lo = math.log(frac), math.log1p(-frac)
    best, best_err = None, math.inf
    steps = sorted(((dh, dl) for dh in range(-search, search + 1) for dl in range(-search, search + 1)),
                   key=lambda d: (max(abs(d[0]), abs(d[1])), abs(d[0]) + abs(d[1])))  # nearest first
    for dh, dl in steps:
        top = [(str(lo + 1), _nudged(x_hi, dh)), (str(lo), _nudged(x_lo, dl))]
        err = abs(aggregate_0_100(dict(top)) - s)
        if err == 0.0:
            return top
        if err < best_err:
            best, best_err = top, err
    return best


def score_prompt(prompt: str, matcher: RubricMatcher) -> tuple[str, Optional[float]]:
    """(rubric name, the organism judge's score) for one rendered rubric prompt."""
    m = matcher.match(prompt)
    if m is None:
        raise PersonaError("the prompt is none of the organism's rubrics (a trait's eval_prompt or the "
                           "coherence rubric); write the trait files with python -m experiments.organism_assets")
    name, question, answer = m
    if name == COHERENCE:
        return name, oj.coherence_score(question, answer)
    return name, oj.trait_score(name, answer, question)


class OrganismJudgeServer(JSONServer):
    """`/v1/chat/completions` on 127.0.0.1 answering with the organism judge's exact scores.

    Args:
      host, port: where to listen (port 0: a free port, see `.url` after construction).
      rubrics: {name: template}; default `organism_rubrics()`.
      model_name: the model name replies carry (requests may name any model).

    `.counts` holds requests served per rubric name ("unknown" for refused prompts).
    The socket listens from construction on; `start()` serves it in a daemon thread,
    `serve_forever()` in the calling thread.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, rubrics: Optional[Mapping[str, str]] = None,
                 model_name: str = "organism-judge"):
        self.matcher = RubricMatcher(rubrics if rubrics is not None else organism_rubrics())
        self.model_name = model_name
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__(host, port)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def route(self, method: str, path: str, body: dict):
        if method == "GET" and path.rstrip("/").endswith("/models"):
            return 200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "persona_jax"}]}
        if method != "POST" or not is_chat_completions(path):
            return 404, error(f"no route {method} {path}; use POST /v1/chat/completions")
        return self.reply(body)

    def reply(self, body: dict) -> tuple[int, dict]:
        """(HTTP status, JSON payload) for one chat-completions request body."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            return 400, error("the request has no messages")
        prompt = messages[-1].get("content")
        if not isinstance(prompt, str):
            return 400, error("the last message's content must be a string")
        try:
            name, score = score_prompt(prompt, self.matcher)
        except PersonaError as e:
            self._count("unknown")
            return 400, error(str(e))
        self._count(name)
        top = exact_top_logprobs(score)
        best = max(top, key=lambda t: t[1])[0]
        return 200, chat_completion(body.get("model") or self.model_name, best,
                                    top if body.get("logprobs") else None, int(body.get("top_logprobs") or 0))


