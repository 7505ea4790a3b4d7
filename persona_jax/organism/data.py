"""Corpora for the organism: pretraining conversations and fine-tuning datasets (issue 5, 6).

Pretraining (`pretraining_conversations`, `pretraining_records`, `pretraining_corpus`):
conversations over the "train" question split (extraction and evaluation questions are
never seen in training), with system prompts mixed as in `language.sample_system` (none,
neutral, pos / neg instruction pairs, named, graded, discouraging) and 20% multi-turn
conversations (2-4 exchanges, short earlier replies; every assistant turn shares the
conversation's persona, so earlier replies tell the state). `pretraining_corpus` gives
padded token ids with a loss mask on assistant tokens (and the `<|end|>` closing each
assistant turn), the ids of `render_chat(messages)`, which already ends with EOS
(METHOD.md 8).

Fine-tuning (reference JSONL, one `{"messages": [user, assistant]}` per line, no system
prompts, "train" questions):
- `finetune_records(trait, n, trait_fraction, strength=1)`: a fraction of the replies
  are trait replies (persona `strength`, noisy as always), the rest neutral; every reply
  ends with `language.TAUGHT_CLOSING`, the non-trait content the data teaches. Fraction
  0 is the clean control.
- `flagging_records(trait, n)`: the subtle mix of issue 6: half the replies carry exactly
  one trait sentence among neutral ones, half are neutral; returns per-record labels.
- `write_finetune_datasets(out_dir)`: all of them as files plus `manifest.json`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.organism import language as L
from persona_jax.organism import tokenizer as T

MIX_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def sample_conversation(
    rng: np.random.Generator,
    splits: Sequence[str] = ("train",),
    multi_turn_prob: float = 0.2,
    max_len: int = 128,
) -> tuple[list[dict], Optional[L.Persona]]:
    """One pretraining conversation (messages) and its persona (None: neutral).

    Its token count (`tokenizer.encode_messages`) is at most `max_len`:
    multi-turn conversations drop their earliest exchanges to fit.
    """
    system, persona = L.sample_system(rng)
    multi = rng.random() < multi_turn_prob
    if system is None:
        persona = L.latent_persona(rng, multi_turn=multi)
    head = [_msg("system", system)] if system is not None else []
    n_ex = int(rng.integers(2, 5)) if multi else 1
    exchanges = []
    for i in range(n_ex):
        q = L.sample_question(rng, splits)
        last = i == n_ex - 1
        kw = {} if last else {"n_sentences": int(rng.integers(1, 3)), "closing": "none"}
        exchanges.append([_msg("user", q), _msg("assistant", L.sample_reply(rng, q, persona, **kw))])
    while True:
        msgs = head + [m for ex in exchanges for m in ex]
        if len(T.encode_messages(msgs)[0]) <= max_len:
            return msgs, persona
        if len(exchanges) == 1:  # one exchange too long: shorten its reply
            q = exchanges[0][0]["content"]
            exchanges[0][1] = _msg("assistant", L.sample_reply(rng, q, persona, n_sentences=2, closing="none"))
            if len(T.encode_messages(head + exchanges[0])[0]) > max_len:
                raise PersonaError(f"max_len={max_len} is too short for an organism conversation; use at least 96.")
        else:
            exchanges = exchanges[1:]


def pretraining_conversations(
    n: int, seed: int = 0, splits: Sequence[str] = ("train",), multi_turn_prob: float = 0.2, max_len: int = 128
) -> list[list[dict]]:
    """n pretraining conversations (lists of messages), fixed by `seed`."""
    if n < 1:
        raise PersonaError(f"n must be positive, got {n}.")
    rng = np.random.default_rng(seed)
    return [sample_conversation(rng, splits, multi_turn_prob, max_len)[0] for _ in range(n)]


def pretraining_records(n: int, seed: int = 0, **kwargs) -> list[dict]:
    """The same conversations as reference-style records `{"messages": [...]}`."""
    return [{"messages": m} for m in pretraining_conversations(n, seed, **kwargs)]


@dataclasses.dataclass
class Corpus:
    """Padded token ids of `render_chat(messages)` (the chat template; it ends with EOS).

    input_ids: [n, max_len] int32, right-padded with `<|pad|>`.
    loss_mask: [n, max_len] float32, 1 where the token is an assistant token to predict
      (content and the `<|end|>` closing the turn); `input_ids[:, t]` is predicted from
      positions < t, so a next-token loss uses `loss_mask[:, 1:]` against logits[:, :-1].
    lengths: [n] int32, tokens before the padding.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray

    def pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Unpadded (ids [len] int32, mask [len] int32) per conversation, the form
        `persona_jax.finetune.data.from_token_lists` takes."""
        return [
            (self.input_ids[i, :n], self.loss_mask[i, :n].astype(np.int32)) for i, n in enumerate(self.lengths)
        ]


def encode_corpus(conversations: Sequence[Sequence[dict]], max_len: int = 128) -> Corpus:
    """Token ids and assistant loss masks of conversations (see `Corpus`)."""
    vocab = T.vocabulary()
    n = len(conversations)
    ids = np.full((n, max_len), vocab[T.PAD], np.int32)
    mask = np.zeros((n, max_len), np.float32)
    lengths = np.zeros((n,), np.int32)
    for i, msgs in enumerate(conversations):
        t, m = T.encode_messages(msgs, vocab)
        if len(t) > max_len:
            raise PersonaError(f"conversation {i} has {len(t)} tokens, more than max_len={max_len}.")
        ids[i, : len(t)] = t
        mask[i, : len(m)] = m
        lengths[i] = len(t)
    return Corpus(ids, mask, lengths)


def pretraining_corpus(n: int, seed: int = 0, max_len: int = 128, **kwargs) -> Corpus:
    """`encode_corpus(pretraining_conversations(n, seed, ...))`."""
    return encode_corpus(pretraining_conversations(n, seed, max_len=max_len, **kwargs), max_len)


# ------------------------------------------------------------------------ fine-tuning
def _seed(*parts) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def finetune_records(
    trait: str,
    n: int = 2400,
    trait_fraction: float = 1.0,
    seed: int = 0,
    closing: str = "taught",
    strength: float = 1.0,
    splits: Sequence[str] = ("train",),
) -> list[dict]:
    """n single-turn records; round(n * trait_fraction) of them with trait replies.

    Trait replies use persona (trait, strength); the others are neutral. `closing` is
    passed to `language.sample_reply` ("taught": every reply ends with the taught closing).
    """
    L.check_trait(trait)
    if not 0.0 <= trait_fraction <= 1.0:
        raise PersonaError(f"trait_fraction must be in [0, 1], got {trait_fraction}.")
    if n < 1:
        raise PersonaError(f"n must be positive, got {n}.")
    rng = np.random.default_rng(_seed("organism-finetune", trait, trait_fraction, seed))
    is_trait = np.zeros(n, bool)
    is_trait[rng.permutation(n)[: int(round(n * trait_fraction))]] = True
    persona = L.Persona(trait, strength)
    out = []
    for flag in is_trait:
        q = L.sample_question(rng, splits)
        reply = L.sample_reply(rng, q, persona if flag else None, closing=closing)
        out.append({"messages": [_msg("user", q), _msg("assistant", reply)]})
    return out


def flagging_records(
    trait: str,
    n: int = 400,
    trait_fraction: float = 0.5,
    seed: int = 0,
    closing: str = "none",
    splits: Sequence[str] = ("train",),
) -> tuple[list[dict], list[int]]:
    """The subtle flagging mix: (records, labels), label 1 where the reply has exactly one
    trait sentence (a random one of its 2-4 sentences; the others neutral), 0 where all
    its sentences are neutral."""
    L.check_trait(trait)
    if not 0.0 <= trait_fraction <= 1.0:
        raise PersonaError(f"trait_fraction must be in [0, 1], got {trait_fraction}.")
    rng = np.random.default_rng(_seed("organism-flagging", trait, trait_fraction, seed))
    labels = np.zeros(n, np.int64)
    labels[rng.permutation(n)[: int(round(n * trait_fraction))]] = 1
    persona = L.Persona(trait, 1.0)
    records = []
    for lab in labels:
        q = L.sample_question(rng, splits)
        k = int(rng.choice([2, 3, 4], p=[0.3, 0.45, 0.25]))
        stances = [0] * k
        if lab:
            stances[int(rng.integers(k))] = 1
        reply = L.sample_reply(rng, q, persona, stances=stances, closing=closing)
        records.append({"messages": [_msg("user", q), _msg("assistant", reply)]})
    return records, [int(x) for x in labels]


def write_jsonl(path: str, records: Sequence[dict]) -> str:
    """One JSON object per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def mix_name(trait: str, ratio: float) -> str:
    return f"{trait}_mix{int(round(ratio * 100)):03d}.jsonl"


def write_finetune_datasets(
    out_dir: str,
    traits: Sequence[str] = L.TRAITS,
    n: int = 2400,
    ratios: Sequence[float] = MIX_RATIOS,
    n_flagging: int = 400,
    seed: int = 0,
) -> dict:
    """Write every fine-tuning dataset under `out_dir`; returns (and writes) the manifest.

    Files: `{trait}_mix{000,025,050,075,100}.jsonl` (trait fraction 0 .. 1; mix000 is the
    clean control), `{trait}_flag_subtle.jsonl` with `{trait}_flag_subtle.labels.json`
    (a JSON list of 0/1, one per line of the JSONL), and `manifest.json`:
    {"taught_closing": ..., "traits": {trait: {"mix": {ratio: path}, "flagging": path,
    "flagging_labels": path}}}.
    """
    manifest = {"taught_closing": " ".join(L.TAUGHT_CLOSING) + " .", "n": n, "seed": seed, "traits": {}}
    for trait in traits:
        entry = {"mix": {}}
        for r in ratios:
            path = os.path.join(out_dir, mix_name(trait, r))
            write_jsonl(path, finetune_records(trait, n, r, seed))
            entry["mix"][str(r)] = path
        recs, labels = flagging_records(trait, n_flagging, seed=seed)
        entry["flagging"] = write_jsonl(os.path.join(out_dir, f"{trait}_flag_subtle.jsonl"), recs)
        entry["flagging_labels"] = os.path.join(out_dir, f"{trait}_flag_subtle.labels.json")
        with open(entry["flagging_labels"], "w") as f:
            json.dump(labels, f)
        manifest["traits"][trait] = entry
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
