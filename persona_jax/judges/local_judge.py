"""`LocalJudge`: any local instruct model scores a rubric offline, exactly.

The API judges read the top-20 logprobs of ONE token; many tokenizers split "100" into
several tokens, so here each candidate answer ("0".."100", "REFUSAL") is scored by teacher
forcing: P(answer) = P(its tokens, then end of turn | rubric prompt). The prompt is
prefilled once, its KV cache is shared by all candidates, and all candidates run as one
batch. The candidate probabilities then go through the same aggregation as the API
judge (METHOD.md 3; None under 0.25 of mass on valid answers).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from persona_jax.runtime import batching
from persona_jax.runtime import apply
from persona_jax.errors import PersonaError
from persona_jax.judges.aggregate import get_aggregator
from persona_jax.judges.base import Judge, Score, check_aligned
from persona_jax.judges.rubrics import COHERENCE_PROMPT, render
from persona_jax.model.decoder import empty_cache

CANDIDATES = {
    "0_100": [str(i) for i in range(101)] + ["REFUSAL"],
    "0_10": [str(i) for i in range(10)] + ["REFUSAL"],
    "binary": ["YES", "NO", "REFUSAL"],
}


@functools.partial(jax.jit, static_argnames=("config",))
def candidate_logprobs(config, params, prompt, prompt_mask, cand, cand_len):
    """log P(candidate | prompt) for every candidate.

    prompt, prompt_mask: [1, P] int32, left-padded to a length bucket; cand: [C, Tc] int32
    right-padded, each ending with the end-of-turn token; cand_len: [C] real lengths.
    Returns [C] float32.
    """
    c = config
    p = prompt.shape[1]
    n, tc = cand.shape
    s = p + tc
    dtype = params["embed_tokens"]["embedding"].dtype
    cache = empty_cache(c, 1, s, dtype)
    ctx, n_real, kv_pos = apply.prefill_ctx(prompt_mask, s)
    first_logits, _, cache = apply.decoder_apply(c, params, prompt, ctx, cache=cache, logits="last")
    cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (x.shape[0], n) + x.shape[2:]), cache)
    cmask = (jnp.arange(tc)[None] < cand_len[:, None])
    cctx = apply.make_ctx(cmask.astype(jnp.int32), positions=n_real + jnp.broadcast_to(jnp.arange(tc), (n, tc)),
                               cache_index=p,
                               kv_valid=jnp.concatenate([jnp.broadcast_to(prompt_mask.astype(bool), (n, p)), cmask], 1),
                               kv_pos=jnp.broadcast_to(kv_pos, (n, s)))
    logits, _, _ = apply.decoder_apply(c, params, cand, cctx, cache=cache)
    # token t of a candidate is predicted by the prompt's last logits (t = 0) or by the
    # candidate's own logits at t - 1.
    lp_first = jax.nn.log_softmax(first_logits[0, -1])[cand[:, 0]]
    lp_rest = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), cand[:, 1:, None], axis=-1)[..., 0]
    lp_rest = jnp.where(cmask[:, 1:], lp_rest, 0.0)
    return lp_first + lp_rest.sum(axis=1)


class LocalJudge(Judge):
    """Judge with a local model (`persona_jax.load_model`); the rubric is the user turn."""

    collective = True  # its model may be sharded over every process's devices

    def __init__(self, model, aggregation: str = "0_100", coherence_prompt: str = COHERENCE_PROMPT,
                 progress: bool = True):
        self.model = model
        self.aggregate = get_aggregator(aggregation)
        self.aggregation = aggregation
        self.coherence_prompt = coherence_prompt
        self.progress = progress
        tok = model.require_tokenizer()
        eos = model.eos_token_ids
        if not eos:
            raise PersonaError(f"the judge model {model.name} has no EOS token, so answers cannot be scored as complete")
        end = eos[0]
        seqs = [list(tok(c, add_special_tokens=False)["input_ids"]) + [end] for c in CANDIDATES[aggregation]]
        tc = max(len(s) for s in seqs)
        self._cand = np.zeros((len(seqs), tc), np.int32)
        for i, s in enumerate(seqs):
            self._cand[i, : len(s)] = s
        self._cand_len = np.asarray([len(s) for s in seqs], np.int32)

    def answer_logprobs(self, prompt_text: str) -> dict[str, float]:
        """{candidate: log P(candidate as the whole answer)} for one rendered rubric."""
        m = self.model
        text = m.render_chat([{"role": "user", "content": prompt_text}])
        ids = m.require_tokenizer()(text, add_special_tokens=False)["input_ids"]
        tokens, mask = batching.pad_rows([ids], batching.bucket(len(ids)), m.pad_token_id, left=True)
        lp = np.asarray(candidate_logprobs(m.config, m.params, tokens, mask, self._cand, self._cand_len))
        return dict(zip(CANDIDATES[self.aggregation], lp.tolist()))

    def _scores(self, template: str, questions, answers) -> list[Score]:
        check_aligned(questions, answers)
        out = []
        for q, a in tqdm(list(zip(questions, answers)), desc="local judge", disable=not self.progress):
            lps = self.answer_logprobs(render(template, q, a))
            out.append(self.aggregate({k: v for k, v in lps.items() if math.isfinite(v)}))
        return out

    def trait_scores(self, trait: str, eval_prompt: str, questions: Sequence[str], answers: Sequence[str]) -> list[Score]:
        return self._scores(eval_prompt, questions, answers)

    def coherence_scores(self, questions: Sequence[str], answers: Sequence[str]) -> list[Score]:
        return self._scores(self.coherence_prompt, questions, answers)
