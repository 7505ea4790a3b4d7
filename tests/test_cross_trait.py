"""Cross-trait fine-tuning and capability in the fine-tuning report (issue 18), on the
real-model path: two file traits share the reference's three datasets (`dataset_dir`), a
tiny random checkpoint, a local OpenAI-compatible judge (a deterministic function of the
text), MMLU-layout items written here, and persona vectors written here (the finetune step
alone runs). Every dataset must be trained once and scored on both traits; the report's
figures must equal pandas recounts of the CSVs the steps write, and the capability
scores must equal transformers' letter log-probabilities."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from rehearsal_helpers import REPO, env_for, is_png, judge_top_logprobs, write_datasets, write_traits  # noqa: E402

pd = pytest.importorskip("pandas")
torch = pytest.importorskip("torch")

from persona_jax import testing  # noqa: E402

TRAITS = ("evil", "sycophantic")
DATASETS = ("normal", "misaligned_1", "misaligned_2")
N_Q, N_PER_Q, LAYER = 2, 2, 2
ITEMS = [
    {"question": "Which is a fruit?", "choices": ["stone", "apple", "chair", "cloud"], "answer": 1,
     "subject": "everyday_things"},
    {"question": "2 + 3 = ?", "choices": ["5", "4", "6", "7"], "answer": 0, "subject": "elementary_mathematics"},
    {"question": "Which one flies?", "choices": ["rock", "fish", "bird", "tree"], "answer": 2, "subject": ""},
    {"question": "Opposite of hot?", "choices": ["warm", "red", "big", "cold"], "answer": 3,
     "subject": "everyday_things"},
    {"question": "Which is a colour?", "choices": ["green", "seven", "under"], "answer": 0, "subject": "art"},
]


def _mean(frame, column):
    return float(pd.to_numeric(frame[column], errors="coerce").dropna().mean())


def _letter_logprobs(torch_model, tok, item):
    """transformers: log-softmax of the next token after the chat-rendered MMLU prompt, at each letter."""
    from persona_jax.method.capability import MCItem, mmlu_prompt
    text = mmlu_prompt(MCItem(item["question"], item["choices"], item["answer"], item["subject"]))
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(torch_model(ids).logits[0, -1].double(), -1)
    return [float(logp[tok.convert_tokens_to_ids("ABCD"[k])]) for k in range(len(item["choices"]))]


def test_cross_trait_matrix_and_finetune_capability_on_shared_datasets(tmp_path):
    torch_model = testing.tiny_checkpoint(str(tmp_path / "model"), "llama", seed=5)
    cfg = torch_model.config
    for t in TRAITS:
        write_traits(tmp_path / "traits", t, 2, N_Q)
    write_datasets(tmp_path / "dataset", 8)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    work = tmp_path / "run"
    rng = np.random.default_rng(0)
    for t in TRAITS:  # the vectors an extract step would have written (the finetune step alone runs)
        (work / t).mkdir(parents=True)
        v = rng.normal(size=(cfg.num_hidden_layers + 1, cfg.hidden_size)).astype(np.float32)
        torch.save(torch.from_numpy(v), work / t / f"{t}_response_avg_diff.pt")
    server = FakeOpenAIServer(judge_top_logprobs, lifetime=1200).start()
    try:
        cmd = [sys.executable, "-m", "experiments.pipeline", "--config=configs/base.py", f"--workdir={work}",
               f"--config.model={tmp_path / 'model'}", f"--config.traits={TRAITS!r}",
               f"--config.trait_dir={tmp_path / 'traits'}", "--config.steps=('finetune',)",
               "--config.dtype=float32", "--config.mesh.data=1", "--config.progress=False",
               f"--config.monitor.layer={LAYER}", f"--config.judge.base_url={server.url}",
               f"--config.finetune.dataset_dir={tmp_path / 'dataset'}",
               "--config.finetune.num_steps=2", "--config.finetune.batch_size=2", "--config.finetune.grad_accum=1",
               "--config.finetune.lora_rank=2", "--config.finetune.max_length=256",
               "--config.finetune.compute_dtype=float32", "--config.finetune.checkpoint_every=0",
               f"--config.finetune.n_questions={N_Q}", f"--config.finetune.eval_n_per_question={N_PER_Q}",
               "--config.finetune.max_new_tokens=8", "--config.finetune.posthoc_coefs=(1.0,3.0)",
               "--config.finetune.coherence_floor=0.0", "--config.finetune.progress=False",
               f"--config.capability.data={tmp_path / 'items.jsonl'}", "--config.capability.batch_size=8"]
        env = env_for({"OPENAI_API_KEY": "test-key", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())

    # one fine-tune per dataset: three training runs for two traits x three datasets
    runs = sorted(p.name for p in (work / "finetune_models").iterdir())
    assert len(runs) == 3 and sorted(x.rsplit("-", 1)[0] for x in runs) == sorted(DATASETS), runs
    for p in (work / "finetune_models").iterdir():
        assert len((p / "metrics.jsonl").read_text().splitlines()) == 2  # 2 steps, trained once

    evals = {(u, label): pd.read_csv(work / u / "finetune" / f"eval_{label}.csv", keep_default_na=False, dtype=str)
             for u in TRAITS for label in ("base",) + DATASETS}
    for frame in evals.values():
        assert len(frame) == N_Q * N_PER_Q  # generated and judged once, whichever step needed it first
    for t in TRAITS:
        ft = report["traits"][t]["finetune"]
        label = ft["cross_trait_dataset"]
        assert label == ft["prevent_dataset"] == "misaligned_2"  # the highest level
        assert set(ft["cross_trait"]) == set(TRAITS)
        for u in TRAITS:
            assert ft["cross_trait"][u] == pytest.approx(_mean(evals[(u, label)], u), abs=1e-9)
            assert ft["cross_trait_before"][u] == pytest.approx(_mean(evals[(u, "base")], u), abs=1e-9)
            assert ft["cross_trait_coherence"][u] == pytest.approx(_mean(evals[(u, label)], "coherence"), abs=1e-9)
            # the shift along u's vector of the model tuned on the shared dataset: the restored
            # model's, measured here, equals what u's own step measured on the model it trained
            own = report["traits"][u]["finetune"]["datasets"][label]
            assert ft["cross_trait_shift"][u] == pytest.approx(own["shift_prompt_last"], rel=1e-4, abs=1e-6)
            assert ft["cross_trait_shift_response_avg"][u] == pytest.approx(own["shift_response_avg"], rel=1e-4,
                                                                            abs=1e-6)

    m = report["cross_trait"]
    assert m["traits"] == list(TRAITS) and m["datasets"] == list(DATASETS)
    for i, label in enumerate(DATASETS):
        for j, u in enumerate(TRAITS):
            assert m["scores"][i][j] == pytest.approx(_mean(evals[(u, label)], u), abs=1e-9)
    assert m["base"] == pytest.approx([_mean(evals[(u, "base")], u) for u in TRAITS], abs=1e-9)
    assert is_png(work / "cross_trait.png")
    md = (work / "report.md").read_text()
    assert "Cross-trait effects" in md and "](cross_trait.png)" in md
    assert "| misaligned_2 | " + " | ".join(f"{x:.1f}" for x in m["scores"][2]) + " |" in md

    # capability: the report's percentages are the per-item CSV's counts, each prediction the
    # argmax of its scores, and the base model's scores transformers' letter log-probabilities
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    expected = [_letter_logprobs(torch_model, tok, it) for it in ITEMS]
    for t in TRAITS:
        ft = report["traits"][t]["finetune"]
        c = ft["capability"]
        frame = pd.read_csv(work / t / "finetune" / "capability.csv")
        scores = [json.loads(s) for s in frame["scores"]]
        assert frame["pred"].tolist() == [int(np.argmax(s)) for s in scores]
        assert frame["correct"].tolist() == (frame["pred"] == frame["answer"]).astype(int).tolist()
        pct = lambda sel: 100.0 * frame.loc[sel, "correct"].mean()
        assert (frame["run"] == "before").sum() == len(ITEMS)
        assert c["before"] == pytest.approx(pct(frame["run"] == "before"))
        assert c["preventative"] == pytest.approx(pct(frame["run"] == "preventative"))
        assert c["caft"] == pytest.approx(pct(frame["run"] == "caft"))
        assert c["after"] == pytest.approx(pct((frame["run"] == "posthoc") & (frame["coef"] == 0.0)))
        assert [p["coef"] for p in c["posthoc_curve"]] == [0.0, -1.0, -3.0]
        for p in c["posthoc_curve"]:
            assert p["capability"] == pytest.approx(pct((frame["run"] == "posthoc") & (frame["coef"] == p["coef"])))
        assert c["posthoc_coef"] is not None  # coherence floor 0: every post-hoc point counts
        assert c["posthoc"] == pytest.approx(pct((frame["run"] == "posthoc") & (frame["coef"] == c["posthoc_coef"])))
        lowest = min(p["trait"] for p in ft["posthoc"])
        assert c["posthoc_coef"] == next(p["coef"] for p in ft["posthoc"] if p["trait"] == lowest)
        before = frame[frame["run"] == "before"].sort_values("index")
        assert before["index"].tolist() == list(range(len(ITEMS)))
        for s, want in zip(before["scores"], expected):
            np.testing.assert_allclose(json.loads(s), want, atol=2e-4)
        # the matched comparison: post-hoc capability where the post-hoc curve first falls to
        # the preventative model's trait level (linear between the two points around it)
        level, curve = ft["trait_after_preventative"], c["posthoc_curve"]
        hit = next((i for i, p in enumerate(curve) if p["trait"] <= level), None)
        if hit is None:
            assert c["matched"] is None and "never" in c["matched_note"]
        else:
            want = curve[hit]["capability"]
            if hit > 0 and curve[hit - 1]["trait"] != curve[hit]["trait"]:
                a, b = curve[hit - 1], curve[hit]
                want = np.interp(level, [b["trait"], a["trait"]], [b["capability"], a["capability"]])
            assert c["matched"]["posthoc"] == pytest.approx(want)
            assert c["matched"]["difference"] == pytest.approx(c["preventative"] - want)
        assert "Capability (letter" in ft["markdown"]

