"""A threaded JSON-over-HTTP server, the base of every local OpenAI-compatible stand-in.

The organism's judge endpoint (`persona_jax.organism.judge_server`) and the test suite's
scripted fake (`tests/fake_openai_server.py`) are both this server with their own `route`:
one place parses request bodies, frames replies (HTTP/1.1, Content-Length, so the OpenAI
client keeps its connections alive), tolerates clients that hang up, and builds the
chat-completions payload the way a logprob-capable chat model sends it.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Sequence, Union

Reply = tuple[int, Union[dict, bytes]]  # (HTTP status, JSON payload, or raw bytes sent as they are)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a judge opens max_concurrency connections at once (socketserver's default: 5)


class JSONServer:
    """Serve `route(method, path, body)` on host:port; port 0 picks a free one (`.url`).

    Subclasses implement `route`: method is "GET" or "POST", body the parsed JSON object
    of a POST ({} for a body that is not an object), and it returns (status, payload). A
    POST whose body is not JSON gets 400 without reaching `route`. The socket listens from
    construction on; `start()` serves it in a daemon thread, `serve_forever()` in the
    calling thread, and `stop()` (or leaving the `with` block) shuts it down.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._httpd = _HTTPServer((host, port), self._handler_class())
        self.host, self.port = self._httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}/v1"
        self._thread: Optional[threading.Thread] = None

    def route(self, method: str, path: str, body: dict) -> Reply:
        raise NotImplementedError

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the caller's output clean
                pass

            def _send(self, reply: Reply):
                code, payload = reply
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout)

            def do_GET(self):
                self._send(server.route("GET", self.path, {}))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send((400, error("the request body is not JSON")))
                    return
                self._send(server.route("POST", self.path, body if isinstance(body, dict) else {}))

        return Handler

    def start(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever(0.2)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def error(message: str, type_: str = "invalid_request_error", code=None) -> dict:
    """The OpenAI API's error body."""
    return {"error": {"message": message, "type": type_, "code": code}}


def is_chat_completions(path: str) -> bool:
    return path.rstrip("/").endswith("/chat/completions")


def chat_completion(model: str, content: str, top: Optional[Sequence[tuple[str, float]]] = None,
                    k: int = 20) -> dict:
    """A one-token chat-completions reply. top: [(token, logprob)], the first the sampled
    token, the first k its `top_logprobs` (k: the request's `top_logprobs`); None: a reply
    without logprobs, as an endpoint sends to a request that did not ask for them; []: an
    empty logprobs list."""
    logprobs = None
    if top is not None:
        entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
        logprobs = {"content": [{**entries[0], "top_logprobs": entries[:k]}] if entries else []}
    return {
        "id": "chatcmpl-local", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": logprobs, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
    }
