"""The organism flagging-ceiling script runs end to end on a small budget (its figures
are measurements for the README, not asserted here)."""
import os
import subprocess
import sys

import numpy as np

from persona_jax.io.vectors import export_pt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flagging_ceiling_script_runs(tmp_path):
    (tmp_path / "evil").mkdir()
    export_pt(np.random.default_rng(0).standard_normal((5, 192)).astype(np.float32),
              tmp_path / "evil" / "evil_response_avg_diff.pt")
    cmd = [sys.executable, "benchmarks/organism_flagging_ceiling.py", f"--workdir={tmp_path}", "--traits=evil",
           "--n=40", "--n_fit=200", "--n_test=40", "--batch_size=64"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| exact judge |" in r.stdout and r.stdout.count("\n| 4 | ") == 1
    missing = subprocess.run(cmd[:2] + [f"--workdir={tmp_path}", "--traits=humorous"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "run the pipeline's extract step" in missing.stderr
