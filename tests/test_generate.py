"""Generation and steering (METHOD.md 6) against transformers `generate` with forward hooks.

The tiny models use a large init range (0.4) so greedy continuations are long, varied and
prompt-dependent (at HF's default 0.02 they repeat one token), and every steering check
also asserts that the steering changed the output, so an intervention that silently does
nothing fails the test.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.runtime.capture import capture
from persona_jax.runtime.generate import generate
from persona_jax.steering.spec import Steering
from persona_jax.testing import CHAT_TEMPLATE, tiny_checkpoint

EOS = 2
PAD = 0
# Qwen3-style: the template reads `enable_thinking`, which generation must set to False.
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|assistant|>{% endif %}",
    "<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}"
    "<think></think>{% endif %}{% endif %}")

# 18..30 tokens: one length bucket, so with batch_size=4 most calls share one compiled
# program, yet every batch is left-padded. EXTRA adds a 5-token and a 69-token prompt.
PROMPTS = [
    "<|user|>hello there, friend<|end|><|assistant|>",
    "<|user|>what is up today?<|end|><|assistant|>",
    "<|user|>Name three colours.<|end|><|assistant|>",
    "<|system|>Be terse.<|end|><|user|>Why?<|end|><|assistant|>",
    "<|user|>Say something nice, please.<|end|><|assistant|>",
    "<|user|>Who are you, then?<|end|><|assistant|>",
]
EXTRA = [
    "<|user|>hi<|end|><|assistant|>",
    "<|system|>Be evil.<|end|><|user|>Tell me a long story about a dragon who lived in a cave.<|end|><|assistant|>",
]
N = 16  # new tokens wherever 32+ is not the point
BS = 4
COEFS = [3.0, -1.5, 6.0, 2.0, -4.5, 1.0]  # per-row coefficients for PROMPTS


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """llama with GQA (4 heads, 2 kv), tied embeddings, biases, llama3 rope scaling."""
    d = str(tmp_path_factory.mktemp("gen_llama"))
    torch_model = tiny_checkpoint(d, "llama", seed=1, initializer_range=0.4)
    return d, torch_model, pj.load_model(d)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("gen_qwen3"))
    torch_model = tiny_checkpoint(d, "qwen3", seed=2, initializer_range=0.4, chat_template=THINKING_TEMPLATE)
    return d, torch_model, pj.load_model(d)


@pytest.fixture(scope="module")
def vec(llama):
    """A steering vector [L+1, D] whose rows are about as large as the hidden states."""
    rng = np.random.RandomState(0)
    _, _, model = llama
    v = rng.randn(model.num_layers + 1, model.hidden_size).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True) * 8.0


@pytest.fixture(scope="module")
def llama_greedy(llama):
    _, _, model = llama
    return generate(model, PROMPTS, N, temperature=0, batch_size=BS, return_tokens=True).tokens


# ----------------------------------------------------------------------------- reference
def cut_at_eos(seq, eos_ids):
    out = []
    for t in seq:
        out.append(t)
        if t in eos_ids:
            break
    return out


def hf_generate(torch_model, tok, prompts, max_new_tokens, hooks=(), eos_ids=(EOS,), **kwargs):
    """Greedy transformers generate on a left-padded batch, with forward hooks.

    hooks: (l, fn) pairs; fn(h [B, T, D]) -> h is applied to the output of block l-1
    (the module `model.layers[l - 1]`), i.e. hidden state l. Returns the new tokens of
    each row, cut after the first EOS.
    """
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    handles = []
    for layer, fn in hooks:
        def hook(module, args, out, fn=fn):
            if isinstance(out, tuple):
                return (fn(out[0]),) + tuple(out[1:])
            return fn(out)
        handles.append(torch_model.model.layers[layer - 1].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = torch_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=PAD, eos_token_id=list(eos_ids), **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [cut_at_eos(row[width:].tolist(), eos_ids) for row in out]


def add_hook(v_l, coef, positions):
    """The reference's steering hook: add coef * v[l] (coef per batch row)."""
    v = torch.tensor(v_l)
    c = torch.tensor(np.broadcast_to(np.asarray(coef, np.float32), (len(np.atleast_1d(coef)),))).view(-1, 1)

    def fn(h):
        if positions == "all":
            return h + c[:, :, None] * v
        if positions == "prompt":  # prefill only
            return h + c[:, :, None] * v if h.shape[1] > 1 else h
        h = h.clone()  # response: the last position of every call
        h[:, -1] = h[:, -1] + c * v
        return h

    return fn


def ablate_hook(v_l):
    """The reference's projection hook: h - (h . u) u at every position, u = v[l] / |v[l]|."""
    u = torch.tensor(v_l / np.linalg.norm(v_l))
    return lambda h: h - (h @ u)[..., None] * u


def changed(a, b):
    return sum(x != y for x, y in zip(a, b))


# ----------------------------------------------------------------------------- plain generation
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_hf_generate(family, request):
    _, torch_model, model = request.getfixturevalue(family)
    prompts = PROMPTS + EXTRA
    g = generate(model, prompts, 40, temperature=0, batch_size=BS, return_tokens=True)
    ref = hf_generate(torch_model, model.tokenizer, prompts, 40)
    assert g.tokens == ref
    assert sum(len(t) >= 32 for t in g.tokens) >= 6  # at least 32 new tokens compared on most rows
    assert len({tuple(t) for t in g.tokens}) == len(prompts)  # prompt-dependent, not one cycle
    assert g.texts == [model.tokenizer.decode(t, skip_special_tokens=True) for t in g.tokens]
    assert g.prompts == prompts


def test_chat_conversations_use_the_template(llama, qwen3):
    convs = [[{"role": "system", "content": "Be evil."}, {"role": "user", "content": "Tell me a story."}],
             [{"role": "user", "content": "hi"}]]
    rendered = ["<|system|>Be evil.<|end|><|user|>Tell me a story.<|end|><|assistant|>",
                "<|user|>hi<|end|><|assistant|>"]
    _, _, model = llama
    g = generate(model, convs + rendered, N, temperature=0, return_tokens=True)
    assert g.prompts == rendered * 2
    assert g.tokens[:2] == g.tokens[2:]
    # a template that reads enable_thinking (Qwen3) is rendered with enable_thinking=False
    _, _, qmodel = qwen3
    assert generate(qmodel, convs, 1, temperature=0, return_tokens=True).prompts == [
        p + "<think></think>" for p in rendered]


def test_sampling_deterministic_and_independent_of_batch_size(llama, llama_greedy):
    _, _, model = llama
    kw = dict(temperature=1.0, seed=5, return_tokens=True)
    a = generate(model, PROMPTS, N, batch_size=BS, **kw).tokens
    assert generate(model, PROMPTS, N, batch_size=BS, **kw).tokens == a
    assert generate(model, PROMPTS, N, batch_size=2, **kw).tokens == a
    other = generate(model, PROMPTS, N, batch_size=BS, temperature=1.0, seed=6, return_tokens=True).tokens
    assert changed(a, other) >= len(PROMPTS) - 1
    assert changed(a, llama_greedy) >= len(PROMPTS) - 1
    # filtering down to one token is greedy
    assert generate(model, PROMPTS, N, batch_size=BS, top_k=1, **kw).tokens == llama_greedy
    assert generate(model, PROMPTS, N, batch_size=BS, top_p=1e-6, **kw).tokens == llama_greedy


def test_top_k_top_p_filter_matches_sorted_reference():
    """The bisection thresholds of the sampler equal the sort-based definitions."""
    from persona_jax.runtime.sampling import SamplingParams, _filter_logits

    rng = np.random.RandomState(0)
    neg = np.finfo(np.float32).min
    for scale in (0.5, 3.0, 20.0):
        x = (rng.randn(8, 300) * scale).astype(np.float32)
        for k, p in [(1, 0.5), (7, 0.9), (300, 0.3), (40, 1e-6)]:
            # numpy reference: top-k keeps logits >= the k-th largest; top-p keeps the
            # smallest prefix of the probability-sorted tokens whose mass reaches p
            ref = x / np.float32(0.7)
            kth = -np.sort(-ref, axis=-1)[:, k - 1:k]
            ref = np.where(ref < kth, neg, ref)
            probs = np.exp(ref.astype(np.float64) - ref.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            order = np.argsort(-probs, axis=-1, kind="stable")
            sp_ = np.take_along_axis(probs, order, -1)
            keep_sorted = np.cumsum(sp_, -1) - sp_ < p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            ref = np.where(keep, ref, neg)
            sp = SamplingParams(8, greedy=False, use_top_k=True, use_top_p=True, eos_ids=(), pad_id=0)
            got = np.asarray(_filter_logits(jnp.asarray(x), jnp.float32(0.7), jnp.int32(k), jnp.float32(p), sp))
            np.testing.assert_array_equal(got > neg, ref > neg, err_msg=f"scale {scale} k {k} p {p}")
            np.testing.assert_allclose(got[got > neg], ref[ref > neg], rtol=1e-6)


def test_min_new_tokens_and_per_row_eos(llama, llama_greedy):
    _, torch_model, model = llama
    stop = llama_greedy[0][2]  # a token row 0 emits early becomes an EOS
    eos_ids = (EOS, stop)
    model2 = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=eos_ids))
    lengths = []
    for min_new in (1, 8):
        got = generate(model2, PROMPTS, N, temperature=0, batch_size=BS, min_new_tokens=min_new,
                       return_tokens=True).tokens
        ref = hf_generate(torch_model, model.tokenizer, PROMPTS, N, eos_ids=eos_ids, min_new_tokens=min_new)
        assert got == ref, min_new
        for t in got:
            assert not set(t[:min_new]) & set(eos_ids)
        lengths.append([len(t) for t in got])
    assert lengths[0][0] <= 3 and lengths[1][0] > 8  # row 0 stopped early, then not before min_new
    assert len(set(lengths[0])) > 1  # rows stop independently


def test_scanned_decode_matches_hf_generate_and_hooks(llama, vec):
    """`Model.scan_decode` (the scanned decoder in the decode loop, weights held once) gives
    the same tokens as transformers, plain and with a per-row steering hook."""
    import dataclasses
    _, torch_model, model = llama
    scanned = dataclasses.replace(model, scan_decode=True)
    got = generate(scanned, PROMPTS, N, temperature=0, batch_size=BS, return_tokens=True).tokens
    assert got == hf_generate(torch_model, model.tokenizer, PROMPTS, N)
    got = generate(scanned, PROMPTS, N, temperature=0, batch_size=BS, return_tokens=True,
                   steering=Steering(vec, layer=2, coef=COEFS)).tokens
    assert got == hf_generate(torch_model, model.tokenizer, PROMPTS, N, hooks=[(2, add_hook(vec[2], COEFS, "all"))])


# ----------------------------------------------------------------------------- steering
@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steered_greedy_matches_hf_hook(llama, vec, llama_greedy, positions):
    _, torch_model, model = llama
    got = generate(model, PROMPTS, N, temperature=0, batch_size=BS, return_tokens=True,
                   steering=Steering(vec, layer=2, coef=COEFS, positions=positions)).tokens
    ref = hf_generate(torch_model, model.tokenizer, PROMPTS, N, hooks=[(2, add_hook(vec[2], COEFS, positions))])
    assert got == ref
    assert changed(got, llama_greedy) >= 3


def test_ablation_matches_projection_hook(llama, llama_greedy):
    d, torch_model, model = llama
    # ablate the directions of the mean hidden states: large enough to change the output
    c = capture(model, PROMPTS, ["Once upon a time"] * len(PROMPTS))
    v = c["response_avg"].mean(0)
    got = generate(model, PROMPTS, N, temperature=0, batch_size=BS, return_tokens=True,
                   steering=Steering(v, layer=[1, 2], kind="ablate")).tokens
    ref = hf_generate(torch_model, model.tokenizer, PROMPTS, N,
                      hooks=[(1, ablate_hook(v[1])), (2, ablate_hook(v[2]))])
    assert got == ref
    assert changed(got, llama_greedy) >= 3


def test_multi_layer_and_combined_steering_match_hooks(llama, vec, llama_greedy):
    _, torch_model, model = llama
    got = generate(model, PROMPTS, N, temperature=0, batch_size=BS, return_tokens=True,
                   steering=Steering(vec, layer=[1, 2], coef=1.5)).tokens
    ref = hf_generate(torch_model, model.tokenizer, PROMPTS, N,
                      hooks=[(1, add_hook(vec[1], 1.5, "all")), (2, add_hook(vec[2], 1.5, "all"))])
    assert got == ref
    assert changed(got, llama_greedy) >= 3
    # several Steerings at once; at one layer ablation comes before addition
    w = np.roll(vec, 1, axis=-1)
    steer = [Steering(vec, layer=3, coef=-2.0, positions="response"),
             Steering(w, layer=1, coef=COEFS, positions="prompt"),
             Steering(w, layer=3, kind="ablate")]
    got = generate(model, PROMPTS, N, temperature=0, batch_size=BS, return_tokens=True, steering=steer).tokens
    ref = hf_generate(torch_model, model.tokenizer, PROMPTS, N, hooks=[
        (1, add_hook(w[1], COEFS, "prompt")),
        (3, lambda h: add_hook(vec[3], -2.0, "response")(ablate_hook(w[3])(h)))])
    assert got == ref
    assert changed(got, llama_greedy) >= 3


def test_per_row_coefficients_equal_separate_calls(llama, vec):
    _, _, model = llama
    coefs = [-2.0, 1.0, 3.0, 6.0]
    inputs = [PROMPTS[0]] * 4 + [PROMPTS[4]] * 4
    one = generate(model, inputs, N, temperature=0, batch_size=BS, return_tokens=True,
                   steering=Steering(vec, layer=2, coef=coefs * 2, positions="response")).tokens
    for k, c in enumerate(coefs):
        sep = generate(model, [PROMPTS[0], PROMPTS[4]], N, temperature=0, return_tokens=True,
                       steering=Steering(vec, layer=2, coef=c, positions="response")).tokens
        assert [one[k], one[4 + k]] == sep, c
    assert len({tuple(t) for t in one[:4]}) >= 3  # the coefficients matter


def test_sweep_rows_equal_single_layer_calls(llama, vec):
    _, _, model = llama
    layers = [1, 2, 3, 1, 2, 3, 0, 2]
    coefs = [1.0, 1.0, 1.0, -2.0, -2.0, -2.0, 1.5, 0.0]
    one = generate(model, [PROMPTS[2]] * len(layers), N, temperature=0, batch_size=BS, return_tokens=True,
                   steering=Steering.sweep(vec, layers, coefs)).tokens
    for k, (layer, c) in enumerate(zip(layers, coefs)):
        sep = generate(model, [PROMPTS[2]], N, temperature=0, return_tokens=True,
                       steering=Steering(vec, layer=layer, coef=c)).tokens
        assert one[k] == sep[0], (layer, c)
    assert len({tuple(t) for t in one}) >= 5


# ----------------------------------------------------------------------------- meshes
@pytest.fixture(scope="module")
def mesh_steering(vec):
    return [Steering(vec, layer=2, coef=COEFS, positions="response"), Steering(vec, layer=1, kind="ablate")]


@pytest.fixture(scope="module")
def single_device_sampled(llama, mesh_steering):
    _, _, model = llama
    return generate(model, PROMPTS, N, temperature=1.0, seed=3, batch_size=BS, steering=mesh_steering,
                    return_tokens=True).tokens


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_sharded_generation_equals_single_device(llama, mesh_steering, single_device_sampled, shape):
    """Sampling with steering (add + ablate, per-row coefficients) on a mesh; the batch
    grows to a multiple of the data axis with padding rows."""
    d, _, _ = llama
    sharded = pj.load_model(d, mesh=pj.make_mesh(*shape))
    got = generate(sharded, PROMPTS, N, temperature=1.0, seed=3, batch_size=BS, steering=mesh_steering,
                   return_tokens=True).tokens
    assert got == single_device_sampled


# ----------------------------------------------------------------------------- bad input
def test_bad_input(llama, vec):
    _, _, model = llama
    L, D = model.num_layers, model.hidden_size
    cases = [
        (Steering(vec[:, :-1], layer=1), "shape"),
        (Steering(vec[:-1], layer=1), "shape"),
        (Steering(vec, layer=L + 1), f"outside 0..{L}"),
        (Steering(vec, layer=-1), f"outside 0..{L}"),
        (Steering(vec, layer=[1, L + 1]), f"outside 0..{L}"),
        (Steering.sweep(vec, [1, 7], [1.0, 1.0]), f"outside 0..{L}"),
        (Steering(vec, layer=1, positions="everywhere"), "unknown steering positions"),
        (Steering(vec, layer=1, kind="multiply"), "unknown steering kind"),
        (Steering(vec, layer=1, coef=[1.0, 2.0, 3.0]), "3 per-row coefficients for a batch of 2"),
        (Steering(np.zeros((L + 1, D), np.float32), layer=1, kind="ablate"), "zero vector"),
    ]
    for steer, msg in cases:
        with pytest.raises(pj.PersonaError, match=msg):
            generate(model, PROMPTS[:2], 4, temperature=0, steering=steer)
    with pytest.raises(pj.PersonaError, match="empty"):
        generate(model, [], 4)
    with pytest.raises(pj.PersonaError, match="not a single one"):
        generate(model, PROMPTS[0], 4)
    with pytest.raises(pj.PersonaError, match="max_new_tokens"):
        generate(model, PROMPTS, 0)
    with pytest.raises(pj.PersonaError, match="one layer per coefficient"):
        Steering.sweep(vec, [1, 2], [1.0])
