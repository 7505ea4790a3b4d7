"""The organism's capability under steering (issue 18.1 acceptance), without the whole main job.

python benchmarks/organism_capability.py --workdir=/tmp/cap_run [--layers=3,4] [--n_items=100]

Reads the `{trait}_response_avg_diff.pt` vectors a main-job run (or its extract step:
`python -m experiments.extract --config=configs/organism.py --workdir=DIR`) wrote, and
scores the organism's multiple-choice task at the main job's coefficient grid
(configs/organism.py) with the steering step's settings (response positions, choice
scoring after the bare question): at the layer the run's steering step chose
(`{trait}/steer.json`) when it exists, else at every layer given. Prints one JSON object
and writes it to `{workdir}/organism_capability.json`.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--layers", default="1,2,3,4", help="layers to score when the run has no steer.json")
    ap.add_argument("--n_items", type=int, default=None)
    args = ap.parse_args()

    import persona_jax as pj
    from configs import organism as org_cfg
    from persona_jax.method import capability as cap
    from persona_jax.organism.provider import OrganismTraits, organism_path
    from persona_jax.pipeline.steps import load_step_vector

    cfg = org_cfg.get_config()
    if args.n_items:
        cfg.capability.n_items = args.n_items
    model = pj.load_model(organism_path())
    items = OrganismTraits().capability_items(cfg)
    coefs = sorted(float(c) for c in cfg.steer.coefs)
    out = {"n_items": len(items), "coefs": coefs, "traits": {}}
    for name in cfg.traits:
        steer_json = os.path.join(args.workdir, name, "steer.json")
        if os.path.exists(steer_json):
            with open(steer_json) as f:
                layers = [json.load(f)["layer"]]
        else:
            layers = [int(x) for x in args.layers.split(",")]
        vector = load_step_vector(args.workdir, name, cfg.steer.reduction, model)
        t = time.time()
        res = cap.evaluate(model, items, vector, layers, coefs, positions=cfg.steer.positions,
                           scorings=("choice_raw", "choice"), prompt_format=cfg.capability.prompt_format,
                           chat=cfg.capability.chat, batch_size=int(cfg.capability.batch_size))
        out["traits"][name] = {"layers": layers, "seconds": round(time.time() - t, 1),
                               "capability": {s: {str(l): res.at(s, l) for l in layers} for s in res.accuracy}}
        print(name, json.dumps(out["traits"][name]), flush=True)
    with open(os.path.join(args.workdir, "organism_capability.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
