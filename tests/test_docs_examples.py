"""Every fenced Python example of docs/ runs, as written, in a fresh process.

A page's examples run in order in one Python namespace (as a reader pastes them into one
session), in a temp folder that holds the files the examples read (a response CSV, a
multiple-choice file: stand-ins for a user's own, written here with pandas and json), with
8 simulated CPU devices (the mesh examples) and the OpenAI-compatible endpoint of the trait
generator pointed at the local fake server. The README's one example, the quickstart, is
run by `tests/test_quickstart.py`.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.M | re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """[(line number of the fence, dedented source)] of every ```python block."""
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        indent = m.group(1)
        lines = [ln[len(indent):] if ln.startswith(indent) else ln for ln in m.group(2).splitlines()]
        out.append((text[: m.start()].count("\n") + 1, "\n".join(lines) + "\n"))
    return out


PAGES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md") if python_blocks(p))

_RUNNER = """
import json, sys
blocks = json.load(open(sys.argv[1]))
scope = {"__name__": "__main__"}
for line, src in blocks:
    exec(compile(src, f"{sys.argv[2]} (block at line {line})", "exec"), scope)
    print(f"ran the block at line {line}", flush=True)
"""


def _trait_reply(prompt: str) -> str:
    """The trait generator's LLM: a valid artifact set of the sizes the prompt asks for."""
    pairs = int(re.search(r"exactly (\d+) pairs", prompt).group(1))
    n = int(re.search(r"exactly (\d+) different", prompt).group(1))
    art = {"instruction": [{"pos": f"Answer curtly, manner {k}.", "neg": f"Answer warmly, manner {k}."}
                           for k in range(pairs)],
           "questions": [f"Could you explain topic {i}?" for i in range(n)],
           "eval_prompt": "Score rudeness 0-100.\nQ: {question}\nA: {answer}\nReply with a number or REFUSAL."}
    return "```json\n" + json.dumps(art) + "\n```"


def _fixtures(page: str, d: Path) -> None:
    if page == "docs/formats.md":  # a response CSV as the pipeline writes one
        pd.DataFrame({"question": ["Why?", "How?"], "prompt": ["<p>Why?", "<p>How?"],
                      "answer": ["NA", ""], "evil": [12.5, 80.0], "coherence": [90.0, 75.0]}
                     ).to_csv(d / "evil_pos_instruct.csv", index=False)
    if page == "docs/guide.md":  # multiple-choice items in the cais/mmlu columns
        rows = [{"question": f"Which is item {i}?", "choices": ["red", "green", "blue", "gray"],
                 "answer": i % 4, "subject": "toy"} for i in range(4)]
        (d / "mmlu_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_page_with_examples_is_covered():
    assert {"docs/guide.md", "docs/formats.md", "docs/real_model.md", "docs/control.md"} <= set(PAGES)
    readme = python_blocks(ROOT / "README.md")
    # the quickstart and the closed-loop block: tests/test_quickstart.py runs both
    assert len(readme) == 2 and "tiny_checkpoint" in readme[0][1] and "pj.Guard" in readme[1][1], \
        "a new README example needs a test"


@pytest.mark.parametrize("page", PAGES)
def test_docs_examples_run(page, tmp_path):
    blocks = python_blocks(ROOT / page)
    _fixtures(page, tmp_path)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "run.py").write_text(_RUNNER)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "test-key"}
    with FakeOpenAIServer(text_responder=_trait_reply, lifetime=600) as srv:
        env["OPENAI_BASE_URL"] = srv.url
        r = subprocess.run([sys.executable, "run.py", "blocks.json", page], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("ran the block") == len(blocks)
