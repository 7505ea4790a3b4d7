"""What closed-loop control costs per decode step (issue 27), on CPU, measured in one run.

    python benchmarks/closed_loop.py            # ~3 min on 2 idle cores
    python benchmarks/closed_loop.py --quick    # a smaller model

The model: a random llama3-style checkpoint (hidden 256, 4 layers, vocabulary 320, the
`engine_cold.py` one); 16 chat prompts in 16 decode slots, greedy, EOS suppressed so
every row decodes the same number of tokens. The decode step of each arm is
(t(n2 new) - t(n1 new)) / (n2 - n1) of warm `pj.generate` calls (the prefill and the
fixed costs cancel), the median of `--repeats` interleaved rounds, next to the unsteered
step of the same rounds. Arms: constant steering; a monitor at one layer; a guard that
caps; a guard that subtracts; a guard and a monitor; a conditioned steering.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from engine_cold import MODEL, QUICK, chats  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n1", type=int, default=32)
    ap.add_argument("--n2", type=int, default=96)
    args = ap.parse_args()
    import jax
    import persona_jax as pj
    from persona_jax.testing import tiny_checkpoint

    d = tempfile.mkdtemp(prefix="closed_loop_")
    tiny_checkpoint(d, "llama", seed=0, **(QUICK if args.quick else MODEL))
    model = pj.load_model(d)
    prompts = chats(16)
    L, D = model.num_layers, model.hidden_size
    v = np.random.default_rng(0).normal(size=(L + 1, D)).astype(np.float32)
    layer = L // 2 + 1
    probe = pj.generate(model, prompts, args.n2, temperature=0, min_new_tokens=args.n2, batch_size=16,
                        monitor=pj.Monitor(v, [layer]))
    ceiling = float(np.median(np.concatenate(probe.projections)))  # the guard fires on about half the tokens
    threshold = float(np.median(probe.prompt_projections["prompt_last"]))
    arms = {
        "unsteered": {},
        "constant steering": {"steering": pj.Steering(v, layer=layer, coef=-2.0)},
        "monitor (1 layer)": {"monitor": pj.Monitor(v, [layer])},
        "guard cap": {"guard": pj.Guard(v, layer, ceiling, "cap")},
        "guard subtract": {"guard": pj.Guard(v, layer, ceiling, "subtract", coef=2.0)},
        "guard cap + monitor": {"guard": pj.Guard(v, layer, ceiling, "cap"), "monitor": pj.Monitor(v, [layer])},
        "conditional steering": {"steering": pj.Steering(v, layer=layer, coef=-2.0,
                                                          condition=pj.Condition(v, layer, threshold))},
    }

    def timed(kw, n):
        t = time.perf_counter()
        out = pj.generate(model, prompts, n, temperature=0, min_new_tokens=n, batch_size=16, **kw)
        jax.block_until_ready(jax.numpy.zeros(()))
        dt = time.perf_counter() - t
        toks = out.tokens if hasattr(out, "tokens") else None
        fired = None if toks is None or out.guard_fired is None or not out.guard_fired[0].shape[1] else \
            float(np.mean(np.concatenate(out.guard_fired)))
        return dt, fired

    for kw in arms.values():  # compile every arm's programs first
        timed(kw, args.n1)
        timed(kw, args.n2)
    steps = {k: [] for k in arms}
    fired = {}
    for _ in range(args.repeats):
        for name, kw in arms.items():
            a, _ = timed(kw, args.n1)
            b, f = timed(kw, args.n2)
            steps[name].append((b - a) / (args.n2 - args.n1) * 1e3)
            fired[name] = f
    base = float(np.median(steps["unsteered"]))
    print(f"decode step, 16 slots, {L} layers, hidden {D}, layer {layer}; median of {args.repeats} rounds "
          f"({jax.default_backend()}, {os.cpu_count()} cores)")
    print("| arm | ms / step | extra vs unsteered | tokens guarded |")
    print("|---|---|---|---|")
    for name in arms:
        m = float(np.median(steps[name]))
        f = "" if fired.get(name) is None else f"{fired[name]:.0%}"
        extra = "" if name == "unsteered" else f"{(m - base) / base:+.1%}"
        print(f"| {name} | {m:.3f} | {extra} | {f} |")


if __name__ == "__main__":
    main()
