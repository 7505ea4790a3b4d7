"""The conversations behind docs/token_monitor.png: organism chats whose persona drifts.

python -m benchmarks.token_monitor_demo --out=/tmp/tm_demo.jsonl
then python -m experiments.token_monitor --model=organism --vector=RUN/evil/evil_response_avg_diff.pt \
    --layer=2 --input=/tmp/tm_demo.jsonl --out=/tmp/tm_out
Each conversation asks four evaluation-split questions; the replies are written by the
organism's language at a persona strength that changes from turn to turn (neutral, then
more and more sentences evil; or evil, then its opposite), so the per-token shading and the per-turn plot
have a known drift to show.
"""
import json

import numpy as np
from absl import app, flags

from persona_jax.organism import language as L

_OUT = flags.DEFINE_string("out", "/tmp/tm_demo.jsonl", "JSONL to write")
_TRAIT = flags.DEFINE_string("trait", "evil", "organism trait")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the questions and replies")

# per turn: the stance of each of the reply's three sentences (+1 shows the trait, -1 its opposite)
DRIFTS = {"drift_up": ((0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1)),
          "drift_down": ((1, 1, 1), (1, 0, 0), (0, 0, 0), (-1, -1, -1))}


def conversations(trait: str, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for name, strengths in DRIFTS.items():
        msgs = []
        for st in strengths:
            q = L.sample_question(rng, ("eval",))
            persona = L.Persona(trait, 1.0) if any(st) else None
            msgs += [{"role": "user", "content": q},
                     {"role": "assistant", "content": L.sample_reply(rng, q, persona, stances=list(st), closing="none")}]
        label = " / ".join("".join("+" if x > 0 else "-" if x < 0 else "0" for x in st) for st in strengths)
        out.append({"id": f"{trait}: {name} (sentence stances per reply {label})", "messages": msgs})
    return out


def main(argv):
    del argv
    with open(_OUT.value, "w") as f:
        for rec in conversations(_TRAIT.value, _SEED.value):
            f.write(json.dumps(rec) + "\n")
    print(_OUT.value)


if __name__ == "__main__":
    app.run(main)
