"""Interventions on any Flax linen model (issue 17, point 3).

A small linen transformer written here (not persona_jax's decoder) is captured and
steered at modules chosen by class or by path; every result is checked against an
independent computation: the values the model `sow`s or `capture_intermediates`
returns, and the same model with the module output edited by hand inside its own code.
Our decoder's attention and MLP sites are checked against transformers forward hooks on
`self_attn` and `mlp`.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.errors import PersonaError
from persona_jax.runtime import apply as A
from persona_jax.steering import sites as S
from persona_jax.steering.spec import Steering
from persona_jax.testing import tiny_checkpoint

VOCAB, DIM, DEPTH, B, T = 40, 16, 3, 4, 7


# ----------------------------------------------------------------------------- a user's model
class SelfAttention(nn.Module):
    heads: int = 2

    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = jnp.split(nn.Dense(3 * d, name="qkv")(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, hd) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & mask[:, None, None, :].astype(bool)
        probs = jax.nn.softmax(jnp.where(allowed, scores, -1e9), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return nn.Dense(d, name="out")(out)


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1], name="down")(nn.gelu(nn.Dense(2 * x.shape[-1], name="up")(x)))


class Layer(nn.Module):
    """Pre-norm block; `edit(site, index, value)` edits module outputs by hand (the
    reference for steering). scanned=True: the nn.scan body signature (h, mask) -> (h, None)."""

    index: int = 0
    edit: Any = None
    scanned: bool = False

    @nn.compact
    def __call__(self, h, mask):
        edit = self.edit or (lambda site, i, x: x)
        a = SelfAttention(name="attn")(nn.LayerNorm(name="ln1")(h), mask)
        h = h + a
        f = edit("ff", self.index, FeedForward(name="ff")(nn.LayerNorm(name="ln2")(h)))
        h = h + f
        self.sow("intermediates", "resid", h)
        return (h, None) if self.scanned else h


class TinyLM(nn.Module):
    edit: Any = None

    @nn.compact
    def __call__(self, tokens, mask):
        edit = self.edit or (lambda site, i, x: x)
        h = nn.Embed(VOCAB, DIM, name="embed")(tokens)
        for i in range(DEPTH):
            h = edit("layer", i, Layer(i, self.edit, name=f"layer_{i}")(h, mask))
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(h))


class TinyScanLM(nn.Module):
    """The same model with its layers stacked by nn.scan (params with a leading [DEPTH] axis)."""

    @nn.compact
    def __call__(self, tokens, mask):
        h = nn.Embed(VOCAB, DIM, name="embed")(tokens)
        h, _ = nn.scan(Layer, variable_axes={"params": 0, "intermediates": 0, "interventions": 0},
                       split_rngs={"params": True}, in_axes=nn.broadcast, length=DEPTH)(
            scanned=True, name="layers")(h, mask)
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(h))


@pytest.fixture(scope="module")
def user_model():
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, VOCAB, (B, T)))
    mask = np.ones((B, T), np.int32)
    mask[1, :2] = 0  # left padding
    mask[3, :4] = 0
    model = TinyLM()
    variables = model.init(jax.random.PRNGKey(0), tokens, jnp.asarray(mask))
    return model, variables, tokens, jnp.asarray(mask)


def vectors(rows, seed=1, scale=3.0):
    v = np.random.RandomState(seed).randn(rows, DIM).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True) * scale


def hand_edited(variables, tokens, mask, edit):
    return TinyLM(edit=edit).apply(variables, tokens, mask)


LAYER, FF = {"layer": S.Site(Layer)}, {"ff": S.Site("layer_*/ff")}


# ----------------------------------------------------------------------------- capture
def test_locate_finds_instances_in_call_order(user_model):
    model, variables, tokens, mask = user_model
    layout = S.locate(S.Site(Layer), model, variables, tokens, mask)
    assert layout.entries == tuple(((f"layer_{i}",), None) for i in range(DEPTH)) and layout.rows == DEPTH
    by_path = S.locate(S.Site("layer_*/ff"), model, variables, tokens, mask)
    assert by_path == S.locate(S.Site(FeedForward), model, variables, tokens, mask)
    assert by_path.entries == tuple(((f"layer_{i}", "ff"), None) for i in range(DEPTH))
    with pytest.raises(PersonaError, match="no module"):
        S.locate(S.Site("nothing/here"), model, variables, tokens, mask)


def test_capture_by_class_and_path_equals_sow_and_capture_intermediates(user_model):
    model, variables, tokens, mask = user_model
    _, state = model.apply(variables, tokens, mask, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    sites = {"layer": S.Site(Layer), "ff": S.Site("layer_*/ff")}
    layouts = {k: S.locate(s, model, variables, tokens, mask) for k, s in sites.items()}
    out, cap = jax.jit(lambda v, t, m: S.apply(model, v, t, m, sites=sites, layouts=layouts,
                                                capture={"layer": "output", "ff": "output"}))(variables, tokens, mask)
    np.testing.assert_allclose(out, model.apply(variables, tokens, mask), atol=1e-5)
    assert cap["layer"].shape == (DEPTH, B, T, DIM)
    for i in range(DEPTH):
        np.testing.assert_allclose(cap["layer"][i], inter[f"layer_{i}"]["resid"][0], atol=1e-5)
        np.testing.assert_allclose(cap["layer"][i], inter[f"layer_{i}"]["__call__"][0], atol=1e-5)
        np.testing.assert_allclose(cap["ff"][i], inter[f"layer_{i}"]["ff"]["__call__"][0], atol=1e-5)
    # readout: weighted sums over positions, reduced inside the model
    w = np.random.RandomState(2).rand(2, B, T).astype(np.float32) * np.asarray(mask)
    _, ro = S.apply(model, variables, tokens, mask, sites=LAYER, layouts={"layer": layouts["layer"]},
                    interventions={"layer": {"readout": w}}, capture={"layer": "readout"})
    want = np.einsum("lbtd,rbt->lrbd", np.asarray(cap["layer"], np.float64), w)
    np.testing.assert_allclose(ro["layer"], want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- steering
def test_steering_equals_editing_the_module_output_by_hand(user_model):
    model, variables, tokens, mask = user_model
    layout = S.locate(S.Site(Layer), model, variables, tokens, mask)
    v = vectors(DEPTH)
    arrays = S.site_arrays(Steering(v, layer=1, coef=2.5), layout, DIM, B)
    got, cap = S.apply(model, variables, tokens, mask, sites=LAYER, layouts={"layer": layout},
                       interventions={"layer": arrays}, capture={"layer": "output"})
    want = hand_edited(variables, tokens, mask, lambda s, i, x: x + 2.5 * v[1] if (s, i) == ("layer", 1) else x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(model.apply(variables, tokens, mask))).max() > 1e-2  # it matters
    # what is captured at the steered module is the steered output (a forward hook's view)
    _, st = TinyLM(edit=lambda s, i, x: x + 2.5 * v[1] if (s, i) == ("layer", 1) else x).apply(
        variables, tokens, mask, capture_intermediates=True, mutable=["intermediates"])
    np.testing.assert_allclose(cap["layer"][1], np.asarray(st["intermediates"]["layer_1"]["resid"][0]) + 2.5 * v[1],
                               atol=1e-5)


def test_ablation_and_response_positions_at_a_path_site(user_model):
    model, variables, tokens, mask = user_model
    layout = S.locate(S.Site("layer_*/ff"), model, variables, tokens, mask)
    v = vectors(DEPTH, seed=3)
    u = v[2] / np.linalg.norm(v[2])
    add = Steering(v, layer=0, coef=-1.5, positions="response")
    abl = Steering(v, layer=2, kind="ablate")
    arrays = S.site_arrays([add, abl], layout, DIM, B, mask=np.asarray(mask))
    got, _ = S.apply(model, variables, tokens, mask, sites=FF, layouts={"ff": layout}, interventions={"ff": arrays})

    def edit(site, i, x):
        if site == "ff" and i == 0:  # the last real token of every row (all rows end at T-1)
            return x.at[:, -1].add(-1.5 * v[0])
        if site == "ff" and i == 2:
            return x - (x @ u)[..., None] * u
        return x

    np.testing.assert_allclose(got, hand_edited(variables, tokens, mask, edit), atol=1e-5)
    with pytest.raises(PersonaError, match="attention mask"):
        S.site_arrays(add, layout, DIM, B)


def test_per_row_coefficients_in_one_jitted_call_equal_separate_calls(user_model):
    model, variables, tokens, mask = user_model
    layout = S.locate(S.Site(Layer), model, variables, tokens, mask)
    v = vectors(DEPTH, seed=4)
    run = jax.jit(lambda arrays: S.apply(model, variables, tokens, mask, sites=LAYER, layouts={"layer": layout},
                                         interventions={"layer": arrays})[0])
    coefs = [0.0, 1.5, -3.0, 6.0]
    swept = run(S.site_arrays(Steering(v, layer=2, coef=coefs), layout, DIM, B))
    layers = [0, 1, 2, 1]
    sweep = run(S.site_arrays(Steering.sweep(v, layers, coefs), layout, DIM, B))
    for b, c in enumerate(coefs):
        one = run(S.site_arrays(Steering(v, layer=2, coef=c), layout, DIM, B))
        np.testing.assert_allclose(swept[b], one[b], atol=1e-5)
        one = run(S.site_arrays(Steering(v, layer=layers[b], coef=c), layout, DIM, B))
        np.testing.assert_allclose(sweep[b], one[b], atol=1e-5)
    assert run._cache_size() == 1  # coefficients and layers are data: one compiled program


def test_scanned_user_model(user_model):
    """Layers stacked by nn.scan: one path with a count; capture equals the sown values and
    steering equals the unscanned model edited by hand (same weights, stacked)."""
    _, variables, tokens, mask = user_model
    p = variables["params"]
    stacked = {"embed": p["embed"], "head": p["head"], "ln_f": p["ln_f"],
               "layers": jax.tree.map(lambda *x: jnp.stack(x), *[p[f"layer_{i}"] for i in range(DEPTH)])}
    model, sv = TinyScanLM(), {"params": stacked}
    layout = S.locate(S.Site(Layer), model, sv, tokens, mask)
    assert layout.entries == ((("layers",), DEPTH),)
    v = vectors(DEPTH, seed=5)
    arrays = S.site_arrays(Steering(v, layer=[0, 2], coef=[1.0, -2.0, 0.5, 3.0]), layout, DIM, B)
    got, cap = S.apply(model, sv, tokens, mask, sites=LAYER, layouts={"layer": layout},
                       interventions={"layer": arrays}, capture={"layer": "output"})
    c = jnp.asarray([1.0, -2.0, 0.5, 3.0])[:, None, None]
    want = hand_edited(variables, tokens, mask, lambda s, i, x: x + c * v[i] if s == "layer" and i in (0, 2) else x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    _, st = model.apply(sv, tokens, mask, mutable=["intermediates"])
    plain = np.asarray(st["intermediates"]["layers"]["resid"][0])  # [DEPTH, B, T, D], unsteered run
    np.testing.assert_allclose(
        S.apply(model, sv, tokens, mask, sites=LAYER, layouts={"layer": layout}, capture={"layer": "output"})[1]["layer"],
        plain, atol=1e-5)
    assert cap["layer"].shape == (DEPTH, B, T, DIM)


def test_bad_sites(user_model):
    model, variables, tokens, mask = user_model
    layout = S.locate(S.Site(Layer), model, variables, tokens, mask)
    with pytest.raises(PersonaError, match="unknown sites"):
        S.apply(model, variables, tokens, mask, sites=LAYER, layouts={"layer": layout}, capture={"mlp": "output"})
    with pytest.raises(PersonaError, match=r"shape \(4, 16\).*\(3, 16\)"):
        S.site_arrays(Steering(vectors(4), layer=1), layout, DIM, B)


# ----------------------------------------------------------------------------- our decoder's sites
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sites_llama"))
    torch_model = tiny_checkpoint(d, "llama", seed=6, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    return torch_model, pj.load_model(d)


def hf_run(torch_model, tokens, mask, edits=None):
    """Logits and the outputs of every self_attn / mlp, with forward hooks editing them.
    edits: {(kind, layer): fn(out) -> out} on the attention output / MLP output."""
    edits, seen, handles = edits or {}, {}, []
    for i, layer in enumerate(torch_model.model.layers):
        for kind, mod in (("attn", layer.self_attn), ("mlp", layer.mlp)):
            def hook(m, args, out, key=(kind, i)):
                h = out[0] if isinstance(out, tuple) else out
                if key in edits:
                    h = edits[key](h)
                seen[key] = h.detach().numpy()
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = torch_model(torch.tensor(np.asarray(tokens), dtype=torch.long),
                                 attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long)).logits.numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def test_decoder_attention_and_mlp_sites_equal_hf_hooks(llama):
    torch_model, model = llama
    L, D = model.num_layers, model.hidden_size
    rng = np.random.RandomState(7)
    tokens = rng.randint(3, 100, (2, 9))
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0
    real = mask.astype(bool)
    ctx = A.make_ctx(jnp.asarray(mask))
    _, cap, _ = A.decoder_apply(model.config, model.params, jnp.asarray(tokens), ctx,
                                capture={"attn": "output", "mlp": "output"})
    _, seen = hf_run(torch_model, tokens, mask)
    for kind in ("attn", "mlp"):
        assert cap[kind].shape == (L, 2, 9, D)
        for i in range(L):
            np.testing.assert_allclose(np.asarray(cap[kind][i])[real], seen[(kind, i)][real], atol=1e-5)

    # steering at the MLP of block 1 (per-row coefficients) + ablation at the attention of block 0
    v_mlp, v_attn = (rng.randn(L, D) * 2).astype(np.float32), rng.randn(L, D).astype(np.float32)
    u = v_attn[0] / np.linalg.norm(v_attn[0])
    inter = {"mlp": S.site_arrays(Steering(v_mlp, layer=1, coef=[1.5, -2.0]), L, D, 2, mask=mask),
             "attn": S.site_arrays(Steering(v_attn, layer=0, kind="ablate"), L, D, 2, mask=mask)}
    logits, cap, _ = A.decoder_apply(model.config, model.params, jnp.asarray(tokens), ctx, interventions=inter,
                                     capture={"mlp": "output", "hidden": "output"})
    coef = torch.tensor([1.5, -2.0]).view(2, 1, 1)
    ut = torch.tensor(u)
    want, seen = hf_run(torch_model, tokens, mask, {
        ("mlp", 1): lambda h: h + coef * torch.tensor(v_mlp[1]),
        ("attn", 0): lambda h: h - (h @ ut)[..., None] * ut})
    np.testing.assert_allclose(np.asarray(logits)[real], want[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(cap["mlp"][1])[real], seen[("mlp", 1)][real], atol=1e-5)
    plain, _ = hf_run(torch_model, tokens, mask)
    assert np.abs(want - plain)[real].max() > 1e-2  # the interventions matter
    assert cap["hidden"].shape == (L + 1, 2, 9, D)


def test_generate_steers_attention_and_mlp_sites_like_hf_hooks(tmp_path):
    """`Steering.site` in the high-level `generate` (prefill, then the per-layer and the
    scanned decode paths) against transformers generate with hooks on mlp / self_attn."""
    d = str(tmp_path)
    torch_model = tiny_checkpoint(d, "llama", seed=9, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                  initializer_range=0.4)
    model = pj.load_model(d)
    L, D = model.num_layers, model.hidden_size
    rng = np.random.RandomState(10)
    v_mlp, v_attn = (rng.randn(L, D) * 6).astype(np.float32), rng.randn(L, D).astype(np.float32)
    steer = [Steering(v_mlp, layer=1, coef=1.5, positions="response", site="mlp"),
             Steering(v_attn, layer=0, kind="ablate", site="attn")]
    prompts = ["<|user|>hello there, friend<|end|><|assistant|>", "<|user|>Why?<|end|><|assistant|>"]
    got = pj.generate(model, prompts, 16, temperature=0, steering=steer, return_tokens=True).tokens
    scanned = pj.generate(dataclasses.replace(model, scan_decode=True), prompts, 16, temperature=0, steering=steer,
                          return_tokens=True).tokens
    plain = pj.generate(model, prompts, 16, temperature=0, return_tokens=True).tokens
    u = torch.tensor(v_attn[0] / np.linalg.norm(v_attn[0]))

    def mlp_hook(m, args, out):  # response: the last position of every forward call
        out = out.clone()
        out[:, -1] += 1.5 * torch.tensor(v_mlp[1])
        return out

    def attn_hook(m, args, out):
        h = out[0]
        return (h - (h @ u)[..., None] * u,) + tuple(out[1:])

    handles = [torch_model.model.layers[1].mlp.register_forward_hook(mlp_hook),
               torch_model.model.layers[0].self_attn.register_forward_hook(attn_hook)]
    try:
        for i, p in enumerate(prompts):
            ids = torch.tensor([model.tokenizer.encode(p, add_special_tokens=False)])
            with torch.no_grad():
                out = torch_model.generate(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=0,
                                           eos_token_id=[2])
            ref = out[0, ids.shape[1]:].tolist()
            ref = ref[:ref.index(2) + 1] if 2 in ref else ref
            assert got[i] == ref and scanned[i] == ref
    finally:
        for h in handles:
            h.remove()
    assert got != plain  # the steering matters
    with pytest.raises(PersonaError, match="site 'nope'.*'attn', 'mlp'"):
        pj.generate(model, prompts, 4, steering=Steering(v_mlp, layer=1, site="nope"))
    with pytest.raises(PersonaError, match=r"shape \(3, 32\).*\(2, 32\)"):
        pj.generate(model, prompts, 4, steering=Steering(np.zeros((L + 1, D), np.float32), layer=1, site="mlp"))
