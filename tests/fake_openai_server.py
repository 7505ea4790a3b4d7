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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

TopList = list  # [(token, logprob), ...]

_MARK = re.compile(r"<<(-?\d+)>>")


def marker_responder(prompt: str) -> TopList:
    """Default: the number inside the first `<<n>>` in the prompt gets probability 1."""
    m = _MARK.search(prompt)
    return [(m.group(1) if m else "50", 0.0)]


class FakeOpenAIServer:
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
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)  # short poll: fast shutdown
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def n_requests(self) -> int:
        with self._lock:
            return len(self.prompts)

    def start(self) -> "FakeOpenAIServer":
        self._thread.start()
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
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

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

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, payload: dict, cut: bool = False):
                data = json.dumps(payload).encode()
                if cut:  # HTTP 200 with a body cut off mid-JSON (a proxy that drops the tail)
                    data = data[: len(data) // 2]
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                prompt = body["messages"][-1]["content"]
                action = server._next_action(prompt, body)
                if isinstance(action, tuple) and action[0] == "hang":
                    time.sleep(action[1])
                    action = "ok"
                elif action == "hang":
                    server._hang_until_next_request()
                    action = "ok"
                if action in ("429", "500", "401"):
                    self._send(int(action), {"error": {"message": f"scripted {action}",
                                                       "type": "test", "code": action}})
                    return
                if server.gate:
                    server._pass_gate()
                elif server.delay:
                    # counted only while sleeping, i.e. strictly before the reply is sent,
                    # so a client that sends its next request on receipt is never overcounted
                    with server._lock:
                        server.in_flight += 1
                        server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    time.sleep(server.delay)
                    with server._lock:
                        server.in_flight -= 1
                if server.text_responder is not None and not body.get("logprobs"):
                    top = server.text_responder(prompt)
                else:
                    top = server.responder(prompt)
                text = top if isinstance(top, str) else None  # a plain-text reply
                k = int(body.get("top_logprobs") or 0)
                top = [] if text is not None else top[:k]
                if action == "nologprobs" or text is not None:
                    logprobs = None
                elif not top:
                    logprobs = {"content": []}
                else:
                    logprobs = {"content": [{
                        "token": top[0][0], "logprob": top[0][1], "bytes": None,
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                         for t, lp in top],
                    }]}
                self._send(200, cut=action == "cutjson", payload={
                    "id": "chatcmpl-test", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model", "m"),
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant",
                                    "content": text if text is not None
                                    else (top[0][0] if top else "")},
                        "logprobs": logprobs, "finish_reason": "length",
                    }],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

        return Handler


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (for the unreachable-endpoint test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
