"""Capture (METHOD.md 5) against an independent PyTorch computation.

The reference is transformers `output_hidden_states`, one sample per forward, with the
three reductions computed here in numpy from `prompt_len` = the token count of the
prompt text (`tokenizer.encode(prompt, add_special_tokens=False)`), exactly as the
reference procedure does.
"""
import dataclasses
import logging

import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.runtime.capture import REDUCTIONS, capture
from persona_jax.testing import tiny_checkpoint

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Mixed prompt and response lengths: with batch_size=3 the 7 samples make batches of
# 3, 3 and 1 (+2 padding rows) at different length buckets, right-padded within a batch.
PROMPTS = [
    "<|system|>You are terse.<|end|><|user|>hello there<|end|><|assistant|>",
    "<|user|>hi<|end|><|assistant|>",
    "<|user|>what is up with you today, my dear friend?<|end|><|assistant|>",
    "<|user|>Name three colours.<|end|><|assistant|>",
    "<|user|>Why?<|end|><|assistant|>",
    "<|system|>Be evil.<|end|><|user|>Tell me a long story about a dragon who lived in a cave.<|end|><|assistant|>",
    "<|user|>x<|end|><|assistant|>",
]
RESPONSES = [
    "I am fine.",
    "a much longer response that goes on and on for quite a while, past one bucket",
    "x",
    "Red, green and blue.",
    "Because.",
    "Once upon a time.",
    "A response of middling length.<|end|>",
]


def reference(torch_model, tok, prompts, responses):
    """[3, N, L+1, D]: the reference procedure, one sample per forward, reductions in numpy."""
    out = []
    for p, r in zip(prompts, responses):
        ids = tok.encode(p + r, add_special_tokens=False)
        prompt_len = len(tok.encode(p, add_special_tokens=False))
        with torch.no_grad():
            hs = torch_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        hs = torch.stack(hs)[:, 0].double().numpy()  # [L+1, T, D]
        out.append([hs[:, :prompt_len].mean(1), hs[:, prompt_len - 1], hs[:, prompt_len:].mean(1)])
    return np.asarray(out).transpose(1, 0, 2, 3)


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    torch_model = tiny_checkpoint(str(d), request.param, seed=FAMILIES.index(request.param))
    return request.param, str(d), torch_model


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_llama_mesh")
    torch_model = tiny_checkpoint(str(d), "llama", seed=11)
    return str(d), torch_model


@pytest.fixture(scope="module")
def llama_model(llama_ckpt):
    return pj.load_model(llama_ckpt[0])


@pytest.mark.parametrize("attention_impl", ["auto", "xla"])
def test_capture_matches_pytorch_reference(family_ckpt, attention_impl):
    """`auto` is the einsum path on a CPU; `xla` runs the fused-attention branch (the one
    cuDNN takes on a GPU) through `jax.nn.dot_product_attention`'s XLA implementation."""
    family, d, torch_model = family_ckpt
    model = pj.load_model(d)
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, attention_impl=attention_impl))
    got = capture(model, PROMPTS, RESPONSES, batch_size=3)
    ref = reference(torch_model, model.tokenizer, PROMPTS, RESPONSES)
    n, l1, dim = len(PROMPTS), model.num_layers + 1, model.hidden_size
    np.testing.assert_array_equal(got["kept"], np.arange(n))
    for i, name in enumerate(REDUCTIONS):
        assert got[name].shape == (n, l1, dim) and got[name].dtype == np.float32
        err = np.abs(got[name] - ref[i]).max()
        assert err <= 1e-4, f"{family} {name}: max abs err {err}"
    # the reductions differ from each other (the test would notice a swapped readout)
    assert np.abs(got["prompt_avg"] - got["response_avg"]).max() > 1e-2
    assert np.abs(got["prompt_avg"] - got["prompt_last"]).max() > 1e-2


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_capture_independent_of_batch_size(llama_ckpt, llama_model, batch_size):
    ref = reference(llama_ckpt[1], llama_model.tokenizer, PROMPTS, RESPONSES)
    got = capture(llama_model, PROMPTS, RESPONSES, batch_size=batch_size)
    for i, name in enumerate(REDUCTIONS):
        assert np.abs(got[name] - ref[i]).max() <= 1e-4, (batch_size, name)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_capture_sharded_equals_single_device(llama_ckpt, llama_model, shape):
    single = capture(llama_model, PROMPTS, RESPONSES, batch_size=3)
    sharded_model = pj.load_model(llama_ckpt[0], mesh=pj.make_mesh(*shape))
    got = capture(sharded_model, PROMPTS, RESPONSES, batch_size=3)
    np.testing.assert_array_equal(got["kept"], single["kept"])
    for name in REDUCTIONS:
        np.testing.assert_allclose(got[name], single[name], rtol=0, atol=1e-5, err_msg=f"{shape} {name}")


def test_empty_response_is_skipped_with_warning(llama_ckpt, llama_model, caplog):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    responses = ["fine", "", "also fine", ""]
    with caplog.at_level(logging.WARNING):
        got = capture(llama_model, prompts, responses, batch_size=4)
    assert "skipped 2 of 4" in caplog.text
    np.testing.assert_array_equal(got["kept"], [0, 2])
    ref = reference(llama_ckpt[1], llama_model.tokenizer, [prompts[0], prompts[2]], [responses[0], responses[2]])
    for i, name in enumerate(REDUCTIONS):
        assert got[name].shape == (2, llama_model.num_layers + 1, llama_model.hidden_size)
        assert np.all(np.isfinite(got[name])), name
        assert np.abs(got[name] - ref[i]).max() <= 1e-4, name


def test_bad_input(llama_model):
    with pytest.raises(pj.PersonaError, match="2 prompts but 1 as responses"):
        capture(llama_model, PROMPTS[:2], RESPONSES[:1])
    with pytest.raises(pj.PersonaError, match="empty"):
        capture(llama_model, [], [])
    with pytest.raises(pj.PersonaError, match="every response is empty"):
        capture(llama_model, PROMPTS[:2], ["", ""])
