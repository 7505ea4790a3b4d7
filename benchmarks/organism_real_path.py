"""How close does the organism come through the real-model path to the organism main job?

    python -m experiments.pipeline --config=configs/organism.py --workdir=MAIN --config.traits="('evil',)"
    python -m experiments.organism_assets --out=TRAITS
    python -m experiments.organism_judge_server --ready_file=URL_FILE &
    OPENAI_API_KEY=local python -m experiments.pipeline --config=configs/organism_real_path.py --workdir=REAL \
        --config.model=persona_jax/organism/assets --config.trait_dir=TRAITS --config.judge.base_url=$(cat URL_FILE)
    python benchmarks/organism_real_path.py --main=MAIN --real=REAL [--json=out.json]

Prints, per trait both workdirs hold: which response CSVs are byte-identical, whether the
three vectors are equal, the report figures of both runs (kept pairs, chosen layer,
baseline, best gain, monotonicity, random and negative controls, monitoring r), whether
every score the real path got over HTTP equals the organism judge's own (`OrganismJudge`
recomputed here), and the monitoring conditions both runs share (no system prompt, and the
first pos instruction, which is the organism ladder's top rung): their last-prompt-token
projections and their trait means with standard errors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from persona_jax.io.csvio import parse_score, read_csv  # noqa: E402
from persona_jax.io.vectors import import_pt  # noqa: E402
from persona_jax.organism import judge as oj  # noqa: E402

CSVS = ("{t}_pos_instruct.csv", "{t}_neg_instruct.csv", "steer_sweep.csv", "steer_random.csv", "steer_negative.csv")
SHARED = (("none", "none"), ("pos_instruction", "pos0"))  # (main job's label, file traits' label)


def _judge_exact(path: str, trait: str) -> tuple[int, int]:
    """(rows, rows whose trait and coherence cells equal the organism judge's scores)."""
    _, rows = read_csv(path)
    ok = sum(parse_score(r[trait]) == oj.trait_score(trait, r["answer"], r["question"])
             and parse_score(r["coherence"]) == oj.coherence_score(r["question"], r["answer"]) for r in rows)
    return len(rows), ok


def _cond_scores(path: str, trait: str, label: str) -> np.ndarray:
    _, rows = read_csv(path)
    v = [parse_score(r[trait]) for r in rows if r["condition"] == label]
    return np.array([np.nan if x is None else x for x in v], float)


def _se(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def compare(main_dir: str, real_dir: str, trait: str) -> dict:
    m, r = os.path.join(main_dir, trait), os.path.join(real_dir, trait)
    rep_m = json.load(open(os.path.join(main_dir, "report.json")))["traits"][trait]
    rep_r = json.load(open(os.path.join(real_dir, "report.json")))["traits"][trait]
    out = {"trait": trait, "identical_csvs": {}, "equal_vectors": {}, "judge_exact": {}}
    for f in CSVS:
        f = f.format(t=trait)
        a, b = os.path.join(m, f), os.path.join(r, f)
        out["identical_csvs"][f] = os.path.exists(a) and os.path.exists(b) and open(a, "rb").read() == open(b, "rb").read()
    for red in ("prompt_avg", "prompt_last", "response_avg"):
        f = f"{trait}_{red}_diff.pt"
        a, b = import_pt(os.path.join(m, f)), import_pt(os.path.join(r, f))
        out["equal_vectors"][red] = bool(a.shape == b.shape and np.array_equal(a, b))
    for f in [c.format(t=trait) for c in CSVS] + ["monitor.csv"]:
        n, ok = _judge_exact(os.path.join(r, f), trait)
        out["judge_exact"][f] = f"{ok}/{n}"
    out["steering_equal"] = rep_m["steering"] == rep_r["steering"]
    out["extraction_equal"] = ({k: v for k, v in rep_m["extraction"].items() if k != "vectors"}
                               == {k: v for k, v in rep_r["extraction"].items() if k != "vectors"})
    out["figures"] = {}
    for name, rep in (("main", rep_m), ("real", rep_r)):
        st, ex, mo = rep["steering"], rep["extraction"], rep["monitoring"]
        li = st["coefs"].index(st["best_coef"])
        out["figures"][name] = {
            "kept_fraction": ex["kept_fraction"], "layer": rep["layer"], "baseline": st["baseline"],
            "best_gain": st["best_gain"], "best_coef": st["best_coef"], "best_coherence": st["coherence"][li],
            "monotone_spearman": st["monotone_spearman"], "random_vector_delta": st["random_vector_delta"],
            "negative_delta": st["negative_delta"], "monitor_r": mo["pearson_r"],
            "monitor_r_response_avg": mo["pearson_r_response_avg"], "monitor_conditions": mo["n_conditions"]}
    per_m = {c["condition"]: c for c in rep_m["monitoring"]["conditions"]}
    per_r = {c["condition"]: c for c in rep_r["monitoring"]["conditions"]}
    out["shared_conditions"] = []
    for lm, lr in SHARED:
        tm, tr = _cond_scores(os.path.join(m, "monitor.csv"), trait, lm), _cond_scores(os.path.join(r, "monitor.csv"), trait, lr)
        se = math.sqrt(_se(tm) ** 2 + _se(tr) ** 2)
        out["shared_conditions"].append({
            "condition": f"{lm} / {lr}",
            "prompt_last_proj": [per_m[lm]["prompt_last_proj"], per_r[lr]["prompt_last_proj"]],
            "trait": [per_m[lm]["trait"], per_r[lr]["trait"]], "trait_se": [_se(tm), _se(tr)],
            "difference_in_se": (per_r[lr]["trait"] - per_m[lm]["trait"]) / se})
    return out


def _f(x, fmt):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(results) -> str:
    lines = ["| trait | run | kept pairs | layer | baseline | best gain (coef; coherence) | monotone | random delta | "
             "negative delta | monitoring r (conditions) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for name, f in res["figures"].items():
            lines.append(
                f"| {res['trait']} | {name} | {100 * f['kept_fraction']:.0f}% | {f['layer']} | {_f(f['baseline'], '.1f')} | "
                f"{_f(f['best_gain'], '+.1f')} ({f['best_coef']:g}; {_f(f['best_coherence'], '.0f')}) | "
                f"{_f(f['monotone_spearman'], '.2f')} | {_f(f['random_vector_delta'], '+.1f')} | "
                f"{_f(f['negative_delta'], '+.1f')} | {_f(f['monitor_r'], '.3f')} ({f['monitor_conditions']}) |")
    lines += ["", "| trait | condition (main / real) | prompt_last projection main, real | trait main, real (se) | "
              "difference / se |", "|---|---|---|---|---|"]
    for res in results:
        for c in res["shared_conditions"]:
            p, t, s = c["prompt_last_proj"], c["trait"], c["trait_se"]
            lines.append(f"| {res['trait']} | {c['condition']} | {p[0]:.4f}, {p[1]:.4f} | {_f(t[0], '.1f')} ({_f(s[0], '.1f')}), "
                         f"{_f(t[1], '.1f')} ({_f(s[1], '.1f')}) | {_f(c['difference_in_se'], '+.2f')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--main", required=True, help="workdir of configs/organism.py")
    ap.add_argument("--real", required=True, help="workdir of configs/organism_real_path.py")
    ap.add_argument("--json", default=None, help="also write the comparison here")
    a = ap.parse_args()
    traits = sorted(set(json.load(open(os.path.join(a.main, "report.json")))["traits"])
                    & set(json.load(open(os.path.join(a.real, "report.json")))["traits"]))
    results = [compare(a.main, a.real, t) for t in traits]
    for res in results:
        print(f"{res['trait']}: identical CSVs {res['identical_csvs']}")
        print(f"{res['trait']}: equal vectors {res['equal_vectors']}; extraction summary equal "
              f"{res['extraction_equal']}; steering summary equal {res['steering_equal']}")
        print(f"{res['trait']}: real-path scores equal to OrganismJudge's {res['judge_exact']}")
    print(markdown(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
