"""A tiny OpenAI-compatible `/v1/chat/completions` server on 127.0.0.1 for judge tests.

It answers the way a logprob-capable chat model does (one token, `top_logprobs`), with
per-request scripted failures (429, 500, a hang past the client timeout, 401, a reply
without logprobs), an optional delay, and a request counter. It runs in daemon threads
and shuts itself down after `lifetime` seconds, so a failing test cannot leave it behind.
"""
from __future__ import annotations

import json
import re
import threading
import time
from typing import Callable, Sequence

from persona_jax.judges.http_server import JSONServer, chat_completion, error, is_chat_completions

TopList = list  # [(token, logprob), ...]

_MARK = re.compile(r"<<(-?\d+)>>")


def marker_responder(prompt: str) -> TopList:
    """Default: the number inside the first `<<n>>` in the prompt gets probability 1."""
    m = _MARK.search(prompt)
    return [(m.group(1) if m else "50", 0.0)]


class FakeOpenAIServer(JSONServer):
    """Usage: `with FakeOpenAIServer(...) as srv: OpenAIJudge(base_url=srv.url, ...)`.

    Args:
      responder: prompt -> [(token, logprob)] for the top-logprobs of the one token, or
        prompt -> str for a plain text reply without logprobs (generator tests).
      script: actions for the first requests, in arrival order: "429", "500", "401",
        "nologprobs", "cutjson" (HTTP 200, the JSON body cut in half), ("hang", seconds), "hang" (hold the reply until the next request
        arrives or the server stops: a client timeout, whatever its length, then a retry) or
        "ok". Later requests are "ok".
      delay: seconds every successful reply waits before it is sent.
      gate: hold every successful reply until this many requests are held at once (or
        `gate_timeout` seconds pass), then release them all: concurrency measured without
        depending on how fast the client sends.
      text_responder: prompt -> str, for requests that do not ask for logprobs (a text
        generator such as `traits.openai_llm`); None: `responder` answers them too.
      lifetime: seconds after which the server stops by itself.
    """

    def __init__(
        self,
        responder: Callable[[str], TopList] = marker_responder,
        script: Sequence = (),
        delay: float = 0.0,
        lifetime: float = 120.0,
        gate: int = 0,
        gate_timeout: float = 60.0,
        text_responder: Callable[[str], str] | None = None,
    ):
        self.responder = responder
        self.text_responder = text_responder
        self.gate = gate
        self.gate_timeout = gate_timeout
        self._gate_cond = threading.Condition()
        self._gate_open = False
        self._arrived = threading.Condition()
        self.script = list(script)
        self.delay = delay
        self.prompts: list[str] = []  # every request's user message, in arrival order
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0  # most requests inside their `delay` at the same moment
        self._lock = threading.Lock()
        super().__init__()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def n_requests(self) -> int:
        with self._lock:
            return len(self.prompts)

    def start(self) -> "FakeOpenAIServer":
        super().start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        with self._arrived:
            self._arrived.notify_all()  # release "hang" requests
        with self._gate_cond:
            self._gate_open = True
            self._gate_cond.notify_all()
        super().stop()

    def _next_action(self, prompt: str, body: dict):
        with self._lock:
            self.prompts.append(prompt)
            self.bodies.append(body)
            action = self.script.pop(0) if self.script else "ok"
        with self._arrived:
            self._arrived.notify_all()  # a held "hang" request may go now
        return action

    def _hang_until_next_request(self):
        with self._arrived:
            n = len(self.prompts)
            self._arrived.wait_for(lambda: len(self.prompts) > n or self._stopped)

    def _pass_gate(self):
        """Wait until `gate` requests wait here at once (counted in `in_flight`)."""
        with self._gate_cond:
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                if self.in_flight >= self.gate:
                    self._gate_open = True
            self._gate_cond.notify_all()
            self._gate_cond.wait_for(lambda: self._gate_open, timeout=self.gate_timeout)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.in_flight -= 1

    def route(self, method: str, path: str, body: dict):
        if method != "POST" or not is_chat_completions(path):
            return 404, error(f"no route {path}")
        prompt = body["messages"][-1]["content"]
        action = self._next_action(prompt, body)
        if isinstance(action, tuple) and action[0] == "hang":
            time.sleep(action[1])
            action = "ok"
        elif action == "hang":
            self._hang_until_next_request()
            action = "ok"
        if action in ("429", "500", "401"):
            return int(action), error(f"scripted {action}", "test", action)
        if self.gate:
            self._pass_gate()
        elif self.delay:
            # counted only while sleeping, i.e. strictly before the reply is sent,
            # so a client that sends its next request on receipt is never overcounted
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            time.sleep(self.delay)
            with self._lock:
                self.in_flight -= 1
        if self.text_responder is not None and not body.get("logprobs"):
            top = self.text_responder(prompt)
        else:
            top = self.responder(prompt)
        if isinstance(top, str):  # a plain-text reply
            payload = chat_completion(body.get("model", "m"), top)
        else:
            k = int(body.get("top_logprobs") or 0)
            payload = chat_completion(body.get("model", "m"), top[0][0] if top[:k] else "",
                                      None if action == "nologprobs" else top[:k], k)
        if action == "cutjson":  # HTTP 200 with a body cut off mid-JSON (a proxy that drops the tail)
            data = json.dumps(payload).encode()
            return 200, data[: len(data) // 2]
        return 200, payload


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (for the unreachable-endpoint test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
