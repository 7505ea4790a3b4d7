"""A model's mean trait expression on a trait's evaluation questions (no system prompt):
the score a fine-tuning run is judged by (METHOD.md 8), e.g. per preventative coefficient."""
from __future__ import annotations

from persona_jax.method.responses import Sampling, Spec, mean, sample_and_judge, scores
from persona_jax.method.steer_eval import conversation
from persona_jax.method.traits import Trait


def trait_score(model, judge, trait: Trait, csv_path: str, sampling: Sampling, n_questions: int = 0,
                n_per_question: int = 1, steering_for=None, progress: bool = False) -> dict:
    """Answers to the first `n_questions` (0: all) questions, `n_per_question` each, judged
    into `csv_path` (the reference's columns, resumable): {trait, coherence, n}, the means
    over scored rows (None when nothing was scored)."""
    questions = list(trait.questions)[: int(n_questions)] if n_questions else list(trait.questions)
    specs = [Spec(q, model.render_chat(conversation(q)), f"{trait.name}_{i}_{r}")
             for i, q in enumerate(questions) for r in range(int(n_per_question))]
    rows = sample_and_judge(model, specs, csv_path, trait.name, sampling, judge, trait.eval_prompt, steering_for,
                            progress=progress)
    return {"trait": mean(scores(rows, trait.name, csv_path)), "coherence": mean(scores(rows, "coherence", csv_path)),
            "n": len(rows)}
