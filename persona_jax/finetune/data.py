"""Training data: reference JSONL conversations -> token ids + assistant loss masks, and
the deterministic, length-bucketed batch order the trainer consumes.

An `Example` is one sequence: `ids` [T] int32 and `mask` [T] (1 where token t is a
training target, i.e. the loss at position t-1 predicts ids[t] with weight mask[t]).
For chat data the mask covers exactly the assistant turns as the chat template renders
them (content, the template's end-of-turn marker and whatever the template writes up to
the next turn), plus the EOS appended when the template does not end with it (METHOD.md
8: "training text = chat template of the full conversation + EOS"). Pretraining
corpora (the organism's) come in pre-tokenized with their own masks.

Batch order is a pure function of (seed, step): step s of epoch e = s // steps_per_epoch
takes batch s % steps_per_epoch of an order drawn from `np.random.default_rng([seed, e])`.
So a resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Sequence

import numpy as np

from persona_jax.runtime import batching
from persona_jax.io import chat
from persona_jax.io import jsonl
from persona_jax.io.jsonl import validate_messages  # noqa: F401 (re-exported)
from persona_jax.errors import PersonaError

OVERFLOW = ("truncate", "drop", "error")


@dataclasses.dataclass
class Example:
    """One training sequence: ids [T] int32, mask [T] int32 (1 = token is a target)."""

    ids: np.ndarray
    mask: np.ndarray

    def __len__(self):
        return len(self.ids)


@dataclasses.dataclass
class DataStats:
    """What loading did: counts for the run report."""

    source: str = ""
    n_lines: int = 0
    n_examples: int = 0
    n_truncated: int = 0  # longer than max_length, cut to it
    n_dropped: int = 0  # overflow="drop", or no target token left after truncation
    n_tokens: int = 0
    n_loss_tokens: int = 0


# ---------------------------------------------------------------------------------------
# Reading and validating the reference JSONL format.

def read_conversations(path: str) -> list[tuple[int, list[dict]]]:
    """Read a reference `.jsonl` (one `{"messages": [{role, content}, ...]}` per line).

    Returns [(line_number, messages)]; blank lines are skipped. A line that is not a
    JSON object with a non-empty `messages` list of {role, content} dicts whose last
    turn is a non-empty assistant reply raises PersonaError naming file and line
    (the project's one reader, `persona_jax.io.jsonl`).
    """
    return [(n, msgs) for n, _, msgs in jsonl.read_conversations(path)]


# ---------------------------------------------------------------------------------------
# Chat template -> ids + assistant mask.

def render(tokenizer, messages, add_generation_prompt: bool) -> str:
    """Chat-template text, the project's one rendering rule (`persona_jax.io.chat`)."""
    return chat.render(tokenizer, messages, add_generation_prompt)


def assistant_spans(tokenizer, messages, where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """Training text and the character spans of every assistant turn in it.

    text = template(all messages) + EOS unless the stripped text already ends with EOS
    (the reference's rule). The span of assistant turn i runs from the end of
    template(messages[:i], add_generation_prompt=True) to the end of
    template(messages[:i+1]); the appended EOS belongs to the last span.
    """
    text = render(tokenizer, messages, add_generation_prompt=False)
    eos = tokenizer.eos_token
    if eos and not text.strip().endswith(eos):
        text += eos
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        except Exception as e:  # templates that refuse an empty or system-only prefix
            raise PersonaError(f"{where}: the chat template cannot render the prompt before assistant turn {i} ({e})") from None
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        start = len(prefix)
        if not (text.startswith(prefix) and text.startswith(upto)) or len(upto) < start:
            raise PersonaError(
                f"{where}: the chat template renders conversation prefixes inconsistently, so assistant turn {i} "
                "cannot be located; train on single-turn conversations or pass pre-tokenized examples")
        end = len(text) if i == len(messages) - 1 else len(upto)
        spans.append((start, end))
    return text, spans


def tokenize_conversation(tokenizer, messages, where: str = "conversation") -> Example:
    """One conversation -> Example with the mask on exactly the assistant tokens.

    Tokens are those of the whole training text (no special tokens added by the
    tokenizer: the template writes BOS itself where the model wants one). A token is an
    assistant token when its first character lies in an assistant span (fast tokenizers,
    via offsets); otherwise by token counts of the text prefixes.
    """
    text, spans = assistant_spans(tokenizer, messages, where)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
        mask = np.zeros(len(ids), np.int32)
        for a, b in spans:
            mask |= ((starts >= a) & (starts < b)).astype(np.int32)
    else:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
        mask = np.zeros(len(ids), np.int32)
        for a, b in spans:
            na = len(tokenizer(text[:a], add_special_tokens=False)["input_ids"])
            nb = len(tokenizer(text[:b], add_special_tokens=False)["input_ids"])
            mask[na:nb] = 1
    return Example(ids, mask)


def _fit(ex: Example, max_length: int | None, overflow: str, where: str, stats: DataStats) -> Example | None:
    if max_length is not None and len(ex) > max_length:
        if overflow == "error":
            raise PersonaError(f"{where} is {len(ex)} tokens long, over max_length={max_length}; "
                               "raise max_length or use overflow='truncate' or 'drop'")
        if overflow == "drop":
            stats.n_dropped += 1
            return None
        ex = Example(ex.ids[:max_length], ex.mask[:max_length])
        stats.n_truncated += 1
    if ex.mask[1:].sum() == 0:  # nothing to learn (the first token is never a target)
        stats.n_dropped += 1
        return None
    stats.n_examples += 1
    stats.n_tokens += len(ex)
    stats.n_loss_tokens += int(ex.mask[1:].sum())
    return ex


def _check_overflow(overflow: str):
    if overflow not in OVERFLOW:
        raise PersonaError(f"unknown overflow mode {overflow!r}; use one of: {', '.join(OVERFLOW)}")


def load_jsonl(path: str, tokenizer, max_length: int | None = None,
               overflow: str = "truncate") -> tuple[list[Example], DataStats]:
    """Reference-format JSONL -> (examples, stats).

    overflow: what to do with a sequence longer than max_length: "truncate" (keep the
    first max_length tokens; counted in stats.n_truncated), "drop" (counted in
    stats.n_dropped) or "error" (PersonaError naming the line). Examples left with no
    target token are dropped and counted.
    """
    _check_overflow(overflow)
    stats = DataStats(source=path)
    examples = []
    for n, msgs in read_conversations(path):
        stats.n_lines += 1
        where = f"{path}, line {n}"
        ex = _fit(tokenize_conversation(tokenizer, msgs, where), max_length, overflow, where, stats)
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise PersonaError(f"{path}: no example is left to train on after max_length={max_length}")
    return examples, stats


def from_conversations(conversations: Iterable[list[dict]], tokenizer, max_length: int | None = None,
                       overflow: str = "truncate", source: str = "conversations") -> tuple[list[Example], DataStats]:
    """Like `load_jsonl` for in-memory conversations (lists of {role, content})."""
    _check_overflow(overflow)
    stats = DataStats(source=source)
    examples = []
    for i, msgs in enumerate(conversations):
        stats.n_lines += 1
        where = f"{source}[{i}]"
        msgs = validate_messages({"messages": msgs}, where)
        ex = _fit(tokenize_conversation(tokenizer, msgs, where), max_length, overflow, where, stats)
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise PersonaError(f"{source}: no example is left to train on")
    return examples, stats


def from_token_lists(pairs: Sequence, max_length: int | None = None, overflow: str = "truncate",
                     vocab_size: int | None = None, source: str = "tokens") -> tuple[list[Example], DataStats]:
    """Pre-tokenized examples: a sequence of (ids, mask) pairs (mask None = every token
    is a target) or `Example`s, e.g. the organism's pretraining corpus."""
    _check_overflow(overflow)
    stats = DataStats(source=source)
    examples = []
    for i, p in enumerate(pairs):
        stats.n_lines += 1
        ids, mask = (p.ids, p.mask) if isinstance(p, Example) else p
        ids = np.asarray(ids)
        mask = np.ones(len(ids), np.int32) if mask is None else np.asarray(mask)
        where = f"{source}[{i}]"
        if ids.ndim != 1 or mask.shape != ids.shape:
            raise PersonaError(f"{where}: ids and mask must be 1-d and of equal length; got shapes {ids.shape} and {mask.shape}")
        if not np.issubdtype(ids.dtype, np.integer) and ids.size:
            raise PersonaError(f"{where}: token ids must be integers; got dtype {ids.dtype}")
        if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise PersonaError(f"{where}: token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
        ex = _fit(Example(ids.astype(np.int32), (mask != 0).astype(np.int32)), max_length, overflow, where, stats)
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise PersonaError(f"{source}: no example is left to train on")
    return examples, stats


def fingerprint(examples: Sequence[Example]) -> str:
    """A hash of the data, stored with checkpoints so a resume on other data is refused."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.int64(len(ex)).tobytes())
        h.update(ex.ids.astype(np.int32).tobytes())
        h.update(ex.mask.astype(np.int8).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Batch order and padding.

def epoch_batches(lengths: np.ndarray, per_step: int, seed: int, epoch: int, group: int = 8) -> list[np.ndarray]:
    """The batches (example indices) of one epoch, in training order.

    Shuffle with `default_rng([seed, epoch])`, sort pools of `group` batches by length
    (so a batch pads little), cut into batches of `per_step`, shuffle the batch order.
    The last batch may be short. A pure function of its arguments.
    """
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    pool = max(1, group) * per_step
    chunks = []
    for i in range(0, n, pool):
        idx = perm[i:i + pool]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        chunks.extend(idx[j:j + per_step] for j in range(0, len(idx), per_step))
    order = rng.permutation(len(chunks))
    return [chunks[k] for k in order]


class BatchOrder:
    """Step -> example indices, deterministic in (seed, step); epochs cached."""

    def __init__(self, examples: Sequence[Example], per_step: int, seed: int, group: int = 8):
        self.lengths = np.asarray([len(e) for e in examples])
        self.per_step, self.seed, self.group = per_step, seed, group
        self.steps_per_epoch = -(-len(examples) // per_step)
        self._cache: dict[int, list[np.ndarray]] = {}

    def __call__(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_batches(self.lengths, self.per_step, self.seed, epoch, self.group)}
        return self._cache[epoch][k]


def pad_examples(examples: Sequence[Example], idx: np.ndarray, rows: int, length: int | None = None,
                 pad_id: int = 0):
    """Right-padded arrays for examples[idx], grown to `rows` with empty rows.

    Returns tokens, attention_mask, loss_mask: [rows, T] int32 with T = `length` or the
    bucketed longest sequence (`batching.bucket`).
    """
    seqs = [examples[i] for i in idx]
    t = length or batching.bucket(max(len(e) for e in seqs))
    ids = [e.ids.tolist() for e in seqs] + [[]] * (rows - len(seqs))
    tokens, attn = batching.pad_rows(ids, t, pad_id, left=False)
    loss = np.zeros_like(attn)
    for r, e in enumerate(seqs):
        loss[r, :len(e)] = e.mask
    return tokens, attn, loss
