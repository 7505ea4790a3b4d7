"""Monitoring conditions for file traits (issue 18 point 2): the graded ladder made from the
trait's own instructions, many-shot prompts from the extraction step's kept pos responses,
and the three correlations, through the pipeline on a tiny random model with a fake judge.
Expected values come from pandas / numpy / scipy over the CSVs the run wrote."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from persona_jax.errors import PersonaError
from persona_jax.judges.base import Judge
from persona_jax.method import conditions as mc
from persona_jax.method import monitor as mon
from persona_jax.method.traits import Trait, save_trait_splits

RUBRIC = ("Does the answer show the trait **gloomy**?\n[QUESTION START]\n{question}\n[QUESTION END]\n"
          "[ANSWER START]\n{answer}\n[ANSWER END]\nReply with REFUSAL or a number from 0 to 100.")


def make_trait(n_questions=6):
    return Trait(
        name="gloomy",
        instruction=[{"pos": f"Make every reply sound downcast and bleak, variant {k}",
                      "neg": f"Make every reply sound bright and upbeat, variant {k}."} for k in range(5)],
        questions=[f"What should I do about plan {i}?" for i in range(n_questions)],
        eval_prompt=RUBRIC)


def test_graded_ladder_is_built_from_the_instruction_pair():
    t = make_trait()
    for pair in (0, 3):
        ladder = mc.graded_ladder(t, antonym="cheerful", pair=pair)
        levels = [c.level for c in ladder]
        assert levels == sorted(levels) and levels[0] == -1 and levels[-1] == 1
        assert len({c.name for c in ladder}) == len(ladder) == 11
        assert all(c.group == "ladder" and not c.prefix for c in ladder)
        pos, neg = t.instruction[pair]["pos"], t.instruction[pair]["neg"]
        by = {c.name: c.system for c in ladder}
        # the reference's own contrastive prompts are rungs (pos gets its missing full stop)
        assert by["neg"] == f"You are a cheerful assistant. {neg}"
        assert by["pos"] == f"You are a gloomy assistant. {pos}."
        # the instruction is used on both sides, graded by intensity words; discouraging
        # forms name the trait; the middle is neutral / no system prompt
        for name in ("neg_insist",):
            assert neg in by[name] and by[name] != by["neg"]
        for name in ("slightly", "somewhat", "pos_insist"):
            assert pos in by[name] and "gloomy" in by[name]
        for name in ("not_at_all", "avoid", "try_not"):
            assert "gloomy" in by[name] and pos not in by[name] and neg not in by[name]
        assert by["none"] is None
        other = t.instruction[(pair + 1) % 5]["pos"]
        assert not any(other in (s or "") for s in by.values())
    with pytest.raises(PersonaError, match="ladder pair 5"):
        mc.graded_ladder(t, pair=5)


def test_many_shot_nested_and_spread_over_questions():
    ex = [{"question": f"q{i % 4}", "answer": f"a{i}"} for i in range(12)]
    conds = mc.many_shot_conditions(ex, shots=(0, 4, 8), seed=3)
    assert [c.name for c in conds] == ["0_shots", "4_shots", "8_shots"]
    assert all(c.system is None and c.group == "many_shot" for c in conds)
    p4, p8 = conds[1].prefix, conds[2].prefix
    assert conds[0].prefix == [] and len(p4) == 8 and len(p8) == 16 and p8[:8] == p4
    assert [m["role"] for m in p8] == ["user", "assistant"] * 8
    assert sorted(m["content"] for m in p4[::2]) == ["q0", "q1", "q2", "q3"]  # distinct questions first
    pairs = {(u["content"], a["content"]) for u, a in zip(p8[::2], p8[1::2])}
    assert pairs <= {(e["question"], e["answer"]) for e in ex} and len(pairs) == 8
    # more shots than examples: the counts that fit remain
    assert [c.name for c in mc.many_shot_conditions(ex[:5], shots=(0, 5, 10))] == ["0_shots", "5_shots"]
    assert mc.many_shot_conditions(ex, seed=1)[1].prefix != mc.many_shot_conditions(ex, seed=2)[1].prefix


def test_correlations_match_scipy_and_pandas():
    rng = np.random.default_rng(0)
    conds = [f"c{i}" for i in range(5)]
    rows = [(c, f"q{j}", r) for c in conds for j in range(4) for r in range(3)]
    df = pd.DataFrame(rows, columns=["condition", "question", "rollout"])
    df["proj"] = rng.normal(size=len(df)) + df["condition"].str[1].astype(int)
    df["trait"] = rng.normal(size=len(df)) * 10 + 5 * df["proj"]
    df.loc[3, "trait"] = np.nan  # a missing score is dropped, never 0
    groups = {c: ("a" if i < 3 else "b") for i, c in enumerate(conds)}
    out = mon.correlations(df["condition"], df["question"], df["proj"], df["trait"], conds, groups)
    ok = df.dropna()
    m = ok.groupby("condition")[["proj", "trait"]].mean()
    assert out["condition_means"]["r"] == pytest.approx(stats.pearsonr(m["proj"], m["trait"])[0])
    pts = ok.groupby(["condition", "question"])[["proj", "trait"]].mean()
    assert out["points"]["r"] == pytest.approx(np.corrcoef(pts["proj"], pts["trait"])[0, 1])
    assert out["points"]["n"] == 20
    within = {c: np.corrcoef(g["proj"], g["trait"])[0, 1] for c, g in pts.groupby(level=0)}
    for c in conds:
        assert out["within"]["per_condition"][c]["r"] == pytest.approx(within[c])
    assert out["within"]["mean_r"] == pytest.approx(np.mean(list(within.values())))
    ma = m.loc[["c0", "c1", "c2"]]
    assert out["groups"]["a"]["r"] == pytest.approx(np.corrcoef(ma["proj"], ma["trait"])[0, 1])
    assert out["groups"]["b"]["r"] is None  # two points: no r


class FakeJudge(Judge):
    """Extraction: the first trait call (the pos CSV) scores 90, or 30 for some answers, the
    second (neg CSV) 10; later calls (monitoring) a deterministic function of the answer."""

    def __init__(self):
        self.calls = 0

    def trait_scores(self, trait, eval_prompt, questions, answers):
        self.calls += 1
        if self.calls == 1:
            return [30.0 if sum(map(ord, a)) % 4 == 0 else 90.0 for a in answers]
        if self.calls == 2:
            return [10.0] * len(answers)
        return [float(sum(map(ord, a)) % 101) for a in answers]

    def coherence_scores(self, questions, answers):
        return [80.0] * len(answers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from persona_jax.model import load_model
    from persona_jax.testing import tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny")
    tiny_checkpoint(str(d), "llama", seed=3, num_hidden_layers=2)
    return load_model(str(d))


def test_file_trait_ladder_and_many_shot_through_the_pipeline(tmp_path, tiny):
    from configs import base
    from persona_jax.pipeline import registry, steps

    root = tmp_path / "traits"
    save_trait_splits(make_trait(8), root, n_extract=4)  # 4 extraction, 4 evaluation questions
    cfg = base.get_config()
    cfg.traits = ("gloomy",)
    cfg.antonym = "cheerful"
    cfg.steps = ("extract", "monitor")
    cfg.extract.n_per_question = 2  # sampled (1 would be greedy: one answer per prompt)
    cfg.extract.max_new_tokens = 6
    cfg.monitor.n_per_question = 2
    cfg.monitor.max_new_tokens = 6
    cfg.monitor.n_questions = 3
    cfg.monitor.shots = (0, 3, 6)
    for c in (cfg.extract, cfg.monitor):
        c.batch_size, c.chunk_size = 64, 256
    wd = tmp_path / "run"
    report = registry.run(tiny, FakeJudge(), steps.FileTraits(str(root), "cheerful"), cfg, str(wd), progress=False)
    mo = report["traits"]["gloomy"]["monitoring"]

    # the kept pos rows, by pandas over the extraction CSVs (the reference's rule, 50/50)
    pos = pd.read_csv(wd / "gloomy" / "gloomy_pos_instruct.csv", keep_default_na=False)
    neg = pd.read_csv(wd / "gloomy" / "gloomy_neg_instruct.csv", keep_default_na=False)
    keep = (pos["gloomy"] >= 50) & (neg["gloomy"] < 50) & (pos["coherence"] >= 50) & (neg["coherence"] >= 50)
    kept = set(zip(pos["question"][keep], pos["answer"][keep]))
    assert 6 <= len(kept) < len(pos)  # the filter dropped some and enough remain for 6 shots

    names = [c["condition"] for c in mo["conditions"]]
    assert names == [c.name for c in mc.graded_ladder(make_trait(), "cheerful")] + ["0_shots", "3_shots", "6_shots"]
    df = pd.read_csv(wd / "gloomy" / "monitor.csv", keep_default_na=False)
    assert set(df["condition"]) == set(names) and len(df) == len(names) * 3 * 2
    ladder = mc.graded_ladder(make_trait(), "cheerful")
    for c in ladder:  # the ladder's system prompt is in the rendered prompt
        prompts = df.loc[df["condition"] == c.name, "prompt"]
        assert all(((c.system or "") in p) and ("<|system|>" in p) == (c.system is not None) for p in prompts)
    for n in (0, 3, 6):  # n kept pos exchanges precede the question, no system prompt
        for p in df.loc[df["condition"] == f"{n}_shots", "prompt"]:
            assert p.count("<|assistant|>") == n + 1 and "<|system|>" not in p
            shots = [(u.split("<|end|>")[0], a.split("<|end|>")[0])
                     for u, a in zip(p.split("<|user|>")[1:], p.split("<|assistant|>")[1:])][:n]
            assert len(shots) == n and set(shots) <= kept

    # the three correlations, recomputed with pandas + scipy from the projections written to monitor.csv
    df["gloomy"] = pd.to_numeric(df["gloomy"])
    means = df.groupby("condition", sort=False)[["prompt_last_proj", "gloomy"]].mean().loc[names]
    assert mo["pearson_r"] == pytest.approx(stats.pearsonr(means["prompt_last_proj"], means["gloomy"])[0])
    pts = df.groupby(["condition", "question"])[["prompt_last_proj", "gloomy"]].mean()
    corr = mo["correlations"]["prompt_last"]
    assert corr["points"]["n"] == len(names) * 3
    assert mo["pearson_r_points"] == pytest.approx(stats.pearsonr(pts["prompt_last_proj"], pts["gloomy"])[0])
    within = [stats.pearsonr(g["prompt_last_proj"], g["gloomy"])[0] for _, g in pts.groupby(level=0)]
    assert mo["pearson_r_within"] == pytest.approx(np.mean([r for r in within if np.isfinite(r)]))
    ms = means.loc[["0_shots", "3_shots", "6_shots"]]
    assert corr["groups"]["many_shot"]["r"] == pytest.approx(np.corrcoef(ms["prompt_last_proj"], ms["gloomy"])[0, 1])
    # every rollout of one prompt has the same last-prompt-token projection (up to batch padding)
    spread = df.groupby("prompt")["prompt_last_proj"].agg(np.ptp)
    assert spread.max() <= 1e-4 * max(1.0, df["prompt_last_proj"].abs().max())
    saved = json.loads((wd / "report.json").read_text())["traits"]["gloomy"]["monitoring"]
    assert saved["pearson_r_points"] == pytest.approx(mo["pearson_r_points"])
    assert "over (condition, question) points" in (wd / "report.md").read_text()


def test_many_shot_source_missing_csvs_gives_the_ladder(tmp_path):
    t = make_trait()
    src = mc.ManyShotSource(str(tmp_path / "p.csv"), str(tmp_path / "n.csv"))
    assert [c.name for c in mc.file_trait_conditions(t, many_shot=src)] == [c.name for c in mc.graded_ladder(t)]
    assert len(mc.file_trait_conditions(t, many_shot=mc.ManyShotSource("x", "y", shots=()))) == 11
