"""The accelerator benchmark script runs end to end (tiny shapes on CPU), so it is ready
when a session is lent a GPU. Not a timing test: nothing about speed is asserted, but
every printed figure must be a measurement (a positive number) and each ratio must be
the quotient of the two figures beside it."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_runs_on_tiny_shapes():
    cmd = [sys.executable, "benchmarks/gpu_bench.py", "--layers=2", "--hidden=64", "--heads=4", "--kv=2", "--ffn=128",
           "--vocab=512", "--seq=64", "--capture_batch=4", "--decode_batch=4", "--prompt_len=16", "--new_tokens=8",
           "--ref_samples=2", "--reps=1", "--engine_slots=4,8", "--engine_cap=24"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| capture tokens/s" in r.stdout and "| greedy decode tokens/s, batch 4" in r.stdout
    rows = [line.split(" | ") for line in r.stdout.splitlines() if "tokens/s" in line and line.startswith("| ")]
    assert len(rows) >= 2
    engine = [line for line in r.stdout.splitlines() if line.startswith("| engine decode tokens/s")]
    assert len(set(engine)) == 3, r.stdout  # 4 slots (scan, unrolled), 8 slots (scan)
    for cells in [c for c in rows if not c[0].startswith("| engine")]:
        ours, theirs, ratio = (float(c.replace(",", "")) if re.fullmatch(r"[\d,.]+", c) else None
                               for c in (cells[1], cells[2], cells[3].split("x")[0]))
        assert ours is not None and ours > 0 and theirs is not None and theirs > 0, cells
        assert ratio is not None and abs(ratio - ours / theirs) <= 0.05 + 0.02 * ratio, cells


def test_gpu_side_scripts_run_on_tiny_shapes():
    env = {**os.environ, "PYTHONPATH": ROOT, "SMOKE": "1"}
    r = subprocess.run([sys.executable, "benchmarks/gpu_mfu_breakdown.py"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "capture 64x128" in r.stdout
    for script, marker in (("gpu_attention.py", "| 2 x 128 |"), ("gpu_attention_accuracy.py", "2x256: bf16 vs float32")):
        r = subprocess.run([sys.executable, f"benchmarks/{script}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert marker in r.stdout
    r = subprocess.run([sys.executable, "benchmarks/gpu_decode_modes.py", "--layers=2", "--hidden=64", "--heads=4",
                        "--kv=2", "--ffn=128", "--vocab=512", "--decode_batch=4", "--prompt_len=16",
                        "--new_tokens=8", "--reps=1"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| scanned |" in r.stdout and "same tokens 100.0%" in r.stdout
