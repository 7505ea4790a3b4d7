"""The top-level session API (issue 28): `pj.extract`, `pj.project`, `pj.save_vector` /
`pj.load_vector`, `pj.steer`, `Steering.grid`, `[D]` steering vectors, chats in
`pj.capture`, `pj.apply_module`.

Every result is checked against an independent computation: transformers (PyTorch)
hidden states reduced and differenced in numpy, transformers `generate` with a forward
hook that adds coef * v, the files read back by torch / numpy / gguf, and a small
linen model computed by hand in numpy.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.errors import PersonaError
from persona_jax.testing import tiny_checkpoint

QUESTIONS = ("hello there?", "what now", "Why is the sky blue?")


def ask(q):
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("api"))
    tm = tiny_checkpoint(d, num_hidden_layers=3, hidden_size=32, intermediate_size=64, initializer_range=0.3)
    return tm, pj.load_model(d)


def torch_states(tm, tok, chat, answer):
    """Hidden states [L+1, T, D] (float64) of chat + answer, and the prompt's token count."""
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt + answer, add_special_tokens=False)
    with torch.no_grad():
        hs = tm(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack(hs)[:, 0].double().numpy(), len(tok.encode(prompt, add_special_tokens=False))


def reduce(hs, pl, reduction):
    return {"prompt_avg": hs[:, :pl].mean(1), "prompt_last": hs[:, pl - 1],
            "response_avg": hs[:, pl:].mean(1)}[reduction]


class Hook:
    """Adds coef * v to the output of block `layer - 1` (hidden state `layer`) of a torch model,
    at the positions `where(t)` says (t: the absolute position of the forward call's tokens)."""

    def __init__(self, tm, v, layer, coef, where=None):
        self.v, self.coef, self.where, self.start = torch.tensor(v), coef, where, 0
        self.handle = tm.model.layers[layer - 1].register_forward_hook(self)

    def __call__(self, mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        t = torch.arange(self.start, self.start + h.shape[1])
        m = torch.ones(h.shape[1]) if self.where is None else self.where(t).double()
        h = h + self.coef * m[None, :, None].to(h.dtype) * self.v.to(h.dtype)
        self.start += out[0].shape[1] if isinstance(out, tuple) else out.shape[1]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def torch_generate(tm, tok, chat, n, hooks=()):
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    try:
        with torch.no_grad():
            out = tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=2)
    finally:
        for h in hooks:
            h.handle.remove()
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


# ------------------------------------------------------------------------------ extract
@pytest.mark.parametrize("reduction", ["response_avg", "prompt_last"])
def test_extract_is_the_mean_difference_of_transformers_states(tiny, reduction):
    tm, model = tiny
    tok = model.tokenizer
    # the method's contrast: a system prompt per side, then the answers (one side as whole chats)
    pos = [([{"role": "system", "content": "Be evil."}] + ask(q), "I will crush every one of you.") for q in QUESTIONS]
    neg = [[{"role": "system", "content": "Be kind."}] + ask(q) + [{"role": "assistant", "content": "Glad to help"}]
           for q in QUESTIONS]
    vec = pj.extract(model, list(zip(pos, neg)), reduction=reduction, trait="evil")
    want = np.mean([reduce(*torch_states(tm, tok, c, a), reduction) for c, a in pos], 0) - \
        np.mean([reduce(*torch_states(tm, tok, c[:-1], c[-1]["content"]), reduction) for c in neg], 0)
    assert isinstance(vec, pj.PersonaVector) and vec.array.shape == (4, 32)
    assert (vec.trait, vec.reduction, vec.n_kept) == ("evil", reduction, 3)
    assert np.abs(want[1:]).min(-1).max() > 1e-3  # the sides differ at every layer
    # float32 sums in another order than torch's: a few 1e-5 on values near 0.35 (CI saw 1.6e-5)
    np.testing.assert_allclose(vec.array, want, rtol=1e-4, atol=5e-5)


def test_extract_drops_a_pair_with_an_empty_answer_and_refuses_bad_examples(tiny):
    tm, model = tiny
    tok = model.tokenizer
    pairs = [((ask(q), "Evil words."), (ask(q), "Kind words.")) for q in QUESTIONS]
    pairs[1] = ((ask("x"), ""), (ask("x"), "Kind."))  # no tokens on the positive side: the pair goes
    vec = pj.extract(model, pairs)
    keep = [pairs[0], pairs[2]]
    want = np.mean([reduce(*torch_states(tm, tok, *p), "response_avg") for p, _ in keep], 0) - \
        np.mean([reduce(*torch_states(tm, tok, *n), "response_avg") for _, n in keep], 0)
    assert vec.n_kept == 2
    # float32 sums in another order than torch's: a few 1e-5 on values near 0.35 (CI saw 1.6e-5)
    np.testing.assert_allclose(vec.array, want, rtol=1e-4, atol=5e-5)
    with pytest.raises(PersonaError, match="reduction"):
        pj.extract(model, pairs, reduction="mean")
    with pytest.raises(PersonaError, match="not a .positive, negative. pair"):
        pj.extract(model, [pairs[0][0]])
    with pytest.raises(PersonaError, match="last message is not an assistant answer"):
        pj.extract(model, [(ask("a"), ask("b"))])


# ------------------------------------------------------------------------------ project
def test_project_equals_numpy_projection_of_transformers_states(tiny):
    tm, model = tiny
    tok = model.tokenizer
    v = np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)
    chats, answers = [ask(q) for q in QUESTIONS], ["Sure thing.", "", "Because of scattering."]
    got = pj.project(model, chats, answers, pj.PersonaVector(v, trait="t"), layer=2)
    every = pj.project(model, chats, answers, v)  # [N, L+1]
    last = pj.project(model, chats, answers, v[3], layer=3, reduction="prompt_last")  # a [D] direction
    assert got.shape == (3,) and every.shape == (3, 4) and np.isnan(got[1]) and np.isnan(every[1]).all()
    for i in (0, 2):
        hs, pl = torch_states(tm, tok, chats[i], answers[i])
        a = reduce(hs, pl, "response_avg")
        want = (a * v).sum(-1) / np.linalg.norm(v, axis=-1)
        np.testing.assert_allclose(every[i], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[i], want[2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(last[i], hs[3, pl - 1] @ v[3] / np.linalg.norm(v[3]), rtol=1e-5, atol=1e-5)
    # whole chats with answers=None are the same inputs
    np.testing.assert_allclose(pj.project(model, [c + [{"role": "assistant", "content": a}]
                                                  for c, a in zip(chats, answers)], None, v, layer=2), got)
    with pytest.raises(PersonaError, match="outside"):
        pj.project(model, chats, answers, v, layer=4)


# ------------------------------------------------------------------------------ capture of chats
def test_capture_of_chats_equals_capture_of_rendered_chats(tiny):
    _, model = tiny
    tok = model.tokenizer
    chats = [ask(q) for q in QUESTIONS]
    rendered = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    answers = ["a", "bb b", "ccc c c"]
    got, want = pj.capture(model, chats, answers), pj.capture(model, rendered, answers)
    for r in pj.REDUCTIONS:
        np.testing.assert_array_equal(got[r], want[r])
    mixed = pj.capture(model, [chats[0], rendered[1], chats[2]], answers)
    np.testing.assert_array_equal(mixed["response_avg"], want["response_avg"])
    with pytest.raises(PersonaError, match="prompt string or a list of chat messages"):
        pj.capture(model, [{"role": "user"}], ["a"])
    with pytest.raises(PersonaError, match="one response string per prompt"):
        pj.capture(model, chats, "a")


# ------------------------------------------------------------------------------ steering
def test_steered_model_and_context_equal_transformers_hooks(tiny):
    tm, model = tiny
    tok = model.tokenizer
    v = np.random.default_rng(2).normal(size=(4, 32)).astype(np.float32) * 3
    chats = [ask("hello?"), ask("why is it so")]
    want = [torch_generate(tm, tok, c, 6, [Hook(tm, v[2], 2, 1.5)]) for c in chats]
    plain = [torch_generate(tm, tok, c, 6) for c in chats]
    assert want != plain  # the steering changes the text
    steered = pj.steer(model, v, layer=2, coef=1.5)
    assert isinstance(steered, pj.Model) and not model.steering
    assert pj.generate(steered, chats, 6, temperature=0) == want
    with pj.steer(model, pj.PersonaVector(v, trait="t"), layer=2, coef=1.5):
        assert pj.generate(model, chats, 6, temperature=0) == want
    assert pj.generate(model, chats, 6, temperature=0) == plain  # the block ended
    # a [D] direction with layer=, as a Steering and through steer
    assert pj.generate(model, chats, 6, temperature=0, steering=pj.Steering(v[2], layer=2, coef=1.5)) == want
    assert pj.generate(pj.steer(model, v[2], 2, 1.5), chats, 6, temperature=0) == want
    with pytest.raises(PersonaError, match=r"\(32,\)"):
        pj.steer(model, v[2][:5], 2, 1.0)
    with pytest.raises(PersonaError, match="needs the layer"):
        pj.steer(model, v)


def test_steered_forward_and_capture_equal_transformers_hooks(tiny):
    tm, model = tiny
    tok = model.tokenizer
    v = np.random.default_rng(3).normal(size=(4, 32)).astype(np.float32)
    chat, answer = ask("hello?"), "Fine, thanks."
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt + answer, add_special_tokens=False)
    pl = len(tok.encode(prompt, add_special_tokens=False))

    def hooked(where):
        with Hook(tm, v[1], 1, 2.0, where), torch.no_grad():
            hs = torch.stack(tm(torch.tensor([ids]), output_hidden_states=True).hidden_states)[:, 0].double().numpy()
        # transformers records hidden state 1 before the hook edits block 0's output: add the edit
        m = np.ones(len(ids)) if where is None else where(torch.arange(len(ids))).double().numpy()
        hs[1] += 2.0 * m[:, None] * v[1]
        return hs

    out = pj.forward(pj.steer(model, v, 1, 2.0), np.asarray([ids]))
    np.testing.assert_allclose(np.asarray(out.hidden_states)[:, 0], hooked(None), atol=1e-4)
    # capture under "response" steering: what generating the answer would steer, from the last prompt token on
    caps = pj.capture(model, [chat], [answer], steering=pj.Steering(v, layer=1, coef=2.0, positions="response"))
    hs = hooked(lambda t: t >= pl - 1)
    np.testing.assert_allclose(caps["response_avg"][0], hs[:, pl:].mean(1), atol=1e-4)
    np.testing.assert_allclose(caps["prompt_avg"][0], hs[:, :pl].mean(1), atol=1e-4)
    assert np.abs(caps["response_avg"][0] - pj.capture(model, [chat], [answer])["response_avg"][0]).max() > 1e-2


def test_grid_cells_equal_transformers_hooks(tiny):
    tm, model = tiny
    tok = model.tokenizer
    v = np.random.default_rng(4).normal(size=(4, 32)).astype(np.float32) * 3
    chats = [ask("hello?"), ask("tell me more")]
    grid = pj.Steering.grid(pj.PersonaVector(v, trait="t"), layers=[1, 2], coefs=[0.0, -2.0])
    df = pj.generate(model, chats, 5, temperature=0, steering=grid)
    assert list(df.columns) == ["layer", "coef", "prompt", "input", "text"] and len(df) == 8
    assert df[df.coef != 0].text.tolist() != df[df.coef == 0].text.tolist()  # the steered cells differ
    for row in df.itertuples():
        hooks = [Hook(tm, v[row.layer], row.layer, row.coef)]
        assert row.text == torch_generate(tm, tok, chats[row.prompt], 5, hooks), (row.layer, row.coef)
    assert df.set_index(["layer", "coef", "prompt"]).loc[(1, 0.0, 1), "text"] == torch_generate(tm, tok, chats[1], 5)
    with pytest.raises(PersonaError, match="outside"):
        pj.generate(model, chats, 5, steering=pj.Steering.grid(v, [7], [1.0]))


# ------------------------------------------------------------------------------ files
def test_save_and_load_vector_every_format_gives_a_persona_vector(tiny, tmp_path):
    _, model = tiny
    arr = np.random.default_rng(5).normal(size=(4, 32)).astype(np.float32)
    vec = pj.PersonaVector(arr, trait="evil", reduction="prompt_last", model_id="tiny", n_kept=7)
    assert vec.metadata["n_kept"] == 7 and vec.metadata["num_layers"] == 3  # a property
    for name in ("evil.pt", "evil.npy", "evil.gguf", "evil_dir"):
        path = pj.save_vector(vec, tmp_path / name)
        got = pj.load_vector(path)
        assert isinstance(got, pj.PersonaVector), name
        rows = slice(2, None) if name.endswith(".gguf") else slice(None)  # llama.cpp has no rows 0, 1
        np.testing.assert_array_equal(got.array[rows], arr[rows])
        with pytest.raises(PersonaError, match="already exists"):
            pj.save_vector(vec, path)
        pj.save_vector(vec, path, overwrite=True)
    # read back by the formats' own libraries
    np.testing.assert_array_equal(torch.load(tmp_path / "evil.pt").numpy(), arr)
    np.testing.assert_array_equal(np.load(tmp_path / "evil.npy"), arr)
    orbax = pj.load_vector(tmp_path / "evil_dir")
    assert (orbax.trait, orbax.reduction, orbax.model_id, orbax.n_kept) == ("evil", "prompt_last", "tiny", 7)
    # a bare array, named the reference's way
    got = pj.load_vector(pj.save_vector(arr, tmp_path / "happy_response_avg_diff.pt"))
    assert (got.trait, got.reduction) == ("happy", "response_avg")
    with pytest.raises(PersonaError, match="not a float type|2-D"):
        pj.save_vector(np.arange(4), tmp_path / "bad.npy")
    assert not (tmp_path / "bad.npy").exists()


# ------------------------------------------------------------------------------ any linen module
class Block(nn.Module):
    @nn.compact
    def __call__(self, h):
        return h + nn.Dense(h.shape[-1], name="mix")(jnp.tanh(h))


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(20, 8, name="embed")(tokens)
        for i in range(3):
            h = Block(name=f"block_{i}")(h)
        return nn.Dense(20, name="head")(h)


def numpy_lm(params, tokens, edit=lambda i, h: h):
    """TinyLM by hand; edit(i, h) changes block i's output. Returns (logits, block outputs [3, B, T, D])."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    h, outs = p["embed"]["embedding"][tokens], []
    for i in range(3):
        d = p[f"block_{i}"]["mix"]
        h = edit(i, h + np.tanh(h) @ d["kernel"] + d["bias"])
        outs.append(h)
    return h @ p["head"]["kernel"] + p["head"]["bias"], np.stack(outs)


def test_apply_module_steers_and_captures_a_linen_model_in_one_call():
    model, tokens = TinyLM(), (jnp.arange(15).reshape(3, 5) * 7) % 20
    variables = model.init(jax.random.PRNGKey(0), tokens)
    logits, acts = pj.apply_module(model, variables, tokens, at=Block, capture=True)
    want_logits, want_acts = numpy_lm(variables["params"], np.asarray(tokens))
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    np.testing.assert_allclose(acts, want_acts, atol=1e-5)

    d = np.random.default_rng(6).normal(size=8).astype(np.float32)  # one direction, for row 1
    coefs = np.array([0.0, 1.0, -3.0])
    steered, acts = pj.apply_module(model, variables, tokens, at="block_?", capture=True,
                                    steering=pj.Steering(d, layer=1, coef=list(coefs)))
    edit = lambda i, h: h + coefs[:, None, None] * d if i == 1 else h
    want_logits, want_acts = numpy_lm(variables["params"], np.asarray(tokens), edit)
    np.testing.assert_allclose(steered, want_logits, atol=1e-5)
    np.testing.assert_allclose(acts, want_acts, atol=1e-5)
    # one coefficient: broadcast over the batch; ablation of a [3, D] vector's row 2
    u = np.random.default_rng(7).normal(size=(3, 8)).astype(np.float32)
    out, none = pj.apply_module(model, variables, tokens, at=Block,
                                steering=[pj.Steering(d, layer=0, coef=2.0), pj.Steering(u, layer=2, kind="ablate")])
    n = u[2] / np.linalg.norm(u[2])
    edit = lambda i, h: h + 2.0 * d if i == 0 else (h - (h @ n)[..., None] * n if i == 2 else h)
    np.testing.assert_allclose(out, numpy_lm(variables["params"], np.asarray(tokens), edit)[0], atol=1e-5)
    assert none is None
    with pytest.raises(PersonaError, match="no module"):
        pj.apply_module(model, variables, tokens, at="nothing_*")
    with pytest.raises(PersonaError, match="outside"):
        pj.apply_module(model, variables, tokens, at=Block, steering=pj.Steering(d, layer=3))
