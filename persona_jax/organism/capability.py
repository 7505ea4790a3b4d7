"""The organism's multiple-choice capability task, written by code in its own language.

An item is an evaluation-split question and four replies in the `cais/mmlu` layout
(`method.capability.MCItem`), two sentences each, all about the question's object: the
right one is a neutral reply to that question; the three distractors are neutral replies
to questions about the same object of the three other question types (advice, opinion,
future, plan), so each opens with another question type's answer frame ("your tree is
fine this week ." where "will my tree be fine next week ?" was asked). The exact judge's
coherence (`judge.coherence_score`) gives the right reply 100 and every distractor 80:
each sentence is on topic, and the x 0.8 wrong-answer factor applies because the reply
does not answer what was asked. Objects are written out ("it" becomes "your <object>").
The organism has no letters, so the task is scored as a cloze: the log-likelihood of each
reply after the bare question in the chat template (`capability.evaluate(...,
prompt_format="question", scorings=("choice_raw",))`; "choice" is its length-normalised
form). The subject is the question's topic.
"""
from __future__ import annotations

import functools

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.method.capability import MCItem
from persona_jax.organism import language as L

N_SENTENCES = 2  # the answer frame and one follow-up: short rows keep the steering sweep cheap


def _reply(rng: np.random.Generator, question: str) -> str:
    q = L.parse_question(question)
    sents = L.sample_reply_sentences(rng, question, None, n_sentences=N_SENTENCES, closing="none")
    toks = []
    for s in sents:
        for t in s.tokens:
            toks.extend(("your", q.obj) if t == "it" else (t,))
    return " ".join(toks)


@functools.lru_cache(maxsize=None)
def _by_object_and_type() -> dict:
    table: dict = {}
    for q in L.all_questions():
        p = L.parse_question(q)
        table.setdefault((p.obj, p.qtype), []).append(q)
    return table


def task_items(n: int = 100, seed: int = 0, split: str = "eval") -> list[MCItem]:
    """`n` items over the questions of `split` (deterministic in `seed`); the answer's
    position is uniform over the four choices."""
    if n < 1:
        raise PersonaError(f"the organism capability task needs n >= 1 items; got {n}")
    rng = np.random.default_rng([seed, 18])
    pool = L.questions(split)
    table = _by_object_and_type()
    order = rng.permutation(len(pool))
    items = []
    for j in range(n):
        question = pool[int(order[j % len(pool)])]
        p = L.parse_question(question)
        others = [t for t in L.QTYPES if t != p.qtype]
        distractor_qs = [table[(p.obj, t)][int(rng.integers(len(table[(p.obj, t)])))] for t in others]
        replies = [_reply(rng, d) for d in distractor_qs]
        answer = int(rng.integers(len(L.QTYPES)))
        replies.insert(answer, _reply(rng, question))
        items.append(MCItem(question=question, choices=replies, answer=answer, subject=p.topic))
    return items
