"""The README's quickstart block, run verbatim in a fresh process (issue 28): it must
stay short (at most 15 lines from import to a steered sweep and a projection), and what
it prints must be a sweep over every (layer, coef) cell and a finite projection."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quickstart_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no ```python block after <!-- quickstart -->"
    return m.group(1)


def test_quickstart_block_runs_verbatim(tmp_path):
    code = quickstart_block()
    lines = [l for l in code.splitlines() if l.strip()]
    assert lines[0].startswith("import persona_jax")
    assert len(lines) <= 15, f"the quickstart is {len(lines)} lines"
    assert "Steering.grid" in code and "pj.project" in code
    (tmp_path / "quickstart.py").write_text(code)
    out = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout
    # the grid printed as a DataFrame: one row per (layer, coef) cell for the one prompt
    cells = re.findall(r"^\s*\d+\s+([12])\s+(0\.0|4\.0)\s", printed, re.M)
    assert sorted(cells) == [("1", "0.0"), ("1", "4.0"), ("2", "0.0"), ("2", "4.0")], printed
    proj = re.search(r"\[\s*(-?\d+\.\d+(?:e[-+]?\d+)?)\s*\]\s*$", printed)
    assert proj and abs(float(proj.group(1))) < 1e6, printed
    assert (tmp_path / "evil.pt").is_file()


def test_control_block_runs_after_the_quickstart(tmp_path):
    """The README's closed-loop block (issue 27), run after the quickstart in one process:
    the guard held every token's projection at its ceiling (the mean of the free reply's)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- control -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no ```python block after <!-- control -->"
    assert len([l for l in m.group(1).splitlines() if l.strip()]) <= 5, "the closed-loop example is five lines"
    code = quickstart_block() + m.group(1) + (
        "\nassert 0 < out.guard_fired[0].mean() <= 1 and out.projections[0].max() <= guard.ceiling + 1e-4\n"
        "print('CONTROL-OK')\n")
    (tmp_path / "control.py").write_text(code)
    out = subprocess.run([sys.executable, "control.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CONTROL-OK" in out.stdout
