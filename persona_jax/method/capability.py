"""Capability under steering (METHOD.md 11): multiple-choice accuracy, MMLU style.

Items follow the `cais/mmlu` layout: `question` (text), `choices` (list of option texts),
`answer` (index of the right option), `subject` (e.g. "abstract_algebra"), read from a
local JSONL, CSV or parquet file (`read_items`); nothing is downloaded.

Two scorings, both teacher forced (no generation):

* `letter` -- lm-eval's MMLU prompt (`mmlu_prompt`: "The following are multiple choice
  questions (with answers) about {subject}." header, a blank line, the question, the
  options "A. ...", "B. ...", then "Answer:"), put in a user turn of the chat template
  with the generation prompt; the model's choice is the letter whose continuation is
  most probable. Which letter token: the one the text implies after the prompt. With a
  chat template the assistant's reply starts right after the generation prompt, so the
  continuation is the bare letter ("A"); without one (`chat=False`) it is lm-eval's
  " A" (target delimiter " "). Its tokens are `tokens(prompt + continuation)` minus the
  prompt's tokens (lm-eval's rule; when the boundary merges, the prompt's and the
  continuation's own tokens are concatenated). When every letter is one token (the usual
  case) the score is that token's next-token log-probability at the last prompt position
  (one forward per item); otherwise the log-likelihood of the letter's tokens.
* `choice` -- the length-normalised log-likelihood of each full option text as the
  reply: sum of the option's token log-probabilities divided by its token count, after
  the same prompt (`prompt_format="mmlu"`) or after the bare question
  (`prompt_format="question"`: the cloze form, used by the organism task, whose language
  has no letters). `choice_raw` is the same without the length normalisation.

Steering (METHOD.md 6) is per row: a layer x coefficient sweep is `Steering.sweep` rows in
the same batches of one compiled program. Positions keep their generation meaning, read
for a teacher-forced reply: `response` steers the last prompt token and every reply
token (what generating the reply would steer), `prompt` every prompt token, `all` every
position. In the letter fast path the prompt is the whole input, so `response` steers the
last prompt token, whose logits pick the letter.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import json
import os
import string
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from persona_jax.errors import PersonaError
from persona_jax.io.jsonl import read_jsonl
from persona_jax.runtime import apply, batching
from persona_jax.runtime.capture import length_bucket
from persona_jax.runtime.generate import tokenize
from persona_jax.steering.control import as_guards, guard_arrays
from persona_jax.steering.spec import POSITIONS, Steering, as_list, position_masks, steering_arrays

LETTERS = string.ascii_uppercase
SCORINGS = ("letter", "choice", "choice_raw")
PROMPT_FORMATS = ("mmlu", "question")


@dataclasses.dataclass
class MCItem:
    """One multiple-choice item in the `cais/mmlu` layout."""

    question: str
    choices: list[str]
    answer: int
    subject: str = ""


# ------------------------------------------------------------------------------ reading
def _parse_choices(value, where: str) -> list[str]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)  # pandas writes a list cell as its Python repr
            except (ValueError, SyntaxError):
                raise PersonaError(f"{where}: `choices` {value!r} is not a list; write it as a JSON list "
                                   "of option texts") from None
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise PersonaError(f"{where}: `choices` must be a list of at least 2 option texts; got {value!r}")
    if len(value) > len(LETTERS):
        raise PersonaError(f"{where}: {len(value)} choices; at most {len(LETTERS)} (one letter each)")
    return [str(c) for c in value]


def _parse_answer(value, n: int, where: str) -> int:
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        idx = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        idx = LETTERS.index(value.strip().upper())
    elif isinstance(value, float) and value.is_integer():
        idx = int(value)
    else:
        raise PersonaError(f"{where}: `answer` {value!r} is neither a choice index nor a letter")
    if not 0 <= idx < n:
        raise PersonaError(f"{where}: `answer` {value!r} points outside the {n} choices")
    return idx


def items_from_records(records: Sequence[dict], where: str) -> list[MCItem]:
    """Dicts with `question`, `choices`, `answer` (index or letter) and optional `subject`."""
    items = []
    for i, r in enumerate(records):
        w = f"{where} item {i}"
        missing = [k for k in ("question", "choices", "answer") if k not in r]
        if missing:
            raise PersonaError(f"{w} lacks {', '.join(missing)}; items need the cais/mmlu columns "
                               "question, choices, answer (and optionally subject)")
        if not isinstance(r["question"], str) or not r["question"].strip():
            raise PersonaError(f"{w}: `question` must be a non-empty string")
        choices = _parse_choices(r["choices"], w)
        subject = r.get("subject", "")
        subject = "" if subject is None or (isinstance(subject, float) and np.isnan(subject)) else str(subject)
        items.append(MCItem(r["question"], choices, _parse_answer(r["answer"], len(choices), w), subject))
    if not items:
        raise PersonaError(f"{where} holds no items")
    return items


def read_items(path: str, limit: Optional[int] = None) -> list[MCItem]:
    """Multiple-choice items from a local `.jsonl`, `.csv` or `.parquet` file (the
    `cais/mmlu` columns; a CSV's `choices` cell holds a JSON list). `limit` keeps the first n."""
    path = str(path)
    if not os.path.isfile(path):
        raise PersonaError(f"multiple-choice file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        records = []
        for n, rec in read_jsonl(path, "multiple-choice file"):
            if not isinstance(rec, dict):
                raise PersonaError(f"{path} line {n} is not a JSON object")
            records.append(rec)
    elif ext in (".csv", ".parquet"):
        import pandas as pd
        if ext == ".csv":
            try:
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                raise PersonaError(f"{path} is not a readable CSV ({type(e).__name__}: {e})") from None
        else:
            if importlib.util.find_spec("pyarrow") is None:
                raise PersonaError(f"reading {path} needs pyarrow (pip install pyarrow), "
                                   "or convert the file to JSONL or CSV")
            try:
                frame = pd.read_parquet(path)
            except Exception as e:  # pyarrow raises its own types for a damaged file
                raise PersonaError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        records = frame.to_dict(orient="records")
    else:
        raise PersonaError(f"{path}: unknown multiple-choice file type {ext!r}; use .jsonl, .csv or .parquet")
    items = items_from_records(records, path)
    return items[:limit] if limit else items


# ------------------------------------------------------------------------------ prompts
def mmlu_prompt(item: MCItem) -> str:
    """lm-eval's zero-shot MMLU text: subject header, question, lettered options, "Answer:"."""
    subject = item.subject.replace("_", " ").strip()
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{head}{item.question.strip()}{options}\nAnswer:"


def render_prompt(model, item: MCItem, prompt_format: str = "mmlu", chat: bool = True) -> str:
    """The prompt text: `mmlu_prompt` (or the bare question) as a chat user turn with the
    generation prompt, or the raw text (with the tokenizer's BOS) when `chat` is False."""
    if prompt_format not in PROMPT_FORMATS:
        raise PersonaError(f"unknown prompt_format {prompt_format!r}; use one of: {', '.join(PROMPT_FORMATS)}")
    text = mmlu_prompt(item) if prompt_format == "mmlu" else item.question
    if chat:
        return model.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    bos = getattr(model.require_tokenizer(), "bos_token", None) or ""
    return text if text.startswith(bos) else bos + text


def delimiter(chat: bool) -> str:
    """Text between the prompt and a letter / option: none after a chat generation prompt,
    lm-eval's " " after a raw "Answer:"."""
    return "" if chat else " "


def continuation_ids(model, prompts: Sequence[str], continuations: Sequence[str]):
    """(prompt ids, continuation ids) per pair: the continuation's tokens are those of
    prompt + continuation after the prompt's own, or its own tokens if the boundary merges."""
    unique = list(dict.fromkeys(prompts))  # an item's prompt repeats once per option
    by_text = dict(zip(unique, tokenize(model, unique)))
    p_ids = [by_text[p] for p in prompts]
    full = tokenize(model, [p + c for p, c in zip(prompts, continuations)])
    out = []
    for i, (p, f) in enumerate(zip(p_ids, full)):
        if f[: len(p)] == p:
            c = f[len(p):]
        else:
            c = tokenize(model, [continuations[i]])[0]
        if not p:
            raise PersonaError(f"prompt {i} tokenizes to zero tokens")
        if not c:
            raise PersonaError(f"continuation {continuations[i]!r} adds no tokens after prompt {i}")
        out.append(c)
    return p_ids, out


# ------------------------------------------------------------------------- array core
@functools.partial(jax.jit, static_argnames=("config",))
def next_token_logprobs(config, params, tokens, mask, targets, interventions=None, positions_masks=None):
    """Log-probabilities of chosen next tokens after left-padded prompts.

    tokens, mask: [B, T] left-padded (the last column is every row's last prompt token);
    targets: [B, C] int32 token ids. Returns [B, C] float32 log-softmax values.
    """
    ctx = apply.make_ctx(mask)
    ctx.update(positions_masks or {})
    logits, _, _ = apply.decoder_apply(config, params, tokens, ctx, interventions=interventions, logits="last")
    logp = jax.nn.log_softmax(logits[:, -1], axis=-1)
    return jnp.take_along_axis(logp, targets, axis=1)


@functools.partial(jax.jit, static_argnames=("config",))
def continuation_logprobs(config, params, tokens, prompt_lens, total_lens, interventions=None, positions_masks=None):
    """Sum of log p(token_t | tokens_<t) over t in [prompt_len, total_len) per row.

    tokens: [B, T] right-padded; prompt_lens, total_lens: [B] int32 (0 for padding rows).
    Returns [B] float32.
    """
    t = tokens.shape[1]
    pos = jnp.arange(t)[None, :]
    mask = (pos < total_lens[:, None]).astype(jnp.int32)
    ctx = apply.make_ctx(mask)
    ctx.update(positions_masks or {})
    logits, _, _ = apply.decoder_apply(config, params, tokens, ctx, interventions=interventions,
                                       right_padded=True)
    logits = logits[:, :-1]  # position t-1 predicts token t
    tok = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    nxt = pos[:, 1:]
    w = (nxt >= prompt_lens[:, None]) & (nxt < total_lens[:, None])
    return jnp.where(w, tok, 0.0).sum(axis=1)


def teacher_forced_masks(steerings: Sequence[Steering], prompt_lens: np.ndarray, total_lens: np.ndarray,
                         length: int) -> dict:
    """{add_pos, abl_pos} [K, B, T] for right-padded prompt + reply rows: `all` every real
    position, `prompt` positions < prompt_len, `response` positions >= prompt_len - 1."""
    t = np.arange(length)[None, :]
    pl, tl = prompt_lens[:, None], total_lens[:, None]
    by_mode = {"all": t < tl, "prompt": t < pl, "response": (t >= pl - 1) & (t < tl)}
    out = {}
    for kind, key in (("add", "add_pos"), ("ablate", "abl_pos")):
        masks = [by_mode[s.positions].astype(np.float32) for s in steerings if s.kind == kind]
        if masks:
            out[key] = np.stack(masks)
    return out


def padded_length(n: int) -> int:
    """Padded length of a batch whose longest row has n tokens: multiples of 16 up to 64
    (short multiple-choice rows), then `capture.length_bucket`."""
    return -(-max(n, 1) // 16) * 16 if n <= 64 else length_bucket(n)


def _check(model, steerings, n):
    for s in steerings:
        s.validate(model.num_layers, model.hidden_size, n)


def _batch_arrays(model, steerings, idx, bs):
    """Intervention arrays for the batch of inputs `idx` (then bs - len(idx) padding
    rows): per-row coefficients and layers are sliced to the batch first, so a sweep of
    many rows costs O(batch) per call."""
    local = []
    for s in steerings:
        coef = np.atleast_1d(np.asarray(s.coef, np.float32))
        per_row = coef.size > 1 or s.rows_layers is not None
        if per_row:
            s = dataclasses.replace(
                s, coef=np.broadcast_to(coef, (max(coef.size, 0 if s.rows_layers is None else len(s.rows_layers)),))[idx].tolist(),
                rows_layers=None if s.rows_layers is None else [int(s.rows_layers[i]) for i in idx])
        local.append(s)
    rows = np.full(bs, -1)
    rows[: len(idx)] = np.arange(len(idx))
    return steering_arrays(local, model.num_layers, model.hidden_size, rows, bs)


def _with_guards(model, guards, interventions, bs):
    """The call's intervention arrays plus the guards' rows (`control.guard_arrays`)."""
    if not guards:
        return interventions
    return {**(interventions or {}), **guard_arrays(guards, model.num_layers, model.hidden_size, bs)}


def score_next_tokens(model, prompt_ids: Sequence[Sequence[int]], targets: np.ndarray, steering=None,
                      batch_size: int = 16, progress: bool = False, guard=None) -> np.ndarray:
    """[N, C] log-probabilities of `targets` [N, C] (token ids) as the next token after each
    prompt (token ids). `steering`: `Steering`(s) with per-row coefficients in input order;
    `guard`: `Guard`(s) (one ceiling each) acting at the last prompt position, whose state
    picks the next token, as in generation."""
    steerings = as_list(steering)
    guards = as_guards(guard)
    n = len(prompt_ids)
    _check(model, steerings, n)
    targets = np.asarray(targets, np.int32)
    out = np.zeros(targets.shape, np.float32)
    lengths = [len(p) for p in prompt_ids]
    bs, batches = batching.by_length(lengths, batch_size, model.mesh)
    for rows in tqdm(batches, desc="letters", disable=not progress):
        idx = rows[rows >= 0]
        seqs = [prompt_ids[r] if r >= 0 else [model.pad_token_id] for r in rows]
        tokens, mask = batching.pad_rows(seqs, padded_length(max(len(s) for s in seqs)), model.pad_token_id, left=True)
        tg = np.zeros((bs, targets.shape[1]), np.int32)
        tg[: len(idx)] = targets[idx]
        interventions = pos = None
        if steerings:
            interventions = _batch_arrays(model, steerings, idx, bs)
            pos = position_masks(steerings, "prefill", mask)
        if guards:
            interventions = _with_guards(model, guards, interventions, bs)
            last = np.zeros(mask.shape, np.float32)
            last[:, -1] = 1.0  # left-padded: every row's last prompt token
            pos = {**(pos or {}), "grd_pos": np.broadcast_to(last, (len(guards),) + last.shape)}
        tokens, mask, tg = batching.place(model.mesh, tokens, mask, tg)
        res = batching.to_host(next_token_logprobs(model.config, model.params, tokens, mask, tg, interventions, pos))
        out[idx] = res[: len(idx)]
    return out


def score_continuations(model, prompt_ids: Sequence[Sequence[int]], cont_ids: Sequence[Sequence[int]],
                        steering=None, batch_size: int = 16, progress: bool = False, guard=None) -> np.ndarray:
    """[N] summed log-probabilities of each continuation (token ids) after its prompt
    (token ids), teacher forced. `steering` as in `score_next_tokens`; positions as in the
    module docstring. `guard`: `Guard`(s) (one ceiling each) acting at every position that
    predicts a continuation token (the last prompt token and the reply's), each on its own
    state, as generating the reply would."""
    steerings = as_list(steering)
    guards = as_guards(guard)
    n = len(prompt_ids)
    _check(model, steerings, n)
    out = np.zeros(n, np.float32)
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, cont_ids)]
    bs, batches = batching.by_length(lengths, batch_size, model.mesh)
    for rows in tqdm(batches, desc="choices", disable=not progress):
        idx = rows[rows >= 0]
        seqs = [list(prompt_ids[r]) + list(cont_ids[r]) if r >= 0 else [model.pad_token_id] for r in rows]
        length = padded_length(max(len(s) for s in seqs))
        tokens, _ = batching.pad_rows(seqs, length, model.pad_token_id, left=False)
        pl = np.zeros(bs, np.int32)
        tl = np.zeros(bs, np.int32)
        pl[: len(idx)] = [len(prompt_ids[r]) for r in idx]
        tl[: len(idx)] = [lengths[r] for r in idx]
        interventions = pos = None
        if steerings:
            interventions = _batch_arrays(model, steerings, idx, bs)
            pos = teacher_forced_masks(steerings, pl, tl, length)
        if guards:
            interventions = _with_guards(model, guards, interventions, bs)
            t = np.arange(length)[None, :]
            resp = ((t >= pl[:, None] - 1) & (t < tl[:, None] - 1)).astype(np.float32)  # positions predicting the reply
            pos = {**(pos or {}), "grd_pos": np.broadcast_to(resp, (len(guards),) + resp.shape)}
        tokens, pl_d, tl_d = batching.place(model.mesh, tokens, pl, tl)
        res = batching.to_host(continuation_logprobs(model.config, model.params, tokens, pl_d, tl_d, interventions, pos))
        out[idx] = res[: len(idx)]
    return out


# --------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class CapabilityResult:
    """Accuracy per scoring as [n_layers, n_coefs] percent arrays, and one row per
    (layer, coef, item) with the scores behind it. `layers` is [None] without steering."""

    layers: list
    coefs: list[float]
    accuracy: dict[str, np.ndarray]
    rows: list[dict]
    letter_tokens: Optional[list[list[int]]] = None  # the letters' continuation tokens (first item)

    def at(self, scoring: str, layer=None) -> list[float]:
        """Accuracy over the coefficients at one layer (the only one by default)."""
        i = 0 if layer is None else self.layers.index(layer)
        return [float(x) for x in self.accuracy[scoring][i]]


def _argmax(values: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(values, np.float64)))


def evaluate(model, items: Sequence[MCItem], vector: Optional[np.ndarray] = None, layers: Sequence[int] = (),
             coefs: Sequence[float] = (0.0,), positions: str = "response", scorings: Sequence[str] = ("letter", "choice"),
             prompt_format: str = "mmlu", chat: bool = True, batch_size: int = 16,
             progress: bool = False, guard=None, gate=None) -> CapabilityResult:
    """Accuracy (percent) of `items` at every (layer, coef) of a steering sweep with `vector`
    [L+1, D], all settings as per-row steering in the same batched calls; without a vector,
    unsteered (one setting). `scorings`: any of "letter", "choice", "choice_raw" (see the
    module docstring; "letter" needs prompt_format="mmlu"). `guard`: `Guard`(s) with one
    ceiling each, acting at every position that picks an answer token; `gate`: [n_items]
    0/1, the steering applies to an item only where it is 1 (conditional steering: the
    condition read on each item's prompt)."""
    items = list(items)
    if not items:
        raise PersonaError("capability evaluation got no items")
    bad = [s for s in scorings if s not in SCORINGS]
    if bad or not scorings:
        raise PersonaError(f"unknown scoring(s) {bad or list(scorings)}; use any of: {', '.join(SCORINGS)}")
    if "letter" in scorings and prompt_format != "mmlu":
        raise PersonaError("letter scoring needs prompt_format='mmlu' (the options must be shown with their letters)")
    if positions not in POSITIONS:
        raise PersonaError(f"unknown steering positions {positions!r}; use one of: {', '.join(POSITIONS)}")
    if vector is None:
        settings = [(None, 0.0)]
        layers_out, coefs_out = [None], [0.0]
    else:
        if not layers:
            raise PersonaError("a steering sweep needs at least one layer")
        layers_out, coefs_out = [int(l) for l in layers], [float(c) for c in coefs]
        settings = [(l, c) for l in layers_out for c in coefs_out]
    prompts = [render_prompt(model, it, prompt_format, chat) for it in items]
    delim = delimiter(chat)
    n_items, n_set = len(items), len(settings)

    gate_of = np.ones(len(items), np.float32) if gate is None else np.asarray(gate, np.float32)
    if gate_of.shape != (len(items),):
        raise PersonaError(f"capability gate has {gate_of.size} values for {len(items)} items")

    def steer(pairs, item_of):
        """Per-row sweep steering for rows whose settings are `pairs` [(layer, coef)] and
        whose items are `item_of`."""
        if vector is None:
            return None
        return Steering.sweep(vector, [p[0] for p in pairs], [p[1] * gate_of[i] for p, i in zip(pairs, item_of)],
                              positions=positions)

    rows = [{"layer": l, "coef": c, "index": i, "subject": it.subject, "answer": it.answer}
            for (l, c) in settings for i, it in enumerate(items)]
    letter_tokens = None
    if "letter" in scorings:
        n_choices = [len(it.choices) for it in items]
        # letter continuations: per item (their tokens may depend on the prompt's end)
        flat_p, flat_c, owner = [], [], []
        for i, it in enumerate(items):
            for k in range(n_choices[i]):
                flat_p.append(prompts[i])
                flat_c.append(delim + LETTERS[k])
                owner.append((i, k))
        p_ids, c_ids = continuation_ids(model, flat_p, flat_c)
        letter_tokens = [c_ids[j] for j, (i, _) in enumerate(owner) if i == 0]
        prompt_of = {}
        for j, (i, _) in enumerate(owner):
            prompt_of.setdefault(i, p_ids[j])
        logp = np.full((n_set * n_items, max(n_choices)), -np.inf, np.float32)
        if all(len(c) == 1 for c in c_ids):  # one forward per (setting, item)
            targets = np.zeros((n_items, max(n_choices)), np.int32)
            for j, (i, k) in enumerate(owner):
                targets[i, k] = c_ids[j][0]
            res = score_next_tokens(model, [prompt_of[i] for _ in settings for i in range(n_items)],
                                    np.tile(targets, (n_set, 1)),
                                    steer([s for s in settings for _ in range(n_items)],
                                          [i for _ in settings for i in range(n_items)]),
                                    batch_size=batch_size, progress=progress, guard=guard)
            for s in range(n_set):
                for i in range(n_items):
                    logp[s * n_items + i, : n_choices[i]] = res[s * n_items + i, : n_choices[i]]
        else:  # a letter of several tokens: the log-likelihood of each letter's tokens
            res = score_continuations(model, [p_ids[j] for _ in settings for j in range(len(owner))],
                                      [c_ids[j] for _ in settings for j in range(len(owner))],
                                      steer([s for s in settings for _ in owner], [i for _ in settings for i, _ in owner]),
                                      batch_size=batch_size, progress=progress, guard=guard)
            for s in range(n_set):
                for j, (i, k) in enumerate(owner):
                    logp[s * n_items + i, k] = res[s * len(owner) + j]
        for r, row in enumerate(rows):
            vals = logp[r, : len(items[row["index"]].choices)]
            row["letter_logprobs"] = [float(v) for v in vals]
            row["letter_pred"] = _argmax(vals)
    if "choice" in scorings or "choice_raw" in scorings:
        flat_p, flat_c, owner = [], [], []
        for i, it in enumerate(items):
            for k, text in enumerate(it.choices):
                flat_p.append(prompts[i])
                flat_c.append(delim + text)
                owner.append((i, k))
        p_ids, c_ids = continuation_ids(model, flat_p, flat_c)
        res = score_continuations(model, [p_ids[j] for _ in settings for j in range(len(owner))],
                                  [c_ids[j] for _ in settings for j in range(len(owner))],
                                  steer([s for s in settings for _ in owner], [i for _ in settings for i, _ in owner]),
                                  batch_size=batch_size, progress=progress, guard=guard)
        sums = {(s, i): [] for s in range(n_set) for i in range(n_items)}
        ntok = {i: [] for i in range(n_items)}
        for s in range(n_set):
            for j, (i, k) in enumerate(owner):
                sums[(s, i)].append(float(res[s * len(owner) + j]))
                if s == 0:
                    ntok[i].append(len(c_ids[j]))
        for r, row in enumerate(rows):
            s, i = divmod(r, n_items)
            row["choice_logprobs"] = sums[(s, i)]
            row["choice_tokens"] = ntok[i]
            row["choice_pred"] = _argmax(np.asarray(sums[(s, i)]) / np.asarray(ntok[i]))
            row["choice_raw_pred"] = _argmax(sums[(s, i)])
    accuracy = {}
    for sc in scorings:
        acc = np.zeros((len(layers_out), len(coefs_out)))
        for r, row in enumerate(rows):
            s = r // n_items
            acc[s // len(coefs_out), s % len(coefs_out)] += row[f"{sc}_pred"] == row["answer"]
        accuracy[sc] = 100.0 * acc / n_items
    return CapabilityResult(layers_out, coefs_out, accuracy, rows, letter_tokens)


CSV_COLUMNS = ("layer", "coef", "index", "subject", "answer", "letter_pred", "letter_logprobs",
               "choice_pred", "choice_raw_pred", "choice_logprobs", "choice_tokens")


def write_csv(result: CapabilityResult, path: str) -> None:
    """One row per (layer, coef, item); list cells as JSON (call on the writing process)."""
    from persona_jax.io.csvio import write_csv_atomic
    cols = [c for c in CSV_COLUMNS if c in result.rows[0]]
    cells = [{c: (json.dumps(r[c]) if isinstance(r[c], list) else "" if r[c] is None else r[c]) for c in cols}
             for r in result.rows]
    write_csv_atomic(path, cols, cells)
