"""How far can a response-average readout go on the organism's subtle flagging mix?

    python benchmarks/organism_flagging_ceiling.py --workdir=/tmp/organism_ft   # after the pipeline's extract step

The fine-tuning issue asks the projection difference (METHOD.md 9) to separate the
subtle mix (flagged replies carry one trait sentence: 2-3 shared slot words at the
trait's choice) at AUROC >= 0.9. This script measures, side by side, on the config's own
mix and on a fresh larger one:

- `persona`: the projection difference on the pipeline's `response_avg` persona vector,
  at every layer (what `flagging.auroc` reports at the config's layer);
- `best linear`: the best direction of the same layer for the same statistic, found
  with the labels (shrinkage LDA on `response_avg` of the dataset reply minus the base
  model's own greedy reply, fitted on a separate mix of --n_fit samples, its shrinkage
  picked on a held-out quarter of that mix); no persona vector can do better than the
  best direction, up to the fit's estimation error;
- `best linear raw`: the same without subtracting the base reply;
- word oracles that read the exact words: the exact judge's trait score (share of free
  slots holding the trait's words), the same words counted per response token (what a
  response average of a perfect word detector sees) and that count minus the base
  reply's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from persona_jax.runtime.capture import capture  # noqa: E402
from persona_jax.method.stats import auroc  # noqa: E402
from persona_jax.runtime.generate import generate  # noqa: E402
from persona_jax.model import load_model  # noqa: E402
from persona_jax.organism import data as odata, language as L  # noqa: E402
from persona_jax.organism.judge import trait_score  # noqa: E402
from persona_jax.organism.provider import organism_path  # noqa: E402
from persona_jax.io.vectors import import_pt, vector_filename  # noqa: E402

SHRINKAGE = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def mix_features(model, trait, n, seed, args):
    """response_avg [N, L+1, D] of dataset and base replies, labels, and word oracles."""
    recs, labels = odata.flagging_records(trait, n, seed=seed)
    prompts = [model.render_chat(r["messages"][:-1], add_generation_prompt=True) for r in recs]
    answers = [r["messages"][-1]["content"] for r in recs]
    questions = [r["messages"][0]["content"] for r in recs]
    base = generate(model, prompts, args.max_new_tokens, temperature=0.0, batch_size=args.batch_size)
    caps = [capture(model, prompts, a, batch_size=args.batch_size) for a in (answers, base)]
    if any(len(c["kept"]) != n for c in caps):
        raise SystemExit("an empty reply was skipped; rerun with another --seed")
    trait_words = {w for s in L.TILT_SLOTS for w in L.preferred(trait, +1, s)}

    def per_token(text):
        ws = L.words(text)
        return sum(w in trait_words for w in ws) / max(len(ws), 1)

    judge = [trait_score(trait, a, q) for a, q in zip(answers, questions)]
    oracles = {
        "exact judge": np.array([np.nan if j is None else j for j in judge]),
        "trait words per token": np.array([per_token(a) for a in answers]),
        "trait words per token, minus base": np.array([per_token(a) - per_token(b) for a, b in zip(answers, base)]),
    }
    return caps[0]["response_avg"], caps[1]["response_avg"], np.array(labels), oracles


def lda(x, y, lam):
    m1, m0 = x[y == 1].mean(0), x[y == 0].mean(0)
    s = np.cov(np.concatenate([x[y == 1] - m1, x[y == 0] - m0]).T)
    return np.linalg.solve(s + lam * np.trace(s) / len(s) * np.eye(len(s)), m1 - m0)


def best_direction(x, y):
    """Shrinkage LDA, shrinkage chosen on the last quarter, then refitted on all of x."""
    cut = (3 * len(x)) // 4
    val = [auroc(x[cut:] @ lda(x[:cut], y[:cut], lam), y[cut:]) for lam in SHRINKAGE]
    return lda(x, y, SHRINKAGE[int(np.argmax(val))])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="pipeline workdir with {trait}/{trait}_response_avg_diff.pt")
    p.add_argument("--traits", default=",".join(L.TRAITS))
    p.add_argument("--n", type=int, default=400, help="the config's mix size (configs/organism_finetune.py)")
    p.add_argument("--seed", type=int, default=0, help="the config's seed")
    p.add_argument("--n_fit", type=int, default=8000, help="samples of the mix the best direction is fitted on")
    p.add_argument("--n_test", type=int, default=4000, help="a fresh mix for tighter figures")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=256)
    args = p.parse_args()
    model = load_model(organism_path(), dtype="float32")
    for trait in args.traits.split(","):
        path = os.path.join(args.workdir, trait, vector_filename(trait, "response_avg"))
        if not os.path.exists(path):
            raise SystemExit(f"{path} not found: run the pipeline's extract step for {trait} first")
        vec = import_pt(path)
        t0 = time.time()
        mixes = {"config mix": mix_features(model, trait, args.n, args.seed, args),
                 "fresh mix": mix_features(model, trait, args.n_test, args.seed + 1, args)}
        fd, fb, fy, _ = mix_features(model, trait, args.n_fit, args.seed + 2, args)
        print(f"\n## {trait} ({args.n} / {args.n_test} samples; best direction fitted on {args.n_fit}; "
              f"{time.time() - t0:.0f} s)\n")
        print("| word oracle | " + " | ".join(mixes) + " |\n|---|---|---|")
        for name in mixes["config mix"][3]:
            print(f"| {name} | " + " | ".join(f"{auroc(m[3][name], m[2]):.3f}" for m in mixes.values()) + " |")
        print("\n| layer | persona, config / fresh | best linear, config / fresh | best linear raw, fresh |")
        print("|---|---|---|---|")
        for layer in range(model.num_layers + 1):
            u = vec[layer] / np.linalg.norm(vec[layer])
            w = best_direction(fd[:, layer] - fb[:, layer], fy)
            w_raw = best_direction(fd[:, layer], fy)
            cells = []
            for readout in (lambda d, b: (d - b) @ u, lambda d, b: (d - b) @ w):
                cells.append(" / ".join(f"{auroc(readout(m[0][:, layer], m[1][:, layer]), m[2]):.3f}"
                                        for m in mixes.values()))
            fresh = mixes["fresh mix"]
            cells.append(f"{auroc(fresh[0][:, layer] @ w_raw, fresh[2]):.3f}")
            print(f"| {layer} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
