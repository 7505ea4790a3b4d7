"""The organism's multiple-choice capability task, written by code in its own language.

An item is an evaluation-split question and four replies in the `cais/mmlu` layout
(`method.capability.MCItem`), two sentences each: the right one is a neutral reply to
that question; each of
the three distractors is a neutral reply to another question, about an object of another
topic (so its nouns and verbs answer something else), whose question type is drawn at
random. Every reply names its object ("it" is written out as "your <object>"), so a
distractor is about something else in every sentence: the exact judge's coherence
(`judge.coherence_score`) gives the right reply 100 and a distractor at most 50 (every
sentence off the question's object, x 0.8 when its first sentence is another question
type's answer frame). The organism has no letters, so the task is scored as a cloze: the
length-normalised log-likelihood of each reply after the bare question in the chat
template (`capability.evaluate(..., prompt_format="question", scorings=("choice",))`).
The subject is the question's topic.
"""
from __future__ import annotations

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.method.capability import MCItem
from persona_jax.organism import language as L

N_CHOICES = 4
N_SENTENCES = 2  # the answer frame and one follow-up: short rows keep the steering sweep cheap
RIGHT_COHERENCE = 100.0  # the judge's coherence of the right reply
WRONG_COHERENCE_MAX = 50.0  # the most a distractor may get


def _reply(rng: np.random.Generator, question: str) -> str:
    q = L.parse_question(question)
    sents = L.sample_reply_sentences(rng, question, None, n_sentences=N_SENTENCES, closing="none")
    toks = []
    for s in sents:
        for t in s.tokens:
            toks.extend(("your", q.obj) if t == "it" else (t,))
    return " ".join(toks)


def task_items(n: int = 100, seed: int = 0, split: str = "eval") -> list[MCItem]:
    """`n` items over the questions of `split` (deterministic in `seed`)."""
    if n < 1:
        raise PersonaError(f"the organism capability task needs n >= 1 items; got {n}")
    rng = np.random.default_rng([seed, 18])
    pool = L.questions(split)
    by_topic: dict[str, list[str]] = {}
    for q in pool:
        by_topic.setdefault(L.parse_question(q).topic, []).append(q)
    topics = sorted(by_topic)
    order = rng.permutation(len(pool))
    items = []
    for j in range(n):
        question = pool[int(order[j % len(pool)])]
        topic = L.parse_question(question).topic
        others = [t for t in topics if t != topic]
        picked = rng.choice(len(others), size=N_CHOICES - 1, replace=False)
        distractor_qs = [by_topic[others[int(t)]][int(rng.integers(len(by_topic[others[int(t)]])))] for t in picked]
        replies = [_reply(rng, question)] + [_reply(rng, d) for d in distractor_qs]
        answer = int(rng.integers(N_CHOICES))
        choices = replies[1:answer + 1] + [replies[0]] + replies[answer + 1:]
        items.append(MCItem(question=question, choices=choices, answer=answer, subject=topic))
    return items
