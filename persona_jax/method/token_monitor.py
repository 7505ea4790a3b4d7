"""Per-token and per-turn monitoring: the persona-vector projection of every token of a
conversation, and the mean of every turn (how a persona drifts over a long conversation).

For each token t and hidden-state index l (HF `output_hidden_states` convention, METHOD.md 5)
    proj[l, t] = h_l[t] . v[l] / |v[l]|
computed on device (the [L+1, B, T, D] states never leave it). A conversation is
- a list of chat messages, rendered with the model's chat template (no generation prompt):
  a token belongs to turn i when its text lies inside message i's content, template
  tokens (role headers, separators) have turn -1;
- or a rendered prompt plus a response (a response CSV's `prompt` + `answer`, the text
  `capture` reads): the question's span inside the prompt is turn 0 (user) and the
  answer turn 1 (assistant).
Inputs: a JSONL of `{"messages": [...]}` (any roles, any number of turns) or a response CSV
(`question`, `answer`, and `prompt` when present). Outputs: `TokenTrace` arrays, a per-token
and a per-turn CSV, and a self-contained HTML page (tokens shaded by projection on a
diverging scale with a legend, a per-turn line plot in inline SVG, vector and layer named).
"""
from __future__ import annotations

import dataclasses
import functools
import html
import math
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.io.atomic import atomic_open
from persona_jax.io.jsonl import read_jsonl
from persona_jax.io.csvio import read_csv, write_csv_atomic
from persona_jax.io.distributed import writer_only
from persona_jax.io.vectors import check_vector_shape
from persona_jax.model import sharding as sh
from persona_jax.runtime import apply, batching
from persona_jax.runtime.capture import length_bucket


# ---- conversations ---------------------------------------------------------------------
@dataclasses.dataclass
class Conversation:
    """One input: `messages` (chat turns) or `prompt` + `answer` (rendered prompt, response)."""

    name: str
    messages: Optional[list[dict]] = None
    prompt: Optional[str] = None
    answer: Optional[str] = None
    question: Optional[str] = None  # located inside `prompt` as the user turn


def _check_messages(msgs, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise PersonaError(f'{where} has no "messages" list; write {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PersonaError(f'{where}: message {i} needs a string "role" and a string "content"')
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_conversations(path: str) -> list[Conversation]:
    """A multi-turn JSONL (`{"messages": [...]}` per line, optional "id") or a response CSV
    (`question`, `answer`; with a `prompt` column the rendered prompt is used as written)."""
    if not os.path.isfile(path):
        raise PersonaError(f"input {path} does not exist; pass a .jsonl of conversations or a response .csv")
    if path.endswith(".jsonl"):
        out = []
        for n, rec in read_jsonl(path, "input"):
            where = f"{path} line {n}"
            msgs = _check_messages(rec.get("messages") if isinstance(rec, dict) else None, where)
            out.append(Conversation(str(rec.get("id", f"line {n}")), messages=msgs))
        if not out:
            raise PersonaError(f"{path} holds no conversations")
        return out
    if path.endswith(".csv"):
        fields, rows = read_csv(path, required=("question", "answer"))
        if not rows:
            raise PersonaError(f"{path} has no rows")
        out = []
        for i, r in enumerate(rows):
            name = r.get("question_id") or f"row {i + 2}"
            if "prompt" in fields and r["prompt"]:
                out.append(Conversation(name, prompt=r["prompt"], answer=r["answer"], question=r["question"]))
            else:
                out.append(Conversation(name, messages=[{"role": "user", "content": r["question"]},
                                                        {"role": "assistant", "content": r["answer"]}]))
        return out
    raise PersonaError(f"input {path} is neither .jsonl nor .csv; pass conversations as JSONL or a response CSV")


def segments(model, conv: Conversation) -> tuple[str, list[tuple[str, str, int, int]]]:
    """(text, [(role, content, char_start, char_end)]) of a conversation.

    Message contents are found in the rendered text in order; a content the template
    changed (not found verbatim) gets an empty span (start == end) and so no tokens.
    """
    if conv.messages is None:
        text = conv.prompt + conv.answer
        q = conv.question or ""
        qs = conv.prompt.rfind(q) if q else -1
        segs = [("user", q, qs, qs + len(q)) if qs >= 0 else ("user", q, 0, 0),
                ("assistant", conv.answer, len(conv.prompt), len(text))]
        return text, segs
    text = model.render_chat(conv.messages, add_generation_prompt=False)
    segs, pos = [], 0
    for m in conv.messages:
        c = m["content"]
        at = text.find(c, pos) if c else -1
        if at < 0:
            segs.append((m["role"], c, pos, pos))
            continue
        segs.append((m["role"], c, at, at + len(c)))
        pos = at + len(c)
    return text, segs


# ---- projections -----------------------------------------------------------------------
@dataclasses.dataclass
class Turn:
    index: int
    role: str
    content: str
    n_tokens: int
    mean: float  # mean projection of the turn's tokens at the trace's layer (NaN: none)


@dataclasses.dataclass
class TokenTrace:
    """One conversation's per-token projections.

    Attributes:
      name: the conversation's label.
      text: the text the model read (chat-template rendering or prompt + answer).
      token_ids: [T] ints.
      pieces: [T] strings; piece t is the text from token t's start to token t+1's start,
        so the pieces concatenate to `text`.
      turn: [T] ints, the turn whose content holds the token, -1 for template tokens.
      projections: [L+1, T] float32, every hidden-state index.
      layer: the hidden-state index `projection` and the turn means use.
      turns: one `Turn` per message (or question / answer).
    """

    name: str
    text: str
    token_ids: np.ndarray
    pieces: list[str]
    turn: np.ndarray
    projections: np.ndarray
    layer: int
    turns: list[Turn]

    @property
    def projection(self) -> np.ndarray:
        """[T] projections at `layer`."""
        return self.projections[self.layer]


@functools.partial(jax.jit, static_argnames=("config",))
def projection_arrays(config, params, tokens, mask, unit):
    """tokens, mask [B, T] (right-padded); unit [L+1, D] float32 -> [L+1, B, T] float32
    projections of every hidden state on its layer's unit vector."""
    ctx = apply.make_ctx(mask)
    _, hidden, _ = apply.decoder_apply(config, params, tokens, ctx, capture="hidden", logits="none",
                                       right_padded=True)
    return jnp.einsum("lbtd,ld->lbt", hidden.astype(jnp.float32), unit)


def _tokenize_with_offsets(model, text: str, where: str):
    tok = model.require_tokenizer()
    if not getattr(tok, "is_fast", False):
        raise PersonaError(f"the tokenizer of {model.name} is not a fast tokenizer; per-token monitoring needs "
                           "character offsets (a tokenizer.json)")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if not ids:
        raise PersonaError(f"{where} has no tokens")
    return ids, offs


def _pieces(text: str, offsets) -> list[str]:
    starts, last = [], 0
    for s, _ in offsets:  # monotone starts (a token inside a multi-token character repeats it)
        last = max(last, int(s))
        starts.append(last)
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def unit_vectors(vector: np.ndarray) -> np.ndarray:
    """[L+1, D] -> rows divided by their norms (zero rows stay zero), float32."""
    v = np.asarray(vector, np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(n > 0, v / np.where(n > 0, n, 1.0), 0.0).astype(np.float32)


def token_projections(model, vector: np.ndarray, layer: int, conversations: Sequence[Union[Conversation, list]],
                      batch_size: int = 4) -> list[TokenTrace]:
    """Per-token projections of every conversation on `vector` ([L+1, D]).

    conversations: `Conversation`s or plain message lists. Returns one `TokenTrace` each
    (all hidden-state indices in `projections`, turn means at `layer`).
    """
    check_vector_shape(np.asarray(vector), model.num_layers, model.hidden_size, "the persona vector")
    if not 0 <= int(layer) <= model.num_layers:
        raise PersonaError(f"layer {layer} is outside 0..{model.num_layers} for this model")
    if not np.linalg.norm(np.asarray(vector)[layer]) > 0:
        raise PersonaError(f"the persona vector is zero at layer {layer}; pick another layer")
    if batch_size < 1:
        raise PersonaError(f"batch_size must be 1 or more, got {batch_size}")
    convs = [c if isinstance(c, Conversation) else Conversation(f"conversation {i}", messages=_check_messages(
        list(c), f"conversation {i}")) for i, c in enumerate(conversations)]
    if not convs:
        raise PersonaError("token_projections got no conversations")
    prepared = []
    for c in convs:
        text, segs = segments(model, c)
        ids, offs = _tokenize_with_offsets(model, text, f"conversation {c.name!r}")
        turn = np.full(len(ids), -1, np.int32)
        for k, (_, _, a, b) in enumerate(segs):
            if b > a:  # tokens whose characters start inside the content span
                turn[[j for j, (s, e) in enumerate(offs) if a <= s < b and e > s]] = k
        prepared.append((c, text, segs, ids, offs, turn))

    unit = unit_vectors(vector)
    unit_dev = jax.device_put(unit, sh.replicated(model.mesh)) if model.mesh is not None else jnp.asarray(unit)
    projs: list[Optional[np.ndarray]] = [None] * len(prepared)
    ids_all = [p[3] for p in prepared]
    _, batches = batching.by_length([len(s) for s in ids_all], batch_size, model.mesh)
    for rows in batches:
        idx = rows[rows >= 0]
        seqs = batching.batch_seqs(ids_all, rows, filler=[model.pad_token_id])
        length = length_bucket(max(len(s) for s in seqs))
        tokens, mask = batching.pad_rows(seqs, length, model.pad_token_id, left=False)
        tokens, mask = batching.place(model.mesh, tokens, mask)
        out = batching.to_host(projection_arrays(model.config, model.params, tokens, mask, unit_dev))
        for j, i in enumerate(idx):
            projs[i] = out[:, j, : len(prepared[i][3])]

    traces = []
    for (c, text, segs, ids, offs, turn), p in zip(prepared, projs):
        turns = []
        for k, (role, content, _, _) in enumerate(segs):
            sel = turn == k
            turns.append(Turn(k, role, content, int(sel.sum()),
                              float(p[layer, sel].astype(np.float64).mean()) if sel.any() else float("nan")))
        traces.append(TokenTrace(c.name, text, np.asarray(ids), _pieces(text, offs), turn, p, int(layer), turns))
    return traces


# ---- CSV -------------------------------------------------------------------------------
TOKEN_COLUMNS = ("conversation", "token_index", "token_id", "token", "turn", "role", "projection")
TURN_COLUMNS = ("conversation", "turn", "role", "n_tokens", "mean_projection", "content")


def traces_from_generation(model, generation, names: Optional[Sequence[str]] = None) -> list[TokenTrace]:
    """`TokenTrace`s of the replies of a `generate(..., monitor=pj.Monitor(v, layers))` call,
    with no second pass: the projections the engine computed while decoding.

    Reply token t gets the projection of its own hidden state, the one it was fed with at
    the next decode step (row t + 1 of `generation.projections`, as a teacher-forced
    `token_projections` of prompt + reply gives it); the last token, never fed, gets NaN.
    `projections` is [L+1, T] with the monitor's layers filled and NaN elsewhere; `layer`
    is the monitor's first; one turn, the assistant's reply. The pieces are each token's
    own decoded text."""
    if getattr(generation, "projections", None) is None:
        raise PersonaError("this generation carries no projections; call pj.generate(..., monitor=pj.Monitor(v, layers))")
    tok = model.require_tokenizer()
    layers = list(generation.monitor_layers)
    out = []
    for i, ids in enumerate(generation.tokens):
        n = len(ids)
        proj = np.full((model.num_layers + 1, n), np.nan, np.float32)
        rows = np.asarray(generation.projections[i], np.float32)  # [n, M]: row t = the state token t came from
        proj[layers, : max(n - 1, 0)] = rows[1:].T
        pieces = [tok.decode([int(t)]) for t in ids]
        text = "".join(pieces)
        mean = proj[layers[0]][np.isfinite(proj[layers[0]])]
        out.append(TokenTrace(name=names[i] if names else f"reply {i}", text=text, token_ids=np.asarray(ids),
                              pieces=pieces, turn=np.zeros(n, int), projections=proj, layer=layers[0],
                              turns=[Turn(0, "assistant", text, n, float(mean.mean()) if mean.size else float("nan"))]))
    return out


def token_rows(traces: Sequence[TokenTrace]) -> list[dict]:
    rows = []
    for tr in traces:
        roles = {t.index: t.role for t in tr.turns}
        for j, (tid, piece, k, v) in enumerate(zip(tr.token_ids, tr.pieces, tr.turn, tr.projection)):
            rows.append({"conversation": tr.name, "token_index": j, "token_id": int(tid), "token": piece,
                         "turn": int(k), "role": roles.get(int(k), "template"), "projection": float(v)})
    return rows


def turn_rows(traces: Sequence[TokenTrace]) -> list[dict]:
    return [{"conversation": tr.name, "turn": t.index, "role": t.role, "n_tokens": t.n_tokens,
             "mean_projection": t.mean, "content": t.content} for tr in traces for t in tr.turns]


def write_csvs(traces: Sequence[TokenTrace], token_csv: str, turn_csv: str) -> None:
    """One row per token (`TOKEN_COLUMNS`) and one per turn (`TURN_COLUMNS`), atomically."""
    write_csv_atomic(token_csv, TOKEN_COLUMNS, token_rows(traces))
    write_csv_atomic(turn_csv, TURN_COLUMNS, turn_rows(traces))


# ---- HTML ------------------------------------------------------------------------------
NEG_RGB, POS_RGB = (33, 102, 172), (178, 24, 43)  # diverging blue - white - red
ROLE_COLOURS = {"system": "#7b3294", "user": "#4d4d4d", "assistant": "#d95f02"}


def colour(x: float, centre: float, scale: float) -> tuple[str, bool]:
    """(css rgb, dark background) for value x: white at `centre`, full colour at +-`scale`."""
    t = 0.0 if not np.isfinite(x) or scale <= 0 else float(np.clip((x - centre) / scale, -1.0, 1.0))
    end = POS_RGB if t > 0 else NEG_RGB
    rgb = [round(255 + abs(t) * (e - 255)) for e in end]
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", abs(t) > 0.55


def colour_scale(traces: Sequence[TokenTrace], centre: Union[str, float] = "median") -> tuple[float, float]:
    """(centre, scale): centre = the median of the content tokens' projections ("median"),
    0 ("zero") or a number; scale = the 98th percentile of |projection - centre| (so one
    outlier, such as a first token, does not wash out the rest)."""
    vals = np.concatenate([tr.projection[tr.turn >= 0] for tr in traces] + [np.zeros(0)])
    if vals.size == 0:
        vals = np.concatenate([tr.projection for tr in traces])
    vals = vals[np.isfinite(vals)]  # (a generation's last token has no projection)
    if centre == "median":
        c = float(np.median(vals))
    elif centre == "zero":
        c = 0.0
    else:
        try:
            c = float(centre)
        except (TypeError, ValueError):
            raise PersonaError(f"colour centre {centre!r} is not 'median', 'zero' or a number") from None
    s = float(np.percentile(np.abs(vals - c), 98)) if vals.size else 1.0
    return c, (s if s > 0 else 1.0)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (m * step) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def turn_plot_svg(trace: TokenTrace, centre: float, width: int = 720, height: int = 230) -> str:
    """Inline SVG: mean projection per turn, one line per role (coloured by role), dashed
    line at the colour scale's centre."""
    pts = [(t.index, t.mean, t.role) for t in trace.turns if np.isfinite(t.mean)]
    if not pts:
        return "<p class='note'>No turn has tokens to plot.</p>"
    left, right, top, bottom = 64, 16, 14, 40
    ys = [y for _, y, _ in pts] + [centre]
    lo, hi = min(ys), max(ys)
    pad = 0.08 * (hi - lo if hi > lo else max(abs(hi), 1.0))
    lo, hi = lo - pad, hi + pad
    n = max(len(trace.turns) - 1, 1)
    X = lambda i: left + (width - left - right) * (i / n if len(trace.turns) > 1 else 0.5)
    Y = lambda y: top + (height - top - bottom) * (1 - (y - lo) / (hi - lo))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="mean projection per turn">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="#fafafa" stroke="#bbb"/>']
    for v in _ticks(lo, hi):
        out.append(f'<line x1="{left - 4}" x2="{width - right}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#e3e3e3"/>'
                   f'<text x="{left - 7}" y="{Y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.4g}</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{Y(centre):.1f}" y2="{Y(centre):.1f}" '
               'stroke="#888" stroke-dasharray="4 3"/>')
    step = max(1, len(trace.turns) // 20)
    for t in trace.turns:
        if t.index % step == 0:
            out.append(f'<text x="{X(t.index):.1f}" y="{height - bottom + 15}" text-anchor="middle" '
                       f'font-size="11">{t.index}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle" '
               'font-size="12">turn</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2:.0f}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">mean projection</text>')
    for role in dict.fromkeys(r for _, _, r in pts):  # one line per role: user and assistant turns alternate
        out.append(f'<polyline fill="none" stroke="{ROLE_COLOURS.get(role, "#1b9e77")}" stroke-width="1.5" '
                   'stroke-opacity="0.8" points="'
                   + " ".join(f"{X(i):.1f},{Y(y):.1f}" for i, y, r in pts if r == role) + '"/>')
    for i, y, role in pts:
        out.append(f'<circle cx="{X(i):.1f}" cy="{Y(y):.1f}" r="4.5" fill="{ROLE_COLOURS.get(role, "#1b9e77")}">'
                   f'<title>turn {i} ({html.escape(role)}): {y:.4g}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def _legend(centre: float, scale: float) -> str:
    stops = ", ".join(colour(centre + scale * t, centre, scale)[0] + f" {50 + 50 * t:.0f}%"
                      for t in np.linspace(-1, 1, 9))
    roles = " ".join(f'<span class="dot" style="background:{c}"></span>{r}' for r, c in ROLE_COLOURS.items())
    return (f'<div class="legend"><div class="bar" style="background:linear-gradient(to right, {stops})"></div>'
            f'<div class="ticks"><span>&le; {centre - scale:.4g}</span><span>{centre:.4g}</span>'
            f'<span>&ge; {centre + scale:.4g}</span></div>'
            f'<div class="roles">turn plot: {roles}</div></div>')


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px;margin:0 0 6px} h2{font-size:16px;margin:28px 0 6px} code{background:#f2f2f2;padding:0 3px}
.meta{font-size:13px;color:#444;line-height:1.45}
.legend{margin:10px 0 4px;width:420px;font-size:12px}
.bar{height:14px;border:1px solid #aaa}
.ticks{display:flex;justify-content:space-between}
.roles{margin-top:4px}.dot{display:inline-block;width:10px;height:10px;border-radius:5px;margin:0 3px 0 10px}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13.5px;line-height:1.9;white-space:pre-wrap;
word-break:break-word;border:1px solid #ddd;padding:10px;background:#fff}
.tokens span.t{border-radius:2px}
.tokens span.tpl{color:#777;font-size:11.5px}
.tokens span.dark{color:#fff}
.badge{display:inline-block;font-family:system-ui,sans-serif;font-size:11px;color:#fff;border-radius:3px;
padding:0 5px;margin:0 4px 0 2px;line-height:1.5;white-space:nowrap}
.note{font-size:12px;color:#666}
"""


def html_page(traces: Sequence[TokenTrace], vector_name: str, model_name: str = "",
              centre: Union[str, float] = "median", title: str = "") -> str:
    """A self-contained HTML page (no external assets) for the traces."""
    if not traces:
        raise PersonaError("no traces to draw")
    layer = traces[0].layer
    c, s = colour_scale(traces, centre)
    centre_txt = {"median": "the median of the content tokens on this page", "zero": "zero"}.get(
        centre if isinstance(centre, str) else "", "the chosen centre")
    head = title or f"Persona projection per token: {vector_name}, layer {layer}"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(head)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(head)}</h1>",
             f'<p class="meta">Vector <code>{html.escape(vector_name)}</code> at layer <b>{layer}</b> '
             "(hidden-state index, HF <code>output_hidden_states</code> convention)" + (f", model <code>{html.escape(model_name)}</code>" if model_name else "") + ". "
             f"Each token is shaded by the projection of its layer-{layer} hidden state on the unit vector "
             f"v[{layer}]/|v[{layer}]|: white at {c:.4g} ({centre_txt}), red above, blue below, full colour at "
             f"&plusmn;{s:.4g} (98th percentile of the distance). Grey small text is chat-template markup "
             "(also shaded). Hover a token for its value; the plot shows each turn's mean.</p>",
             _legend(c, s)]
    for tr in traces:
        parts.append(f"<h2>{html.escape(tr.name)}</h2>")
        parts.append(turn_plot_svg(tr, c))
        roles = {t.index: t for t in tr.turns}
        body, prev = [], None
        for j, (piece, k, v) in enumerate(zip(tr.pieces, tr.turn, tr.projection)):
            k = int(k)
            if k >= 0 and k != prev:
                t = roles[k]
                body.append(f'<span class="badge" style="background:{ROLE_COLOURS.get(t.role, "#1b9e77")}">'
                            f"{html.escape(t.role)} &middot; turn {k} &middot; mean {t.mean:.4g}</span>")
            if k >= 0:
                prev = k
            bg, dark = colour(float(v), c, s)
            cls = "t" + (" tpl" if k < 0 else "") + (" dark" if dark else "")
            body.append(f'<span class="{cls}" style="background:{bg}" title="token {j} &middot; id '
                        f'{int(tr.token_ids[j])} &middot; {float(v):.4g}">{html.escape(piece)}</span>')
        parts.append('<div class="tokens">' + "".join(body) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


@writer_only
def write_html(traces: Sequence[TokenTrace], path: str, vector_name: str, model_name: str = "",
               centre: Union[str, float] = "median", title: str = "") -> None:
    page = html_page(traces, vector_name, model_name, centre, title)
    with atomic_open(path) as f:
        f.write(page)
