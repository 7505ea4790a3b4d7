"""The docs site builds with warnings as errors, and its API reference lists every name
`persona_jax` exports (issue 28)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_docs_build_and_api_reference_lists_all(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                          str(REPO / "docs"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import persona_jax
    html = (tmp_path / "api.html").read_text(encoding="utf-8")
    missing = [n for n in persona_jax.__all__ if f'id="persona_jax.{n}"' not in html]
    assert not missing, f"not in the API reference: {missing}"
