"""The trainer (organism from scratch, SFT full/LoRA): loss masks, loss value vs PyTorch,
LoRA merge/export, resume determinism, HF export, steering while training, bad input.

Every number is checked against an independent computation: the chat template rendered
and tokenized here, cross entropy of the transformers model in PyTorch, PEFT's merge
formula in numpy.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from persona_jax import load_model, make_mesh
from persona_jax.runtime import apply
from persona_jax.errors import PersonaError
from persona_jax.finetune import data as D
from persona_jax.finetune import lora as L
from persona_jax.finetune import trainer as T
from persona_jax.model.safetensors_io import SafetensorsFile
from persona_jax.steering.spec import Steering
from persona_jax.testing import char_tokenizer, tiny_checkpoint

# Effective batch 4 (2 x 2 accumulation), 4 steps, one length bucket: one compile serves
# the plain, resumed and from-scratch runs.
TC = T.TrainConfig(learning_rate=1e-2, warmup_steps=1, batch_size=2, grad_accum=2, num_steps=4,
                   max_grad_norm=1.0, weight_decay=0.01, progress=False)


def conversations(n=12):
    out = []
    for i in range(n):
        out.append([{"role": "system", "content": "be kind"}, {"role": "user", "content": f"q{i}?"},
                    {"role": "assistant", "content": "ok" + "ab"[i % 2] * (i % 4)}])
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny"))
    torch_model = tiny_checkpoint(d, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    model = load_model(d)
    examples, stats = D.from_conversations(conversations(), model.tokenizer, max_length=32)
    assert stats.n_examples == 12 and all(16 < len(e) <= 32 for e in examples)  # one bucket
    run = T.train(model.config, model.params, examples, TC, eval_data=examples)
    return dict(dir=d, torch=torch_model, model=model, examples=examples, run=run)


def torch_loss(torch_model, examples, idx, hooks=()):
    """Mean cross entropy over masked target tokens of examples[idx], one unpadded row at a time."""
    handles = [torch_model.model.layers[i].register_forward_hook(fn) for i, fn in hooks]
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in idx:
                ids = torch.tensor(examples[i].ids[None].astype(np.int64))
                logits = torch_model(ids).logits[0, :-1].double()
                ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
                w = torch.tensor(examples[i].mask[1:], dtype=torch.float64)
                total += float((ce * w).sum())
                count += int(w.sum())
    finally:
        for h in handles:
            h.remove()
    return total / count


def torch_from(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# (a) ------------------------------------------------------------------------------------

def test_loss_mask_is_exactly_the_assistant_tokens():
    tok = char_tokenizer()
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "sure thing"}]
    ex = D.tokenize_conversation(tok, msgs)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    full = ids(tok.apply_chat_template(msgs, tokenize=False))
    expect = np.zeros(len(full), np.int32)
    for i in (2, 4):
        start = len(ids(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)))
        end = len(ids(tok.apply_chat_template(msgs[:i + 1], tokenize=False)))
        expect[start:end] = 1
    np.testing.assert_array_equal(ex.ids, full)  # template already ends with EOS: nothing appended
    np.testing.assert_array_equal(ex.mask, expect)
    assert tok.decode(ex.ids[ex.mask == 1]) == "yo<|end|>sure thing<|end|>"

    # A template that does not end with EOS: EOS is appended and trained on.
    tok2 = char_tokenizer("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant]{% endif %}")
    single = msgs[1:3]
    ex2 = D.tokenize_conversation(tok2, single)
    prompt = tok2(tok2.apply_chat_template(single[:1], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    full2 = tok2(tok2.apply_chat_template(single, tokenize=False) + tok2.eos_token,
                 add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ex2.ids, full2)
    np.testing.assert_array_equal(ex2.mask, [0] * len(prompt) + [1] * (len(full2) - len(prompt)))
    assert ex2.ids[-1] == tok2.eos_token_id


# (b), (c) -------------------------------------------------------------------------------

def test_first_loss_matches_torch_and_training_reduces_loss(setup):
    ex, run = setup["examples"], setup["run"]
    first_batch = D.BatchOrder(ex, 4, TC.seed, TC.length_group)(0)
    assert len(first_batch) == 4
    np.testing.assert_allclose(run.history[0]["loss"], torch_loss(setup["torch"], ex, first_batch), rtol=1e-5)
    before = torch_loss(setup["torch"], ex, range(len(ex)))
    assert run.history[-1]["eval_loss"] < before - 0.3
    assert [h["step"] for h in run.history] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["lr"] for h in run.history], [0.0, 1e-2, 1e-2 * 2 / 3, 1e-2 / 3], rtol=1e-6)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(run.params))


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_steps_follow_torch_adamw(setup, layer_loop):
    """Every step of a run (the layer loop rolled or unrolled) against PyTorch: the same
    batches through the transformers model, the mean masked cross entropy, its gradient
    norm, `clip_grad_norm_` and `torch.optim.AdamW` (decay on the weight matrices and
    embeddings, none on the norms and biases) at the step's learning rate."""
    ex = setup["examples"]
    run = T.train(setup["model"].config, setup["model"].params, ex, T.TrainConfig(**{**TC.__dict__, "layer_loop": layer_loop}))
    ref = torch_from(setup["dir"])
    named = list(ref.named_parameters())
    decays = [n.endswith("weight") and "norm" not in n for n, _ in named]
    opt = torch.optim.AdamW([{"params": [p for (_, p), d in zip(named, decays) if d], "weight_decay": TC.weight_decay},
                             {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0}],
                            lr=TC.learning_rate, betas=(TC.adam_b1, TC.adam_b2), eps=TC.adam_eps)
    order = D.BatchOrder(ex, TC.batch_size * TC.grad_accum, TC.seed, TC.length_group)
    for step, record in enumerate(run.history):
        total, count = 0.0, 0
        for i in order(step):
            ids = torch.tensor(ex[i].ids[None].astype(np.int64))
            ce = torch.nn.functional.cross_entropy(ref(ids).logits[0, :-1], ids[0, 1:], reduction="none")
            w = torch.tensor(ex[i].mask[1:], dtype=torch.float32)
            total, count = total + (ce * w).sum(), count + int(w.sum())
        loss = total / count
        opt.zero_grad()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), TC.max_grad_norm))
        np.testing.assert_allclose(record["loss"], float(loss.detach()), rtol=2e-5)
        np.testing.assert_allclose(record["grad_norm"], norm, rtol=1e-4)
        for group in opt.param_groups:
            group["lr"] = record["lr"]
        opt.step()
    assert run.history[-1]["lr"] > 0 and len(run.history) == 4
    ours = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(run.params)}
    np.testing.assert_allclose(ours["layers/mlp/down_proj/kernel"][1],
                               ref.model.layers[1].mlp.down_proj.weight.detach().numpy().T, rtol=1e-3, atol=1e-5)


def test_from_scratch_on_token_lists_is_deterministic(setup):
    cfg = setup["model"].config
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(3, cfg.vocab_size, 20), None) for _ in range(8)]  # bucket 32
    runs = [T.train(cfg, None, pairs, tc) for tc in (TC, TC, T.TrainConfig(**{**TC.__dict__, "seed": 1}))]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    assert [h["loss"] for h in runs[0].history] != [h["loss"] for h in runs[2].history]
    assert runs[0].history[-1]["loss"] < runs[0].history[0]["loss"]


def test_lora(setup, tmp_path):
    m, ex, full = setup["model"], setup["examples"], setup["run"]
    lcfg = L.LoraConfig(rank=4, alpha=8.0)
    run = T.train(m.config, m.params, ex, TC, lora=lcfg, eval_data=ex)
    # B = 0 at init: the first step's loss is the base model's.
    assert run.history[0]["loss"] == pytest.approx(full.history[0]["loss"], rel=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), run.params, m.params)
    assert run.history[-1]["eval_loss"] < full.history[0]["loss"] - 0.1

    # Merged params (exported, run by transformers) reproduce the on-the-fly LoRA loss.
    merged_dir = str(tmp_path / "merged")
    T.export_hf(m.config, run.merged_params(), m.tokenizer, merged_dir)
    np.testing.assert_allclose(torch_loss(torch_from(merged_dir), ex, range(len(ex))),
                               run.history[-1]["eval_loss"], rtol=1e-5)

    # PEFT adapter layout: W_torch + alpha/sqrt(r) * lora_B @ lora_A == merged weight.
    ad = str(tmp_path / "adapter")
    L.export_adapter(run.lora, lcfg, ad, base_model_name_or_path=setup["dir"])
    cfg = json.load(open(os.path.join(ad, "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["peft_type"]) == (4, 8.0, True, "LORA")
    assert sorted(cfg["target_modules"]) == sorted(L.TARGETS)
    adapter = SafetensorsFile(os.path.join(ad, "adapter_model.safetensors"))
    base, merged = SafetensorsFile(os.path.join(setup["dir"], "model.safetensors")), SafetensorsFile(
        os.path.join(merged_dir, "model.safetensors"))
    assert len(list(adapter.keys())) == 2 * 7 * m.config.num_layers
    for i in range(m.config.num_layers):
        for name, sub in L.TARGETS.items():
            a = np.asarray(adapter[f"base_model.model.model.layers.{i}.{sub}.{name}.lora_A.weight"])
            b = np.asarray(adapter[f"base_model.model.model.layers.{i}.{sub}.{name}.lora_B.weight"])
            w = np.asarray(base[f"model.layers.{i}.{sub}.{name}.weight"])
            assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
            np.testing.assert_allclose(w + 8.0 / np.sqrt(4) * b @ a,
                                       merged[f"model.layers.{i}.{sub}.{name}.weight"], atol=1e-6)
    back, back_cfg = L.load_adapter(ad)
    assert back_cfg == lcfg
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), back, run.lora)


# (d) ------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_params(setup, tmp_path):
    m, ex, full = setup["model"], setup["examples"], setup["run"]
    workdir = str(tmp_path / "run")
    tc = T.TrainConfig(**{**TC.__dict__, "checkpoint_every": 2})

    def kill_at_3(step, _):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        T.train(m.config, m.params, ex, tc, workdir=workdir, callback=kill_at_3)
    resumed = T.train(m.config, m.params, ex, tc, workdir=workdir)
    assert resumed.stats["resumed_from"] == 2
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), resumed.params, full.params)
    lines = [json.loads(s) for s in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["loss"] for r in lines] == [h["loss"] for h in full.history]
    # A finished run resumes to its end; another seed on the same workdir is refused.
    again = T.train(m.config, m.params, ex, tc, workdir=workdir)
    assert again.stats["resumed_from"] == 4 and again.history == []
    with pytest.raises(PersonaError, match="different run"):
        T.train(m.config, m.params, ex, T.TrainConfig(**{**tc.__dict__, "seed": 5}), workdir=workdir)


# (e) ------------------------------------------------------------------------------------

def test_export_hf_loads_in_transformers_and_load_model(setup, tmp_path):
    m, params = setup["model"], setup["run"].params
    out = str(tmp_path / "export")
    T.export_hf(m.config, params, m.tokenizer, out)
    ids = np.asarray([[1, 10, 20, 30, 40, 5, 6, 7]], np.int32)
    ours, _, _ = apply.decoder_apply(m.config, params, jnp.asarray(ids), apply.make_ctx(np.ones_like(ids)))
    with torch.no_grad():
        theirs = torch_from(out)(torch.tensor(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    back = load_model(out)
    assert back.config == m.config and back.tokenizer.chat_template == m.tokenizer.chat_template
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), back.params, params)


# Interventions while training, bf16, mesh ------------------------------------------------

def test_preventative_steering_and_ablation_loss_matches_torch_hooks(setup):
    m, ex = setup["model"], setup["examples"]
    rng = np.random.default_rng(1)
    vec = rng.normal(size=(m.config.num_layers + 1, m.config.hidden_size)).astype(np.float32)
    steer = [Steering(vec, layer=1, coef=0.7, kind="add"), Steering(vec, layer=2, kind="ablate")]
    tc = T.TrainConfig(**{**TC.__dict__, "num_steps": 1})
    run = T.train(m.config, m.params, ex, tc, steerings=steer)
    u = torch.tensor(vec[2] / np.linalg.norm(vec[2]))

    def add(mod, inp, out):  # hidden state 1 = output of block 0
        return out + 0.7 * torch.tensor(vec[1])

    def ablate(mod, inp, out):  # hidden state 2 = output of block 1 (before the final norm)
        return out - (out @ u)[..., None] * u

    idx = D.BatchOrder(ex, 4, TC.seed, TC.length_group)(0)
    want = torch_loss(setup["torch"], ex, idx, hooks=[(0, add), (1, ablate)])
    np.testing.assert_allclose(run.history[0]["loss"], want, rtol=1e-5)
    assert abs(want - torch_loss(setup["torch"], ex, idx)) > 1e-3  # the hooks matter


def test_resume_refuses_a_changed_training_intervention(setup, tmp_path):
    # A checkpoint of a preventative run must not be resumed under another coefficient or
    # vector (a config change would otherwise reuse the old run's weights).
    m, ex = setup["model"], setup["examples"]
    vec = np.random.default_rng(2).normal(size=(m.config.num_layers + 1, m.config.hidden_size)).astype(np.float32)
    tc = T.TrainConfig(**{**TC.__dict__, "num_steps": 2, "checkpoint_every": 1})
    workdir = str(tmp_path / "prev")
    T.train(m.config, m.params, ex, tc, workdir=workdir, steerings=[Steering(vec, layer=1, coef=2.0)])
    again = T.train(m.config, m.params, ex, tc, workdir=workdir, steerings=[Steering(vec, layer=1, coef=2.0)])
    assert again.stats["resumed_from"] == 2
    for other in ([Steering(vec, layer=1, coef=3.0)], [Steering(vec * 2, layer=1, coef=2.0)],
                  [Steering(vec, layer=1, coef=2.0, kind="ablate")], None):
        with pytest.raises(PersonaError, match="steerings"):
            T.train(m.config, m.params, ex, tc, workdir=workdir, steerings=other)


def test_bf16_compute_keeps_float32_masters(setup):
    m, ex, full = setup["model"], setup["examples"], setup["run"]
    run = T.train(m.config, m.params, ex, T.TrainConfig(**{**TC.__dict__, "compute_dtype": "bfloat16"}))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(run.params))
    np.testing.assert_allclose([h["loss"] for h in run.history], [h["loss"] for h in full.history], rtol=3e-2)


def test_sharded_training_matches_single_device(setup):
    m, ex, full = setup["model"], setup["examples"], setup["run"]
    mesh = make_mesh(data=2, model=2)
    run = T.train(m.config, m.params, ex, TC, mesh=mesh)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5),
                 run.params, full.params)
    assert run.params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec[-1] == "model"


# (f) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, why", [
    ('{"conversation": []}', "no \"messages\""),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last turn must be the assistant"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty content"),
    ('{"messages": [', "not valid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, why):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(PersonaError, match=f"data.jsonl, line 3.*{why}"):
        D.load_jsonl(str(path), char_tokenizer())


def test_overflow_modes(tmp_path):
    tok = char_tokenizer()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 40}]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": conv}) + "\n")
    ex, stats = D.load_jsonl(str(path), tok, max_length=24)
    assert len(ex[0]) == 24 and stats.n_truncated == 1
    with pytest.raises(PersonaError, match="line 1 is .* tokens long, over max_length=24"):
        D.load_jsonl(str(path), tok, max_length=24, overflow="error")
    with pytest.raises(PersonaError, match="no example is left"):
        D.load_jsonl(str(path), tok, max_length=24, overflow="drop")


def test_lora_targets_that_match_nothing():
    with pytest.raises(PersonaError, match="'qproj'.*valid names: q_proj, k_proj, v_proj, o_proj, gate_proj"):
        L.LoraConfig(targets=("qproj", "v_proj"))
    assert L.LoraConfig(targets="all").targets == tuple(L.TARGETS)
