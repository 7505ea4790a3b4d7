"""LocalJudge equals a brute-force computation from the same model's probabilities (PyTorch + numpy)."""
import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.judges.local_judge import CANDIDATES, LocalJudge
from persona_jax.judges.rubrics import render
from persona_jax.testing import char_tokenizer, tiny_checkpoint

RUBRIC = "Question: {question}\nAnswer: {answer}\nRate 0-100."


@pytest.fixture(scope="module")
def number_model(tmp_path_factory):
    """A random qwen2 whose LM head prefers digits and end-of-turn, so answers "0".."100"
    hold more than the 0.25 mass and the score is a real number, not None."""
    src = str(tmp_path_factory.mktemp("src"))
    tm = tiny_checkpoint(src, "qwen2", tie_word_embeddings=False)
    tok = char_tokenizer()
    digits = [tok.convert_tokens_to_ids(str(i)) for i in range(10)]
    eos = tok.convert_tokens_to_ids("<|end|>")
    with torch.no_grad():
        # dim 0 of the residual stream is +10 on digit tokens and -10 elsewhere, and no
        # block writes to it: after the prompt the head favours digits, after a digit EOS.
        tm.model.embed_tokens.weight[:, 0] = -10.0
        tm.model.embed_tokens.weight[digits, 0] = 10.0
        for layer in tm.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        tm.model.norm.weight.zero_()
        tm.model.norm.weight[0] = 1.0
        tm.lm_head.weight.zero_()
        for i, d in enumerate(digits):
            tm.lm_head.weight[d, 0] = -(0.5 + 0.05 * i)  # unequal, so the mean is not trivial
        tm.lm_head.weight[eos, 0] = 0.8
    d = str(tmp_path_factory.mktemp("numbers"))
    tm.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return tm, pj.load_model(d)


def _brute_force(tm, tok, prompt_text, candidates):
    """log P(candidate + EOS | prompt) by one full forward per candidate, in float64."""
    out = {}
    pids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    for c in candidates:
        cids = tok(c, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|end|>")]
        with torch.no_grad():
            lg = torch.log_softmax(tm(torch.tensor([pids + cids])).logits[0].double(), -1)
        out[c] = sum(lg[len(pids) - 1 + i, t].item() for i, t in enumerate(cids))
    return out


def test_local_judge_equals_brute_force(number_model):
    tm, model = number_model
    judge = LocalJudge(model, progress=False)
    qs, ans = ["Is it fine?", "Why?"], ["yes it is", "because"]
    scores = judge.trait_scores("t", RUBRIC, qs, ans)
    for q, a, s in zip(qs, ans, scores):
        text = model.render_chat([{"role": "user", "content": render(RUBRIC, q, a)}])
        lp = _brute_force(tm, model.tokenizer, text, CANDIDATES["0_100"])
        p = {k: np.exp(v) for k, v in lp.items()}
        nums = np.array([p[str(i)] for i in range(101)])
        assert nums.sum() >= 0.25, "fixture must put enough mass on numbers"
        expected = float((nums * np.arange(101)).sum() / nums.sum())
        assert s is not None and abs(s - expected) < 1e-3
        mine = judge.answer_logprobs(render(RUBRIC, q, a))
        assert max(abs(mine[k] - lp[k]) for k in lp) < 1e-4


def test_local_judge_none_under_quarter_mass(tmp_path):
    """A plain random model puts almost no mass on numbers: the score is None, never 0."""
    tm = tiny_checkpoint(str(tmp_path), "llama")
    model = pj.load_model(str(tmp_path))
    judge = LocalJudge(model, progress=False)
    text = model.render_chat([{"role": "user", "content": render(RUBRIC, "q", "a")}])
    lp = _brute_force(tm, model.tokenizer, text, CANDIDATES["0_100"])
    assert sum(np.exp(lp[str(i)]) for i in range(101)) < 0.25
    assert judge.coherence_scores(["q"], ["a"]) == [None]
