"""The executable store (issue 25): a later process loads the engine's programs whole,
neither tracing nor compiling them, and generates the same tokens as a process with the
store and the compilation cache off; a key that differs (the package source, the model's
shape) or a damaged file is never loaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persona_jax.testing import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]

# One ragged sampled `generate` call; reports its tokens, the programs it obtained
# (compile_count) and how many times the engine's functions were traced.
_SCRIPT = r"""
import json, sys
from jax import monitoring
from persona_jax.runtime import compile_cache, executable_store
from persona_jax.runtime.compile_count import counting
traced = []
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: traced.append(kw.get("fun_name")) if name.endswith("jaxpr_trace_duration") else None)
compile_cache.enable(sys.argv[1])
if sys.argv[3] == "other_source":
    executable_store._source_hash = "another build of the package"
if sys.argv[3] == "damaged":
    import glob
    for p in glob.glob(sys.argv[1] + "/executables/*.exe"):
        open(p, "r+b").truncate(100)
import persona_jax as pj
model = pj.load_model(sys.argv[2])
prompts = [[{"role": "user", "content": "a b " * k + "?"}] for k in range(1, 12)]
with counting() as c:
    out = pj.generate(model, prompts, max_new_tokens=24, temperature=1.0, seed=3, batch_size=8, return_tokens=True)
print(json.dumps({"tokens": out.tokens, "count": c.summary(),
                  "traced": sorted(t for t in traced if t in ("decode", "insert", "compact"))}))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("store_model") / "model"
    tiny_checkpoint(str(d), "llama", seed=4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    vocab_size=160, num_attention_heads=4, num_key_value_heads=2, eos_token_id=[2, 3, 4, 5, 6, 7])
    return str(d)


def _run(cache, model, mode="plain"):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PERSONA_JAX_COMPILATION_CACHE")}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, cache, model, mode], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_later_process_loads_the_engine_programs_and_only_its_own(tmp_path, model_dir):
    cache = str(tmp_path / "cache")
    off = _run("", model_dir)  # no store, no compilation cache: plain jax.jit
    first = _run(cache, model_dir)
    second = _run(cache, model_dir)
    assert off["count"]["loaded"] == 0 and off["traced"]
    assert len({len(t) for t in off["tokens"]}) > 2  # really ragged
    assert first["tokens"] == off["tokens"] and second["tokens"] == off["tokens"]
    engine_programs = sum(v for k, v in first["count"]["by_name"].items() if k in ("decode", "insert", "compact"))
    stored = sorted(os.listdir(os.path.join(cache, "executables")))
    assert engine_programs >= 2 and len(stored) == engine_programs
    # the second process traced none of the engine's functions and loaded each of them
    assert second["traced"] == [], second["traced"]
    assert second["count"]["by_name"] == first["count"]["by_name"]
    assert second["count"]["compiled"] == 0 and second["count"]["loaded"] == second["count"]["programs"]

    # Another build of the package, or damaged files: traced again. What JAX's compilation
    # cache then supplies (XLA compiles nothing) is run but not stored: XLA:CPU cannot
    # serialize it again, so nothing is added and the store's files are left as they were.
    traced = sorted(set(first["traced"]))
    for mode in ("other_source", "damaged"):
        run = _run(cache, model_dir, mode)
        assert sorted(set(run["traced"])) == traced and run["count"]["compiled"] == 0, mode
        assert run["tokens"] == first["tokens"], mode
    assert sorted(os.listdir(os.path.join(cache, "executables"))) == stored

    # another model shape is another key: traced and compiled
    wider = str(tmp_path / "wider")
    tiny_checkpoint(wider, "llama", seed=4, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    vocab_size=160, num_attention_heads=4, num_key_value_heads=2, eos_token_id=[2, 3, 4, 5, 6, 7])
    other = _run(cache, wider)
    assert "decode" in other["traced"] and "insert" in other["traced"] and other["count"]["compiled"] >= 2
