"""The trainer's step with the decoder's layer loop rolled (scan) and unrolled, on CPU, in one run.

    python benchmarks/train_step.py             # ~1 min on 2 idle cores
    python benchmarks/train_step.py --steps 10  # shorter

The model: the shipped organism (llama, hidden 192, 4 layers, 1.7M parameters), full
fine-tuning as `configs/organism_finetune.py` runs it (AdamW, batch 32, float32), on
random token rows of 37-62 tokens (one 64-token bucket, the organism data's lengths).
Each loop trains in its own fresh run with JAX's persistent cache off, so the first step
holds the compile; the steady step is the median of the later steps' intervals. The two
loops alternate `--rounds` times, and the table gives each loop's median.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_run(model, examples, steps: int, layer_loop: str):
    """(first step s, steady step s, the run's losses) of one fresh training run."""
    import jax
    from persona_jax.finetune import trainer

    jax.clear_caches()  # the step program compiles again in each run
    tc = trainer.TrainConfig(batch_size=32, grad_accum=1, num_steps=steps, learning_rate=1e-3, warmup_steps=2,
                             compute_dtype="float32", layer_loop=layer_loop, progress=False)
    stamps = []
    t0 = time.perf_counter()
    run = trainer.train(model.config, model.params, examples, tc, callback=lambda s, m: stamps.append(time.perf_counter()))
    return stamps[0] - t0, float(np.median(np.diff(stamps[2:]))), [h["loss"] for h in run.history]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.steps < 4:
        print("error: --steps must be >= 4 (the steady step is timed from step 3)", file=sys.stderr)
        sys.exit(2)
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    import persona_jax as pj
    from persona_jax.organism.provider import organism_path

    model = pj.load_model(organism_path())
    rng = np.random.default_rng(0)
    examples = [(rng.integers(4, model.config.vocab_size, n).astype(np.int32), np.ones(n, np.int32))
                for n in rng.integers(37, 63, size=32 * args.steps)]
    res = {"scan": [], "unrolled": []}
    losses = {}
    for _ in range(args.rounds):
        for loop in res:
            first, steady, losses[loop] = one_run(model, examples, args.steps, loop)
            res[loop].append((first, steady))
    med = {k: np.median(np.asarray(v), axis=0) for k, v in res.items()}
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; organism full fine-tuning, batch 32 x 64 tokens, "
          f"{args.steps} steps, {args.rounds} rounds (median)")
    print("| figure | scan | unrolled | unrolled / scan |")
    print("|---|---|---|---|")
    print(f"| first step (compile + run) | {med['scan'][0]:.2f} s | {med['unrolled'][0]:.2f} s | "
          f"{med['unrolled'][0] / med['scan'][0]:.2f}x |")
    print(f"| steady step | {med['scan'][1]:.3f} s | {med['unrolled'][1]:.3f} s | "
          f"{med['unrolled'][1] / med['scan'][1]:.2f}x |")
    diff = max(abs(a - b) / abs(a) for a, b in zip(losses["scan"], losses["unrolled"]))
    print(f"largest relative difference of the two loops' losses over {args.steps} steps: {diff:.1e}")


if __name__ == "__main__":
    main()
