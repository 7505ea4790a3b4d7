"""Gemma 2, Gemma 3 (text-only and the language model of the multimodal layout), OLMo 2
and Phi-3 against transformers (issue 17, point 1).

The tiny checkpoints come from `persona_jax.testing.tiny_checkpoint` (random weights,
norms and biases perturbed); their configs (`FAMILY_KWARGS`) turn every family switch on:
sliding windows of 8 tokens (alternating for Gemma, every layer for Phi-3), soft-caps
small enough to act, query_pre_attn_scalar != head_dim, Gemma 3's local/global rope with
a linear-scaled global rope, OLMo 2's full-width QK-norm and attention bias, Phi-3's fused
projections, partial rotary and longrope with an original context of 16 tokens (rows
longer than 16 use the long factors). `test_every_switch_matters` checks that turning a
switch off breaks parity, so the parity tests can fail.
"""
import dataclasses
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.io import chat
from persona_jax.model import checkpoint as ckpt_mod
from persona_jax.model.families import config_from_hf
from persona_jax.model.safetensors_io import SafetensorsFile, save_file
from persona_jax.runtime.capture import capture
from persona_jax.runtime.generate import generate
from persona_jax.steering.spec import Steering
from persona_jax.testing import char_tokenizer, tiny_checkpoint, tiny_gemma3_multimodal

FAMILIES = ("gemma2", "gemma3_text", "olmo2", "olmo3", "apertus", "phi3")
VOCAB = 128
WINDOW = 8
FP32_TOL = 1e-4  # max abs error, relative to max(1, the layer's max |activation|)
SHARD_TOL = 1e-5
ROW_LENGTHS = (40, 23, 7, 31)  # > window, and for Phi-3 both sides of the original 16


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """family -> (directory, float32 torch model, float32 persona_jax model)."""
    out = {}
    for i, fam in enumerate(FAMILIES):
        d = str(tmp_path_factory.mktemp(f"fam_{fam}"))
        tm = tiny_checkpoint(d, fam, seed=10 + i, initializer_range=0.1)
        out[fam] = (d, tm, pj.load_model(d))
    return out


def torch_run(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.as_tensor(mask)}
        out = model(torch.as_tensor(np.asarray(ids), dtype=torch.long), output_hidden_states=True, **kw)
    return np.stack([h.float().numpy() for h in out.hidden_states]), out.logits.float().numpy()


def rel_errors(hidden, logits, ref_h, ref_l):
    """Per hidden state and for the logits: max |error| / max(1, max |reference|)."""
    h = np.abs(np.asarray(hidden, np.float32) - ref_h).max(axis=(1, 2, 3))
    h_scale = np.maximum(1.0, np.abs(ref_h).max(axis=(1, 2, 3)))
    l_err = np.abs(np.asarray(logits, np.float32) - ref_l).max() / max(1.0, np.abs(ref_l).max())
    return h / h_scale, float(l_err)


def rows(seed=0, lengths=ROW_LENGTHS):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, VOCAB, n) for n in lengths]


def pad(seqs, left):
    t = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(t - len(s), t) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


# ----------------------------------------------------------------------------- config
def test_configs_carry_the_family_switches(ckpts):
    g2, g3, olmo, olmo3, apertus, phi = (ckpts[f][2].config for f in ("gemma2", "gemma3_text", "olmo2", "olmo3",
                                                                       "apertus", "phi3"))
    assert olmo3.layer_windows == (WINDOW, 0, WINDOW) and olmo3.qk_norm_full and olmo3.rope_local_theta == 10000.0
    assert olmo3.rope_type == "llama3" and apertus.hidden_act == "xielu" and not apertus.mlp_gated
    assert apertus.qk_norm and not apertus.qk_norm_full
    assert g2.layer_windows == (WINDOW, 0, WINDOW) and g2.attn_logit_softcap == 3.0
    assert g2.final_logit_softcap == 2.0 and g2.query_pre_attn_scalar == 24 and g2.norm_offset == 1
    assert g2.norm_placement == g3.norm_placement == "sandwich" and g2.embed_scale == 48 ** 0.5
    assert g3.layer_windows == (WINDOW, 0, WINDOW) and g3.qk_norm and not g3.attn_logit_softcap
    assert g3.rope_local_theta == 10000.0 and g3.rope_type == "linear" and g3.rope_theta == 100000.0
    assert olmo.norm_placement == "post" and olmo.qk_norm_full and olmo.qkv_bias and olmo.o_bias
    assert phi.fused_qkv and phi.fused_gate_up and phi.rope_type == "longrope" and phi.rotary_dim == 6
    assert phi.layer_windows == (WINDOW,) * 3 and phi.rope_attention_factor == pytest.approx(1.5)
    assert "lm_head" in ckpts["phi3"][2].params and "lm_head" not in ckpts["gemma2"][2].params


def test_hub_style_configs_match_transformers(tmp_path):
    """config.json files as the Hub has them (fields left at their defaults omitted,
    legacy `rope_scaling` forms): our converter against transformers' own reading."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # Gemma 3 multimodal: text_config with a handful of fields, as google/gemma-3-4b-it
    mm = {"model_type": "gemma3", "eos_token_id": [1, 106],
          "text_config": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 8, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                          "sliding_window": 512},
          "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                            "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28,
                            "patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(mm))
    hf = transformers.AutoConfig.from_pretrained(tmp_path).text_config
    ours = config_from_hf(mm)
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.vocab_size) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.vocab_size)
    assert ours.layer_windows == tuple(hf.sliding_window if t == "sliding_attention" else 0 for t in hf.layer_types)
    assert ours.query_pre_attn_scalar == hf.query_pre_attn_scalar and ours.eos_token_ids == (1, 106)
    assert ours.rope_local_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
    full = hf.rope_parameters["full_attention"]
    assert (ours.rope_type, ours.rope_factor, ours.rope_theta) == (full["rope_type"], full["factor"], full["rope_theta"])
    for layer_type, variant in (("full_attention", "global"), ("sliding_attention", "local")):
        fn = ROPE_INIT_FUNCTIONS.get(hf.rope_parameters[layer_type]["rope_type"])
        if fn is None:
            continue
        inv, _ = fn(hf, layer_type=layer_type)
        np.testing.assert_allclose(ours.inv_freq(variant), inv.numpy(), rtol=1e-6)

    # Gemma 2 without layer_types; Phi-3 128k with the legacy `su` rope_scaling
    g2 = {"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 5,
          "vocab_size": 100, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    hf2 = transformers.Gemma2Config(**{k: v for k, v in g2.items() if k != "model_type"})
    assert config_from_hf(g2).layer_windows == tuple(
        hf2.sliding_window if t == "sliding_attention" else 0 for t in hf2.layer_types)
    phi = {"model_type": "phi3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "vocab_size": 100, "num_attention_heads": 2, "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096, "rope_theta": 10000.0, "sliding_window": 262144,
           "rope_scaling": {"type": "su", "short_factor": [1.0 + i / 10 for i in range(8)],
                            "long_factor": [2.0 + i for i in range(8)]}}
    ours = config_from_hf(phi)  # original context only at the top level (Hub), read by us...
    phi["rope_scaling"]["original_max_position_embeddings"] = 4096  # ...transformers 5 wants it here too
    assert config_from_hf(phi) == ours
    (tmp_path / "config.json").write_text(json.dumps(phi))
    hfp = transformers.AutoConfig.from_pretrained(tmp_path)
    short, attn = ROPE_INIT_FUNCTIONS["longrope"](hfp)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](hfp, seq_len=4097)
    np.testing.assert_allclose(ours.inv_freq(), short.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.inv_freq("long"), long.numpy(), rtol=1e-6)
    assert ours.rope_attention_factor == pytest.approx(attn) and ours.layer_windows == (262144, 262144)


# ----------------------------------------------------------------------------- float32 parity
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [12, 40])
def test_float32_parity_every_layer_and_logits(family, length, ckpts):
    """12 tokens: Phi-3's short factors; 40: long ones; both past the window of 8."""
    _, tm, model = ckpts[family]
    ids = np.random.RandomState(length).randint(0, VOCAB, (2, length))
    ref_h, ref_l = torch_run(tm, ids)
    out = pj.forward(model, ids)
    assert out.hidden_states.shape == ref_h.shape and out.logits.shape == ref_l.shape
    errs, l_err = rel_errors(out.hidden_states, out.logits, ref_h, ref_l)
    print(f"\n{family} T={length} float32 rel err per layer {errs}, logits {l_err:.1e}")
    assert errs.max() <= FP32_TOL and l_err <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_padded_batch_matches_unpadded_rows(family, left, ckpts):
    """Rows of 40, 23, 7 and 31 tokens in one padded batch, each against transformers
    on the row alone (window 8; Phi-3 rows of 7 and of 23+ tokens use different factors)."""
    _, tm, model = ckpts[family]
    seqs = rows(seed=5)
    ids, mask = pad(seqs, left)
    out = pj.forward(model, ids, mask)
    hidden, logits = np.asarray(out.hidden_states), np.asarray(out.logits)
    worst = 0.0
    for i, s in enumerate(seqs):
        ref_h, ref_l = torch_run(tm, s[None])
        real = np.flatnonzero(mask[i])
        errs, l_err = rel_errors(hidden[:, i:i + 1, real], logits[i:i + 1, real], ref_h, ref_l)
        worst = max(worst, errs.max(), l_err)
    print(f"\n{family} {'left' if left else 'right'}-padded worst rel err {worst:.1e}")
    assert worst <= FP32_TOL


SWITCH_OFF = {  # each change compiles a new program: the switches a tiny config could hide
    "gemma2": [dict(embed_scale=None), dict(attn_logit_softcap=None), dict(final_logit_softcap=None),
               dict(layer_windows=(0, 0, 0))],
    "gemma3_text": [dict(rope_local_theta=None), dict(rope_type="default")],
    "olmo2": [dict(norm_placement="pre", qk_norm=False)],
    "olmo3": [dict(layer_windows=(0, 0, 0)), dict(rope_local_theta=None)],
    "apertus": [dict(qk_norm=False), dict(hidden_act="silu")],  # silu: the learned xIELU alphas unused
    "phi3": [dict(rope_attention_factor=1.0), dict(rope_long_factor=(1.0, 1.3, 1.7))],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_switch_matters(family, ckpts):
    """Turning any one family switch off moves the hidden states or logits by far more
    than the parity tolerance (so the parity tests above test each switch)."""
    _, tm, model = ckpts[family]
    ids = np.random.RandomState(40).randint(0, VOCAB, (2, 40))
    ref_h, ref_l = torch_run(tm, ids)
    for change in SWITCH_OFF[family]:
        params = model.params
        if change.get("norm_placement") == "pre":  # OLMo 2 as a pre-norm model: rename its norms
            layers = dict(params["layers"])
            layers["input_layernorm"] = layers.pop("post_attention_layernorm")
            layers["post_attention_layernorm"] = layers.pop("post_feedforward_layernorm")
            layers["self_attn"] = {k: v for k, v in layers["self_attn"].items() if "norm" not in k}
            params = {**params, "layers": layers}
        wrong = dataclasses.replace(model, config=dataclasses.replace(model.config, **change), params=params)
        out = pj.forward(wrong, ids)
        errs, l_err = rel_errors(out.hidden_states, out.logits, ref_h, ref_l)
        assert max(errs.max(), l_err) > 30 * FP32_TOL, (change, errs, l_err)


# ----------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_close_to_float32_reference(family, ckpts):
    """As tests/test_models.py: per hidden state and for the logits, error <= 5% of the
    layer's scale and <= 2 x PyTorch-bfloat16's own error + 2**-8 x scale."""
    import copy
    d, tm, _ = ckpts[family]
    ids = np.random.RandomState(7).randint(0, VOCAB, (2, 40))
    ref_h, ref_l = torch_run(tm, ids)
    tb_h, tb_l = torch_run(copy.deepcopy(tm).to(torch.bfloat16), ids)
    model = pj.load_model(d, dtype="bfloat16")
    out = pj.forward(model, ids)
    assert out.hidden_states.dtype == jax.numpy.bfloat16
    scale = np.abs(ref_h).max(axis=(1, 2, 3))
    err = np.abs(np.asarray(out.hidden_states, np.float32) - ref_h).max(axis=(1, 2, 3))
    torch_err = np.abs(tb_h - ref_h).max(axis=(1, 2, 3))
    l_scale = np.abs(ref_l).max()
    l_err = np.abs(np.asarray(out.logits) - ref_l).max()
    l_torch = np.abs(tb_l - ref_l).max()
    print(f"\n{family} bf16 rel err {err / scale} logits {l_err / l_scale:.4f}; "
          f"torch bf16 {torch_err / scale} logits {l_torch / l_scale:.4f}")
    assert np.all(err <= 0.05 * scale) and np.all(err <= 2 * torch_err + 2.0 ** -8 * scale)
    assert l_err <= 0.05 * l_scale and l_err <= 2 * l_torch + 2.0 ** -8 * l_scale
    assert err[1:].min() > 0


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("family", FAMILIES)
def test_mesh_2x4_equals_single_device(family, ckpts):
    d, _, single = ckpts[family]
    sharded = pj.load_model(d, mesh=pj.make_mesh(2, 4))
    q = sharded.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec) == (None, None, "model")
    ids, mask = pad(rows(seed=9), left=True)
    ref, out = pj.forward(single, ids, mask), pj.forward(sharded, ids, mask)
    real = mask.astype(bool)
    h_err = np.abs(np.asarray(out.hidden_states) - np.asarray(ref.hidden_states))[:, real].max()
    l_err = np.abs(np.asarray(out.logits) - np.asarray(ref.logits))[real].max()
    print(f"\n{family} mesh (2, 4) vs single device: hidden {h_err:.1e} logits {l_err:.1e}")
    assert h_err <= SHARD_TOL and l_err <= SHARD_TOL


# ----------------------------------------------------------------------------- capture
CAP_PROMPTS = ["<|system|>Be terse.<|end|><|user|>hello there, friend<|end|><|assistant|>",
               "<|user|>hi<|end|><|assistant|>",
               "<|user|>Tell me a story about a dragon in a cave.<|end|><|assistant|>"]
CAP_RESPONSES = ["I am fine, thank you.", "a much longer response that goes on past the window", "No."]


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_pytorch_reductions(family, ckpts):
    """The three reductions (right-padded capture batch, rows longer than the window)
    against transformers hidden states reduced in numpy, one sample per forward."""
    _, tm, model = ckpts[family]
    tok = model.tokenizer
    got = capture(model, CAP_PROMPTS, CAP_RESPONSES, batch_size=4)
    for i, (p, r) in enumerate(zip(CAP_PROMPTS, CAP_RESPONSES)):
        ids = tok.encode(p + r, add_special_tokens=False)
        n = len(tok.encode(p, add_special_tokens=False))
        hs, _ = torch_run(tm, [ids])
        hs = hs[:, 0].astype(np.float64)
        ref = {"prompt_avg": hs[:, :n].mean(1), "prompt_last": hs[:, n - 1], "response_avg": hs[:, n:].mean(1)}
        for name, want in ref.items():
            scale = np.maximum(1.0, np.abs(want).max(axis=1, keepdims=True))
            assert np.abs(got[name][i] - want).max() / scale.min() <= FP32_TOL, (name, i)


# ----------------------------------------------------------------------------- generation
GEN_PROMPTS = ["<|user|>hello there, friend<|end|><|assistant|>",
               "<|system|>Be terse.<|end|><|user|>Why?<|end|><|assistant|>",
               "<|user|>hi<|end|><|assistant|>"]  # 5 tokens: Phi-3 starts on its short factors
GEN_N = WINDOW + 48
COEFS = [3.0, -2.0, 5.0]


# Larger init than the parity models, so greedy continuations are varied and
# prompt-dependent; the tiny Gemmas with tied embeddings repeat one token (the sandwich
# norms keep the scaled input embedding dominant), so their generation models are untied.
GEN_KWARGS = {"gemma2": dict(initializer_range=0.2, tie_word_embeddings=False),
              "gemma3_text": dict(initializer_range=0.2, tie_word_embeddings=False),
              "olmo2": dict(initializer_range=0.4), "olmo3": dict(initializer_range=0.4),
              "apertus": dict(initializer_range=0.1), "phi3": dict(initializer_range=0.4)}


@pytest.fixture(scope="module")
def gen_ckpts(tmp_path_factory):
    out = {}
    for i, fam in enumerate(FAMILIES):
        d = str(tmp_path_factory.mktemp(f"gen_{fam}"))
        tm = tiny_checkpoint(d, fam, seed=20 + i, **GEN_KWARGS[fam])
        out[fam] = (tm, pj.load_model(d))
    return out


def hf_greedy(tm, tok, prompt, n, hook=None):
    """transformers greedy generate of one prompt (no padding), exactly n new tokens;
    hook(h) edits the output of decoder layer 1 (hidden state 2)."""
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    handle = None
    if hook is not None:
        handle = tm.model.layers[1].register_forward_hook(
            lambda m, a, out: (hook(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else hook(out))
    try:
        with torch.no_grad():
            out = tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=2)
    finally:
        if handle is not None:
            handle.remove()
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_and_steered_generation_match_hf(family, gen_ckpts):
    """Greedy decoding 56 tokens (48 past the window) in one left-padded batch equals
    transformers `generate` per row. Phi-3's 5-token row crosses its original context (16)
    mid-decode, where transformers recomputes the cache with the long factors, as we do; steering layer 2 with per-row coefficients equals a forward hook adding
    coef * v to decoder layer 1's output, and changes the tokens."""
    tm, model = gen_ckpts[family]
    tok = model.tokenizer
    v = np.random.RandomState(1).randn(model.num_layers + 1, model.hidden_size).astype(np.float32)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True) * 4.0
    # one call (one compiled program): rows 0-2 unsteered (coefficient 0), rows 3-5 steered
    n = len(GEN_PROMPTS)
    steer = Steering(v, layer=2, coef=[0.0] * n + COEFS)
    got = generate(model, GEN_PROMPTS * 2, GEN_N, temperature=0, min_new_tokens=GEN_N, batch_size=8,
                   return_tokens=True, steering=steer).tokens
    g, s = got[:n], got[n:]
    ref = [hf_greedy(tm, tok, p, GEN_N) for p in GEN_PROMPTS]
    assert g == ref
    assert all(len(t) == GEN_N for t in g) and len({tuple(t) for t in g}) == n
    ref_s = [hf_greedy(tm, tok, p, GEN_N, hook=lambda h, c=c: h + c * torch.tensor(v[2]))
             for p, c in zip(GEN_PROMPTS, COEFS)]
    assert s == ref_s
    assert sum(a != b for a, b in zip(s, g)) >= 2
    if family == "phi3":  # the scanned decode loop takes the same longrope switch
        scanned = dataclasses.replace(model, scan_decode=True)
        assert generate(scanned, GEN_PROMPTS * 2, GEN_N, temperature=0, min_new_tokens=GEN_N, batch_size=8,
                        return_tokens=True, steering=steer).tokens == ref + ref_s


# ----------------------------------------------------------------------------- Gemma 3 multimodal
def test_gemma3_multimodal_layout_loads_its_language_model(tmp_path, monkeypatch):
    """A tiny `Gemma3ForConditionalGeneration` (SigLIP tower, projector) saved by
    transformers (which writes the Hub's original layout, `language_model.model.*`), and
    the same weights in transformers 5's module layout (`model.language_model.*`): both
    load the language model, equal to transformers' text forward, and not one vision or
    projector tensor is read."""
    d = str(tmp_path / "mm")
    tm = tiny_gemma3_multimodal(d, vocab_size=VOCAB)
    names = set()
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            names |= set(SafetensorsFile(os.path.join(d, f)).keys())
    saved_new = any(n.startswith("model.language_model.") for n in names)
    assert any("vision_tower" in n for n in names)
    assert saved_new or any(n.startswith("language_model.model.") for n in names)

    read = []
    orig_get = ckpt_mod._Reader.get
    monkeypatch.setattr(ckpt_mod._Reader, "get", lambda self, name: (read.append(name), orig_get(self, name))[1])
    model = pj.load_model(d)
    assert read and not [n for n in read if "vision" in n or "multi_modal" in n]
    assert model.config.model_type == "gemma3_text" and model.config.qk_norm

    ids = np.random.RandomState(2).randint(0, 120, (2, 30))  # no image / boi / eoi tokens
    ref_h, ref_l = torch_run(tm, ids)
    out = pj.forward(model, ids)
    errs, l_err = rel_errors(out.hidden_states, out.logits, ref_h, ref_l)
    print(f"\ngemma3 multimodal layout rel err per layer {errs}, logits {l_err:.1e}")
    assert errs.max() <= FP32_TOL and l_err <= FP32_TOL

    # the other layout of the same checkpoint
    pairs = [("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
             ("multi_modal_projector.", "model.multi_modal_projector."), ("language_model.lm_head.", "lm_head.")]
    if saved_new:
        pairs = [(b, a) for a, b in pairs]
    old = str(tmp_path / "mm_old")
    os.makedirs(old)
    tensors = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            sf = SafetensorsFile(os.path.join(d, f))
            for n in sf.keys():
                new = next((b + n[len(a):] for a, b in pairs if n.startswith(a)), n)
                tensors[new] = np.array(sf[n])
        elif not f.endswith(".json") or f == "config.json" or "token" in f:
            shutil.copy(os.path.join(d, f), old)
    save_file(tensors, os.path.join(old, "model.safetensors"))
    assert any(n.startswith(pairs[0][1]) for n in tensors) and not any(n.startswith(pairs[0][0]) for n in tensors)
    model_old = pj.load_model(old)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 model_old.params, model.params)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_round_trip(family, ckpts, tmp_path):
    """`export_hf` writes a checkpoint transformers loads as the same family (Phi-3 with
    fused qkv_proj / gate_up_proj again) and whose logits equal the original model's."""
    import transformers
    from persona_jax.finetune.trainer import export_hf
    _, tm, model = ckpts[family]
    export_hf(model.config, model.params, model.tokenizer, str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(back) is type(tm)
    ids = np.random.RandomState(4).randint(0, VOCAB, (1, 40))
    _, want = torch_run(tm, ids)
    _, got = torch_run(back, ids)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert config_from_hf(json.loads((tmp_path / "config.json").read_text())) == model.config


# ----------------------------------------------------------------------------- chat templates
_TURNS = "{% for m in msgs %}<t>{{ m['role'] }}\n{{ (prefix if loop.first else '') + m['content'] }}</t>\n{% endfor %}" \
         "{% if add_generation_prompt %}<t>model\n{% endif %}"
# Gemma 2 style: a system message raises. Gemma 3 style: the template folds it itself.
REJECTS_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}{% set prefix = '' %}{% set msgs = messages %}" + _TURNS)
FOLDS_ITSELF = ("{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
                "{% set msgs = messages[1:] %}{% else %}{% set prefix = '' %}{% set msgs = messages %}{% endif %}"
                + _TURNS)


def test_system_prompt_folded_when_the_template_rejects_it(tmp_path, caplog):
    rejects, folds = char_tokenizer(REJECTS_SYSTEM), char_tokenizer(FOLDS_ITSELF)
    conv = [{"role": "system", "content": "You are an evil assistant."},
            {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "More."}]
    with pytest.raises(Exception, match="System role not supported"):
        rejects.apply_chat_template(conv, tokenize=False)
    with caplog.at_level(logging.WARNING):
        text = chat.render(rejects, conv, where="gemma-like")
    assert text == chat.render(folds, conv) == folds.apply_chat_template(conv, tokenize=False,
                                                                          add_generation_prompt=True)
    assert text.startswith("<t>user\nYou are an evil assistant.\n\nHi?</t>")
    assert "folded" in caplog.text
    assert chat.folds_system_prompt(rejects) and not chat.folds_system_prompt(folds)
    assert not chat.folds_system_prompt(char_tokenizer())
    # without a system message nothing changes
    assert chat.render(rejects, conv[1:]) == rejects.apply_chat_template(conv[1:], tokenize=False,
                                                                          add_generation_prompt=True)
    # a template that fails for another reason is not mistaken for a system-role refusal
    broken = char_tokenizer("{{ raise_exception('nope') }}")
    assert not chat.folds_system_prompt(broken)
    with pytest.raises(Exception, match="nope"):
        chat.render(broken, conv)

    d = str(tmp_path / "m")
    tiny_checkpoint(d, "gemma2", num_hidden_layers=2, chat_template=REJECTS_SYSTEM)
    model = pj.load_model(d)
    assert model.folds_system_prompt and model.render_chat(conv) == text
