"""LoRA adapters exchanged with PEFT itself (the reference trains and saves with it).

Both ways, on a family with separate projections (llama) and one whose checkpoints fuse
q/k/v and gate/up (Phi-3, `qkv_proj` / `gate_up_proj`):
- ours exported -> `peft.PeftModel.from_pretrained` on the transformers model: its logits
  equal persona_jax's with the adapter merged;
- an adapter made and saved by PEFT (random nonzero B, a per-module rank and alpha) ->
  our `load_adapter` + `merge`: persona_jax's logits equal PEFT's.
"""
import copy

import jax
import numpy as np
import pytest
import torch

import persona_jax as pj
from persona_jax.finetune import lora as flora
from persona_jax.runtime.forward import forward
from persona_jax.testing import tiny_checkpoint

peft = pytest.importorskip("peft")

FAMILIES = ("llama", "phi3")
TOKENS = np.array([[5, 17, 42, 9, 77, 3, 12, 60, 31, 8]], np.int32)
TOL = 2e-4  # max abs logit error, relative to the largest |logit|


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"peft_{request.param}")
    tm = tiny_checkpoint(str(d), request.param, seed=4, initializer_range=0.1)
    return request.param, d, tm.float().eval(), pj.load_model(str(d))


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _close(ours, ref):
    err = np.abs(np.asarray(ours) - ref).max() / max(1.0, np.abs(ref).max())
    assert err < TOL, err


def _random_lora(model, cfg, seed):
    """An adapter with nonzero A and B for every target, at a size that moves the logits."""
    rng = np.random.default_rng(seed)
    lora = flora.init(cfg, model.params, jax.random.PRNGKey(seed))
    return {sub: {n: {"A": rng.standard_normal(ab["A"].shape).astype(np.float32) * 0.3,
                      "B": rng.standard_normal(ab["B"].shape).astype(np.float32) * 0.3}
                  for n, ab in mods.items()} for sub, mods in lora.items()}


@pytest.mark.parametrize("rslora,targets", [(True, "all"), (False, ("q_proj", "v_proj", "up_proj", "o_proj"))])
def test_ours_loads_in_peft(family, tmp_path, rslora, targets):
    name, d, tm, model = family
    cfg = flora.LoraConfig(rank=2, alpha=3.0, rslora=rslora, targets=targets)
    lora = _random_lora(model, cfg, seed=1)
    out = tmp_path / "adapter"
    flora.export_adapter(lora, cfg, str(out), str(d), config=model.config)
    base = _torch_logits(tm)
    # PEFT injects its layers into the model it is given: a copy keeps the fixture's intact
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(out)).eval()
    ref = _torch_logits(peft_model)
    assert np.abs(ref - base).max() > 1e-2, "the adapter must move PEFT's logits, or the test proves nothing"
    merged = flora.merge(model.params, lora, cfg)
    ours = forward(pj.Model(model.config, merged, model.tokenizer), TOKENS).logits
    _close(ours, ref)
    # and back: our reader gives the same merged model
    back, back_cfg = flora.load_adapter(str(out), model.config)
    again = forward(pj.Model(model.config, flora.merge(model.params, back, back_cfg), model.tokenizer), TOKENS).logits
    _close(again, ref)


def test_peft_adapter_loads_here(family, tmp_path):
    name, d, tm, model = family
    modules = (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if name == "phi3"
               else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pcfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=modules, init_lora_weights=False,
                           use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 11})
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_checkpoint(str(tmp_path / "copy"), name, seed=4, initializer_range=0.1).float(),
                             pcfg).eval()
    ref = _torch_logits(pm)
    assert np.abs(ref - _torch_logits(tm)).max() > 1e-2
    pm.save_pretrained(str(tmp_path / "peft_adapter"))
    lora, cfg = flora.load_adapter(str(tmp_path / "peft_adapter"), model.config)
    ours = forward(pj.Model(model.config, flora.merge(model.params, lora, cfg), model.tokenizer), TOKENS).logits
    _close(ours, ref)


def test_fused_adapter_on_unfused_family_is_refused(family, tmp_path):
    name, d, tm, model = family
    if name == "phi3":
        pytest.skip("phi3 has the fused modules")
    lora = {"self_attn": {"qkv_proj": {"A": np.ones((2, 32, 2), np.float32), "B": np.ones((2, 2, 96), np.float32)}}}
    a = tmp_path / "a"
    a.mkdir()
    from persona_jax.model.safetensors_io import save_file
    save_file({flora.peft_name(i, "qkv_proj", w): np.ones((2, 32) if w == "A" else (96, 2), np.float32)
               for i in range(2) for w in "AB"}, str(a / "adapter_model.safetensors"))
    (a / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj"]}')
    with pytest.raises(pj.PersonaError, match="fused qkv_proj"):
        flora.load_adapter(str(a), model.config)


def test_gemma3_multimodal_adapter_attaches_in_peft(tmp_path):
    """A `Gemma3ForConditionalGeneration` holds its decoder at `model.language_model`: our
    adapter of that checkpoint is named from there, so PEFT attaches every module (a bare
    `model.layers...` name would match none of them) and its logits equal ours merged;
    PEFT's own adapter of it reads back to the same model."""
    from persona_jax.testing import tiny_gemma3_multimodal
    d = tmp_path / "mm"
    tm = tiny_gemma3_multimodal(str(d)).float().eval()
    model = pj.load_model(str(d))
    assert model.config.module_prefix == "model.language_model."
    cfg = flora.LoraConfig(rank=2, alpha=3.0, targets=("q_proj", "v_proj", "down_proj"))
    lora = _random_lora(model, cfg, seed=2)
    out = tmp_path / "adapter"
    flora.export_adapter(lora, cfg, str(out), str(d), config=model.config)
    base = _torch_logits(tm)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(out)).eval()
    injected = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    assert len(injected) == 3 * model.num_layers, injected
    ref = _torch_logits(peft_model)
    assert np.abs(ref - base).max() > 1e-2
    merged = flora.merge(model.params, lora, cfg)
    _close(forward(pj.Model(model.config, merged, model.tokenizer), TOKENS).logits, ref)
    back, back_cfg = flora.load_adapter(str(out), model.config)
    _close(forward(pj.Model(model.config, flora.merge(model.params, back, back_cfg), model.tokenizer),
                   TOKENS).logits, ref)
