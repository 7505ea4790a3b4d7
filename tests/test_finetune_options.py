"""The reference training.py's options (issue 15 point 3): schedules against transformers'
`get_scheduler`, several training files, the held-out 10%, epochs, steering at a list of
layers, and `python -m experiments.finetune --config=configs/finetune.py` as the README
runs it (it died with AttributeError 'scan_decode' before)."""
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from persona_jax.errors import PersonaError
from persona_jax.finetune import options
from persona_jax.pipeline import setup
from persona_jax.finetune.trainer import SCHEDULES, TrainConfig, lr_schedule
from persona_jax.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedules_match_transformers(kind):
    from transformers import get_scheduler

    lr, warmup, n = 3e-4, 4, 23
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=n)
    want = []
    for _ in range(n):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [float(lr_schedule(lr, warmup, n, xp=np, kind=kind)(s)) for s in range(n)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_options_from_a_config_section():
    f = types.SimpleNamespace(learning_rate=2e-5, warmup_steps=3, batch_size=4, grad_accum=2, num_steps=0,
                              epochs=3, schedule="cosine", weight_decay=0.01, compute_dtype="float32",
                              method="lora", lora_rank=8, lora_alpha=16.0, rslora=True, lora_targets=("q_proj",),
                              lora_dropout=0.0)
    tc = setup.train_config(f, seed=5)
    assert (tc.num_steps, tc.epochs, tc.schedule, tc.weight_decay, tc.seed) == (None, 3, "cosine", 0.01, 5)
    assert setup.lora_config(f).targets == ("q_proj",)
    f.lora_dropout = 0.05
    assert setup.train_config(f, seed=0).lora_dropout == 0.05
    with pytest.raises(PersonaError, match="lora_dropout"):
        TrainConfig(lora_dropout=1.0).validate()
    with pytest.raises(PersonaError, match="schedule"):
        TrainConfig(schedule="warm").validate()
    assert options.training_files(" a.jsonl, b.jsonl ,") == ["a.jsonl", "b.jsonl"]
    assert options.training_files(("a.jsonl",)) == ["a.jsonl"]
    with pytest.raises(PersonaError, match="no training file"):
        options.training_files("")


def test_held_out_split():
    items = list(range(23))
    train, held = options.split_eval(items, 0.1, seed=0)
    assert len(held) == math.ceil(0.1 * 23) == 3 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)
    assert options.split_eval(items, 0.1, seed=0) == (train, held)
    assert options.split_eval(items, 0.1, seed=1) != (train, held)
    with pytest.raises(PersonaError, match="leaves none"):
        options.split_eval([1], 0.5, seed=0)


def _write_jsonl(path, n, tag):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{tag} q{i}"},
                                             {"role": "assistant", "content": f"{tag} answer {i} " + "x" * i}]}) + "\n")


def test_finetune_runner_with_the_readme_config(tmp_path):
    d = tmp_path / "model"
    tiny_checkpoint(str(d), "llama", num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    _write_jsonl(tmp_path / "a.jsonl", 7, "a")
    _write_jsonl(tmp_path / "b.jsonl", 4, "b")
    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32))
    wd = tmp_path / "ft"
    cmd = [sys.executable, "-m", "experiments.finetune", "--config=configs/finetune.py", f"--workdir={wd}",
           f"--config.model={d}", f"--config.data={tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}",
           "--config.dtype=float32", "--config.mesh.data=1", "--config.finetune.batch_size=2",
           "--config.finetune.grad_accum=1", "--config.finetune.epochs=2", "--config.finetune.schedule=cosine",
           "--config.finetune.warmup_steps=2", "--config.finetune.learning_rate=1e-3",
           "--config.finetune.compute_dtype=float32", "--config.finetune.lora_rank=2",
           "--config.finetune.max_length=64", "--config.finetune.progress=False",
           f"--config.steer.vector={tmp_path / 'v.npy'}", "--config.steer.layers=(1,3)", "--config.steer.coef=2.0",
           "--config.export=both", "--config.finetune.lora_dropout=0.05"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((wd / "report.json").read_text())
    n = 11
    n_eval = math.ceil(0.1 * n)
    assert report["data"]["n_train"] == n - n_eval and report["data"]["n_eval"] == report["data"]["held_out"] == n_eval
    assert report["data"]["n_examples"] == n and len(report["data"]["files"]) == 2
    steps = 2 * math.ceil((n - n_eval) / 2)
    assert report["steps"] == steps and "eval_loss" in report["final"]
    assert report["config"]["finetune"]["weight_decay"] == 0.01  # the reference's default
    from transformers import get_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=steps)
    want = []
    for _ in range(steps):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [json.loads(line)["lr"] for line in open(wd / "metrics.jsonl")]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (wd / "adapter" / "adapter_config.json").exists() and (wd / "merged" / "config.json").exists()
    from persona_jax.finetune.trainer import _Checkpoints
    meta = _Checkpoints(str(wd), TrainConfig()).meta(steps)
    assert meta["steerings"][0]["layer"] == [1, 3]


def test_lora_dropout_loss_matches_torch_with_the_same_masks(tmp_path):
    """LoRA dropout (PEFT: y = W x + s * B A dropout(x)) in one loss evaluation against a
    torch forward with hooks on q_proj, using the keep masks drawn from the trainer's keys;
    at a vanishing rate the branch form equals the merged form the trainer uses otherwise."""
    import jax
    import jax.numpy as jnp

    import persona_jax as pj
    from persona_jax.finetune import lora as flora
    from persona_jax.finetune.trainer import _loss_sum, _Spec

    d = tmp_path / "m"
    tm = tiny_checkpoint(str(d), "llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    model = pj.load_model(str(d))
    cfg = flora.LoraConfig(rank=4, alpha=8.0, rslora=True, targets=("q_proj",))
    rng = np.random.default_rng(0)
    ad = {"self_attn": {"q_proj": {"A": jnp.asarray(5 * rng.standard_normal((2, 32, 4)), jnp.float32),
                                   "B": jnp.asarray(5 * rng.standard_normal((2, 4, 32)), jnp.float32)}}}
    tokens = np.array([[7, 12, 30, 44, 9, 60, 71, 2]])
    mb = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones_like(jnp.asarray(tokens)),
          "loss_mask": jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]])}
    key = jax.random.PRNGKey(3)

    def spec(rate):
        return _Spec(model.config, cfg, 1e-3, 0, 1, 0.0, 0.9, 0.999, 1e-8, 1.0, "float32", False, "linear", rate)

    rate = 0.5
    got, n = _loss_sum(spec(rate), ad, model.params, mb, None, key)
    layer_keys = jax.random.split(jax.random.fold_in(key, 0), 2)
    masks = [np.asarray(jax.random.bernoulli(layer_keys[l], 1 - rate, (1, 8, 32))) for l in range(2)]
    handles = []
    for l, layer in enumerate(tm.model.layers):
        a, b = torch.tensor(np.asarray(ad["self_attn"]["q_proj"]["A"][l])), torch.tensor(np.asarray(ad["self_attn"]["q_proj"]["B"][l]))
        m = torch.tensor(masks[l], dtype=torch.float32)

        def hook(mod, inp, out, a=a, b=b, m=m):
            return out + cfg.scale * ((inp[0] * m / (1 - rate)) @ a) @ b
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = tm(torch.tensor(tokens)).logits[0, :-1]
    finally:
        for h in handles:
            h.remove()
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[0, 1:]), reduction="none")
    want = float((ce * torch.tensor([0, 0, 1, 1, 1, 1, 1], dtype=torch.float32)).sum())
    assert int(n) == 5 and float(got) == pytest.approx(want, rel=1e-5)
    assert 0.3 < np.mean(masks) < 0.7  # the masks really drop
    # a vanishing rate: the branch equals the merged adapter
    tiny_rate, _ = _loss_sum(spec(1e-9), ad, model.params, mb, None, key)
    merged, _ = _loss_sum(spec(0.0), ad, model.params, mb, None, None)
    assert float(tiny_rate) == pytest.approx(float(merged), rel=1e-5)
    assert abs(float(got) - float(merged)) > 1e-3  # dropout changes the loss far beyond float noise (~1e-5)
