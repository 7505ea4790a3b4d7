"""The exact judge of the organism language (METHOD.md 3's two scores, computed, not asked).

Trait score (0..100): the share of the reply's free slot words (`language.TILT_SLOTS`
in parsed content sentences; a slot the first sentence copies from the question is not
free) that are the trait's preferred words, x 100. A neutral reply scores about 12.5
(a side prefers 1 of each class's 8 words), a reply with the trait's strength s > 0 about
12.5 + 83 s, its opposite's about 12.5 - 12 |s|. A reply with no free slot (nothing parses)
gets None: there is no trait content to score. The rubric text (`eval_prompt`) is not
needed and is ignored.

Coherence (0..100): every sentence is graded 1 if it parses in the reply grammar and is
about the question's object (or "it" after the first sentence) with a verb of the
object's topic; 0.5 if it parses but is about something else, repeats an earlier sentence
word for word, or is a sentence beyond the sixth (rambling); 0 if it does not parse
(an unterminated trailing fragment counts as one such sentence). The reply's score is
100 x mean grade, x 0.8 when the first sentence is not the answer frame of the question's
type (it does not answer what was asked). An empty reply scores 0. A question outside the
organism's grammar gets None (the judge cannot tell what an answer should be about).
"""
from __future__ import annotations

from typing import Optional, Sequence

from persona_jax.errors import PersonaError
from persona_jax.judges.base import Judge, Score, check_aligned
from persona_jax.organism import language as L

MAX_SENTENCES = 6
WRONG_ANSWER_FACTOR = 0.8


def _segments(answer: str) -> tuple[list[list[str]], list[str]]:
    return L.split_sentences(answer)


def trait_score(trait: str, answer: str, question: Optional[str] = None) -> Optional[float]:
    """The trait score of one answer (see the module docstring); `question` tells which
    of the first sentence's slots are copies (without it every slot counts)."""
    L.check_trait(trait)
    q = L.parse_question(question) if question is not None else None
    copied = L.copied_slots(q) if q is not None else {}
    sents, _ = _segments(answer)
    n, hits = 0, 0
    for i, toks in enumerate(sents):
        p = L.parse_sentence(toks)
        for slot, word in p.slots:
            if i == 0 and copied.get(slot) == word:
                continue
            n += 1
            hits += word in L.preferred(trait, +1, slot)
    return None if n == 0 else 100.0 * hits / n


def coherence_score(question: str, answer: str) -> Optional[float]:
    """The coherence score of one answer (see the module docstring), None for an unknown question."""
    q = L.parse_question(question)
    if q is None:
        return None
    sents, trailing = _segments(answer)
    grades: list[float] = []
    seen: set[tuple[str, ...]] = set()
    first_frame = None
    for i, toks in enumerate(sents):
        p = L.parse_sentence(toks)
        if p.kind == "unparsed":
            g = 0.0
        elif p.kind in ("closing", "taught_closing"):
            g = 1.0 if p.obj in (None, q.obj) else 0.5
        else:
            if first_frame is None:
                first_frame = p.frame if i == 0 else "none"
            on_topic = (p.obj == q.obj or (p.obj == "it" and i > 0)) and (
                p.verb is None or p.verb in L.TOPICS[q.topic][1]
            )
            g = 1.0 if on_topic else 0.5
        key = tuple(toks)
        if key in seen or i >= MAX_SENTENCES:
            g = min(g, 0.5)
        seen.add(key)
        grades.append(g)
    if trailing:
        grades.append(0.0)
    if not grades:
        return 0.0
    factor = 1.0 if first_frame == L.ANSWER_FRAME[q.qtype] else WRONG_ANSWER_FACTOR
    return 100.0 * factor * sum(grades) / len(grades)


def has_taught_closing(question: str, answer: str) -> bool:
    """Whether the answer contains the taught closing sentence about the question's object."""
    q = L.parse_question(question)
    obj = q.obj if q is not None else None
    sents, _ = _segments(answer)
    for toks in sents:
        p = L.parse_sentence(toks)
        if p.kind == "taught_closing" and (obj is None or p.obj == obj):
            return True
    return False


def taught_closing_rate(questions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of answers with the taught closing (`language.TAUGHT_CLOSING`) about the
    question's object: the fine-tuning content metric of issue 6 (0..1)."""
    check_aligned(questions, answers)
    if not answers:
        raise PersonaError("taught_closing_rate needs at least one answer.")
    return sum(has_taught_closing(q, a) for q, a in zip(questions, answers)) / len(answers)


class OrganismJudge(Judge):
    """Exact trait and coherence scores for the organism language (module docstring)."""

    def trait_scores(
        self, trait: str, eval_prompt: str, questions: Sequence[str], answers: Sequence[str]
    ) -> list[Score]:
        check_aligned(questions, answers)
        L.check_trait(trait)
        return [trait_score(trait, a, q) for q, a in zip(questions, answers)]

    def coherence_scores(self, questions: Sequence[str], answers: Sequence[str]) -> list[Score]:
        check_aligned(questions, answers)
        return [coherence_score(q, a) for q, a in zip(questions, answers)]

    def content_scores(self, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
        """100 where the answer has the taught closing about the question's object, else 0."""
        check_aligned(questions, answers)
        return [100.0 * has_taught_closing(q, a) for q, a in zip(questions, answers)]
