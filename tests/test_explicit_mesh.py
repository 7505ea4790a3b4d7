"""Meshes made the way JAX documents them: `jax.make_mesh` (Explicit axis types by
default), `jax.sharding.Mesh(..., axis_types=...)`, and the `jax.set_mesh` context.

Forward, capture, greedy generation and a training step under a (4, 2) Explicit mesh are
checked against transformers (PyTorch) where a reference exists and against the same
computation on one device otherwise; other axis names must give a clear error.
"""
import jax
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, Mesh

import persona_jax as pj
from persona_jax.errors import PersonaError
from persona_jax.finetune import data as D
from persona_jax.finetune import trainer as T
from persona_jax.model import sharding as sh
from persona_jax.steering.spec import Steering
from persona_jax.testing import tiny_checkpoint

PROMPTS = [
    "<|user|>hello there, friend<|end|><|assistant|>",
    "<|user|>what is up today?<|end|><|assistant|>",
    "<|system|>Be terse.<|end|><|user|>Why?<|end|><|assistant|>",
]
RESPONSES = ["I am fine, thanks.", "Not much at all", "Because."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("explicit"))
    torch_model = tiny_checkpoint(d, "llama", seed=3, num_hidden_layers=2, hidden_size=32,
                                  intermediate_size=64, initializer_range=0.4)
    return d, torch_model


@pytest.fixture(scope="module")
def explicit_mesh():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    assert mesh.axis_types == (AxisType.Explicit, AxisType.Explicit)  # JAX's default now
    return mesh


@pytest.fixture(scope="module")
def single(ckpt):
    return pj.load_model(ckpt[0])


@pytest.fixture(scope="module")
def sharded(ckpt, explicit_mesh):
    return pj.load_model(ckpt[0], mesh=explicit_mesh)


def close(got, want, tol=1e-5):
    """Equal to `tol` relative to the scale of `want` (sharded sums add in another order;
    these tiny models have states of size ~30)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), np.abs(got - want).max()


def batch(model):
    ids = [model.tokenizer.encode(p + r, add_special_tokens=False) for p, r in zip(PROMPTS, RESPONSES)]
    width = max(map(len, ids))
    tokens = np.zeros((len(ids), width), np.int64)
    mask = np.zeros((len(ids), width), np.int64)
    for i, s in enumerate(ids):  # left padding
        tokens[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return tokens, mask


def test_params_are_typed_with_the_explicit_mesh(sharded, explicit_mesh):
    k = sharded.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert k.sharding.mesh == explicit_mesh and k.sharding.spec[-1] == "model"
    assert "@model" in str(jax.typeof(k))


def test_forward_matches_transformers(ckpt, sharded, single):
    _, torch_model = ckpt
    tokens, mask = batch(sharded)
    out = pj.forward(sharded, tokens, mask)
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens), attention_mask=torch.tensor(mask), output_hidden_states=True)
    real = mask.astype(bool)
    for l, h in enumerate(ref.hidden_states):
        np.testing.assert_allclose(np.asarray(out.hidden_states[l])[real], h.numpy()[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy()[real], atol=1e-4, rtol=1e-4)
    one = pj.forward(single, tokens, mask)
    close(out.hidden_states, one.hidden_states)


def test_capture_equals_single_device(sharded, single):
    got = pj.capture(sharded, PROMPTS, RESPONSES, batch_size=4)
    want = pj.capture(single, PROMPTS, RESPONSES, batch_size=4)
    for name in pj.REDUCTIONS:
        close(got[name], want[name])


def test_greedy_and_steered_generation_match_transformers(ckpt, sharded):
    _, torch_model = ckpt
    tok = sharded.tokenizer
    got = pj.generate(sharded, PROMPTS, 24, temperature=0, return_tokens=True).tokens
    vec = np.random.RandomState(0).randn(sharded.num_layers + 1, sharded.hidden_size).astype(np.float32) * 4
    steered = pj.generate(sharded, PROMPTS, 24, temperature=0, return_tokens=True,
                          steering=Steering(vec, layer=1, coef=2.0)).tokens
    for i, p in enumerate(PROMPTS):  # one prompt at a time: no padding in the reference
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        for hook, want in ((None, got[i]), (lambda m, a, o: (o[0] + 2.0 * torch.tensor(vec[1]),) + tuple(o[1:])
                                            if isinstance(o, tuple) else o + 2.0 * torch.tensor(vec[1]), steered[i])):
            h = torch_model.model.layers[0].register_forward_hook(hook) if hook else None
            try:
                with torch.no_grad():
                    out = torch_model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=0,
                                               eos_token_id=[2])
            finally:
                if h is not None:
                    h.remove()
            ref = out[0, ids.shape[1]:].tolist()
            ref = ref[:ref.index(2) + 1] if 2 in ref else ref
            assert want == ref
    assert got != steered  # the steering matters


def test_training_step_equals_single_device(sharded, single, explicit_mesh):
    conv = [[{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": "ok" + "ab"[i % 2] * (i % 4)}]
            for i in range(8)]
    ex, _ = D.from_conversations(conv, single.tokenizer, max_length=32)
    # adam_eps well above the gradients' float32 noise: Adam's first step is lr * g / (|g| + eps),
    # which would turn a 1e-9 difference of a vanishing gradient into a full lr-sized one.
    tc = T.TrainConfig(learning_rate=1e-3, warmup_steps=0, batch_size=4, grad_accum=2, num_steps=1,
                       adam_eps=1e-3, progress=False)
    vec = np.random.RandomState(1).randn(single.num_layers + 1, single.hidden_size).astype(np.float32)
    steer = [Steering(vec, layer=1, coef=0.5)]
    want = T.train(single.config, single.params, ex, tc, steerings=steer, eval_data=ex)
    got = T.train(sharded.config, sharded.params, ex, tc, steerings=steer, eval_data=ex, mesh=explicit_mesh)
    for key in ("loss", "grad_norm", "eval_loss"):
        np.testing.assert_allclose(got.history[0][key], want.history[0][key], rtol=1e-5)
    jax.tree.map(close, got.params, want.params)
    k = got.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert k.sharding.mesh == explicit_mesh and k.sharding.spec[-1] == "model"


def test_mesh_with_axis_types_and_the_set_mesh_context(ckpt, single):
    d, _ = ckpt
    tokens, mask = batch(single)
    want = np.asarray(pj.forward(single, tokens, mask).hidden_states)
    want_text = pj.generate(single, PROMPTS, 8, temperature=0)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"),
                axis_types=(AxisType.Explicit, AxisType.Explicit))
    close(pj.forward(pj.load_model(d, mesh=mesh), tokens, mask).hidden_states, want)
    contexts = [jax.set_mesh]
    if hasattr(jax.sharding, "use_mesh"):  # removed in newer JAX; set_mesh is the one API
        contexts.append(jax.sharding.use_mesh)
    for ctx in contexts:
        with ctx(jax.make_mesh((4, 2), ("data", "model"))):
            model = pj.load_model(d)  # the context's mesh
            assert model.mesh is not None and model.mesh.shape == {"data": 4, "model": 2}
            got = np.asarray(pj.forward(model, tokens, mask).hidden_states)
            text = pj.generate(model, PROMPTS, 8, temperature=0)
        close(got, want)
        assert text == want_text


def test_auto_mesh_keeps_working(ckpt, single):
    tokens, mask = batch(single)
    model = pj.load_model(ckpt[0], mesh=pj.make_mesh(4, 2))
    assert model.mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    close(pj.forward(model, tokens, mask).hidden_states, pj.forward(single, tokens, mask).hidden_states)


def test_other_axis_names_are_a_clear_error_or_renamed(ckpt, single):
    mesh = jax.make_mesh((4, 2), ("batch", "tp"))
    with pytest.raises(PersonaError, match=r"axes \('batch', 'tp'\).*'data'.*'model'.*rename_mesh_axes"):
        pj.load_model(ckpt[0], mesh=mesh)
    with pytest.raises(PersonaError, match="'data'"):
        T.train(single.config, single.params, [([3, 4, 5], [0, 1, 1])], mesh=mesh)
    renamed = sh.rename_mesh_axes(mesh, {"batch": "data", "tp": "model"})
    assert renamed.axis_names == ("data", "model") and renamed.axis_types == mesh.axis_types
    assert list(renamed.devices.flat) == list(mesh.devices.flat)
    tokens, mask = batch(single)
    close(pj.forward(pj.load_model(ckpt[0], mesh=renamed), tokens, mask).hidden_states,
          pj.forward(single, tokens, mask).hidden_states)
    with pytest.raises(PersonaError, match="not axes"):
        sh.rename_mesh_axes(mesh, {"x": "data"})


def test_decoder_apply_inside_the_users_own_explicit_jit(sharded, single, explicit_mesh):
    """The jittable core called from a user's function on explicitly sharded arrays, with
    the user's own Explicit-mode ops around it."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from persona_jax.runtime import apply

    tokens, mask = batch(single)
    tokens, mask = np.concatenate([tokens, tokens[:1]]), np.concatenate([mask, mask[:1]])  # 4 rows for "data"
    put = lambda x: jax.device_put(x.astype(np.int32), NamedSharding(explicit_mesh, P("data")))

    @jax.jit
    def user_fn(params, ids, m):
        _, hidden, _ = apply.decoder_apply(sharded.config, params, ids, apply.make_ctx(m), capture="hidden")
        return (hidden * m[None, :, :, None]).sum(axis=2)  # [L+1, B, D], under the user's Explicit types

    with jax.set_mesh(explicit_mesh):
        got = user_fn(sharded.params, put(tokens), put(mask))
        assert jax.typeof(got).sharding.spec[1] == "data"
    want = (np.asarray(pj.forward(single, tokens, mask).hidden_states) * mask[None, :, :, None]).sum(axis=2)
    close(got, want)
