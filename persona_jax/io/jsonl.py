"""The reference's training JSONL: one `{"messages": [{"role", "content"}, ...]}` per line.

One reader for every user of the format (fine-tuning data, projection columns, flagging).
Lines are split on "\\n" only: a JSON line never holds a raw newline, but text that
`str.splitlines` or universal-newline reading would also split on (a raw CR, U+2028,
U+2029, U+0085, form feed ...) may appear raw inside a JSON string written with
`ensure_ascii=False`, and must stay inside its line. A UTF-8 byte-order mark at the
start of the file and a "\\r" before each "\\n" (files written on Windows) are accepted.
Every string `json` can hold round-trips, NUL included (written as \\u0000).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

from persona_jax.errors import PersonaError
from persona_jax.io.atomic import atomic_open
from persona_jax.io.distributed import writer_only


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[tuple[int, object]]:
    """[(line number, parsed JSON value)] of every non-blank line of `path`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PersonaError(f"{what} {path} does not exist; check the path")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PersonaError(f"{path}, line {n} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                               "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except ValueError as e:
            raise PersonaError(f"{path}, line {n} is not valid JSON ({getattr(e, 'msg', e)}); each line must be "
                               "one JSON object") from None
    return out


def validate_messages(obj, where: str) -> list[dict]:
    """The {role, content} list of one conversation record, checked; raises PersonaError
    naming `where` when it is not a non-empty list of string role/content pairs whose last
    turn is a non-empty assistant reply."""
    if not isinstance(obj, dict) or "messages" not in obj:
        raise PersonaError(f"{where} has no \"messages\" key; expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise PersonaError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PersonaError(f"{where}: message {i} must be an object with string \"role\" and \"content\"")
        if m["role"] == "assistant" and not m["content"].strip():
            raise PersonaError(f"{where}: assistant message {i} has empty content; remove the line or fill in the reply")
    if msgs[-1]["role"] != "assistant":
        raise PersonaError(f"{where}: the last message has role {msgs[-1]['role']!r}; the last turn must be the assistant reply to train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_conversations(path: str | os.PathLike) -> list[tuple[int, dict, list[dict]]]:
    """[(line number, the line's record as written, its checked {role, content} messages)].

    The record keeps every other key (projection columns, labels), so a rewrite keeps them.
    """
    out = []
    for n, obj in read_jsonl(path, "training data file"):
        out.append((n, obj, validate_messages(obj, f"{os.fspath(path)}, line {n}")))
    if not out:
        raise PersonaError(f"{os.fspath(path)} holds no conversations; expected one {{\"messages\": [...]}} object per line")
    return out


@writer_only
def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> str:
    """One JSON object per line, UTF-8 (non-ASCII kept as is), written atomically by process 0."""
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return os.fspath(path)
