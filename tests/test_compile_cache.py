"""The persistent compilation cache: a second process loads the first one's programs from
disk instead of compiling them, and every runner turns the cache on (or off with "")."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A program of a shape no other test compiles; reports whether this process compiled it
# (jax's own monitoring events count persistent-cache hits and misses).
_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from jax import monitoring
from persona_jax.runtime import compile_cache
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
used = compile_cache.enable(sys.argv[1])
jax.jit(lambda x: jnp.tanh(x @ x.T) * 3.0 + 1.0)(jnp.ones((37, 41))).block_until_ready()
print(json.dumps({"used": used, "hits": sum("cache_hits" in e for e in events),
                  "misses": sum("cache_misses" in e for e in events)}))
"""


def _run(path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, path], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_loads_programs_from_disk(tmp_path):
    cache = str(tmp_path / "cache")
    first, second = _run(cache), _run(cache)
    assert first["used"] == os.path.abspath(cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert second["hits"] >= 1 and second["misses"] == 0
    assert any(name.endswith("-cache") for name in os.listdir(cache))


def test_empty_path_turns_the_cache_off(tmp_path):
    off = _run("")
    assert off["used"] == "" and off["hits"] == 0


def test_runner_flag_names_the_folder(tmp_path):
    cache = tmp_path / "runner_cache"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "experiments.generate_trait", "--helpfull"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert "--compilation_cache_dir" in r.stdout + r.stderr
    # a folder that cannot be made is one error line, exit 2
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "experiments.inspect_model", f"--compilation_cache_dir={blocker}/sub",
                        "--model=/nonexistent"], cwd=REPO, env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --compilation_cache_dir"), r.stderr
    assert not cache.exists()
