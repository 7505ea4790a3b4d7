"""Per-token and per-turn monitoring (issue 18 point 6) on a tiny random model.

The token projections are checked against two independent computations projected by numpy:
`capture`'s per-position hidden states (its `prompt_last` readout with the prompt ending at
every position in turn) and transformers' `output_hidden_states`. Turn attribution is checked
against the message contents and the chat template as transformers renders it; the runner
writes the CSVs and a self-contained HTML page."""
import csv
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from persona_jax.errors import PersonaError
from persona_jax.method import token_monitor as tm

ROOT = Path(__file__).resolve().parents[1]
LAYER = 2

CONVS = [
    [{"role": "system", "content": "Be terse."},
     {"role": "user", "content": "How do I fix a flat tyre?"},
     {"role": "assistant", "content": "Find the hole, patch it, pump it up."},
     {"role": "user", "content": "And if it is torn?"},
     {"role": "assistant", "content": "Replace the tube."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! What do you need today?"}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from persona_jax.model import load_model
    from persona_jax.testing import tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny")
    torch_model = tiny_checkpoint(str(d), "llama", seed=5, num_hidden_layers=3)
    vec = np.random.default_rng(0).normal(size=(4, 48)).astype(np.float32)
    np.save(d / "trait_response_avg_diff.npy", vec)
    return load_model(str(d)), torch_model, vec, d


def np_project(hidden, vec):
    """hidden [L+1, T, D], vec [L+1, D] -> [L+1, T] float64 on each layer's unit vector."""
    u = vec.astype(np.float64) / np.linalg.norm(vec.astype(np.float64), axis=-1, keepdims=True)
    return np.einsum("ltd,ld->lt", np.asarray(hidden, np.float64), u)


def hf_hidden(torch_model, ids):
    import torch

    with torch.no_grad():
        hs = torch_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return np.stack([h[0].numpy() for h in hs])  # [L+1, T, D]


def test_token_projections_equal_capture_and_transformers(tiny):
    import jax.numpy as jnp

    from persona_jax.runtime.capture import REDUCTIONS, capture_arrays

    model, torch_model, vec, _ = tiny
    traces = tm.token_projections(model, vec, LAYER, CONVS, batch_size=2)
    assert len(traces) == 2
    for conv, tr in zip(CONVS, traces):
        ids = model.tokenizer(tr.text, add_special_tokens=False)["input_ids"]
        assert tr.token_ids.tolist() == ids and tr.projections.shape == (4, len(ids))
        # transformers, one sample, projected by numpy
        np.testing.assert_allclose(tr.projections, np_project(hf_hidden(torch_model, ids), vec), rtol=2e-4, atol=2e-4)
    # capture's readout: row k ends its prompt at position k, so its prompt_last is hidden state k
    tr = traces[0]
    T = len(tr.token_ids)
    tokens = jnp.asarray(np.tile(tr.token_ids, (T, 1)), jnp.int32)
    out = np.asarray(capture_arrays(model.config, model.params, tokens, jnp.arange(1, T + 1, dtype=jnp.int32),
                                    jnp.full((T,), T, jnp.int32)))
    per_position = out[REDUCTIONS.index("prompt_last")]  # [T, L+1, D]
    np.testing.assert_allclose(tr.projections, np_project(per_position.transpose(1, 0, 2), vec), rtol=2e-4, atol=2e-4)
    assert np.array_equal(tr.projection, tr.projections[LAYER])


def test_turns_follow_the_message_contents(tiny):
    model, torch_model, vec, _ = tiny
    for conv, tr in zip(CONVS, tm.token_projections(model, vec, LAYER, CONVS)):
        # the text is transformers' rendering, and the pieces rebuild it
        assert tr.text == model.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
        assert "".join(tr.pieces) == tr.text and len(tr.pieces) == len(tr.token_ids)
        assert [t.role for t in tr.turns] == [m["role"] for m in conv]
        ref = np_project(hf_hidden(torch_model, tr.token_ids.tolist()), vec)[LAYER]
        for k, m in enumerate(conv):
            sel = tr.turn == k
            assert "".join(np.asarray(tr.pieces, object)[sel]) == m["content"]
            assert np.flatnonzero(sel).tolist() == list(range(sel.argmax(), sel.argmax() + sel.sum()))  # contiguous
            assert tr.turns[k].n_tokens == sel.sum() == len(m["content"])  # one character per token
            assert tr.turns[k].mean == pytest.approx(ref[sel].mean(), rel=1e-4, abs=1e-4)
        template = "".join(np.asarray(tr.pieces, object)[tr.turn == -1])
        assert template == "".join(f"<|{m['role']}|><|end|>" for m in conv)


def test_response_csv_input(tiny, tmp_path):
    model, _, vec, _ = tiny
    p = tmp_path / "r.csv"
    prompt = model.render_chat([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Why?"}])
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "prompt", "answer", "question_id", "evil", "coherence"])
        w.writerow(["Why?", prompt, "Because it helps.", "evil_0_0", "", ""])
    convs = tm.read_conversations(str(p))
    assert convs[0].name == "evil_0_0" and convs[0].prompt == prompt
    tr = tm.token_projections(model, vec, LAYER, convs)[0]
    assert tr.text == prompt + "Because it helps."  # exactly what `capture` reads
    pieces = np.asarray(tr.pieces, object)
    assert "".join(pieces[tr.turn == 0]) == "Why?" and "".join(pieces[tr.turn == 1]) == "Because it helps."
    assert np.flatnonzero(tr.turn == 1).tolist() == list(range(len(tr.token_ids) - 17, len(tr.token_ids)))
    # without a prompt column the question and answer are rendered as a chat
    q = tmp_path / "q.csv"
    q.write_text("question,answer\nWhy?,Because.\n")
    tr2 = tm.token_projections(model, vec, LAYER, tm.read_conversations(str(q)))[0]
    assert tr2.text == model.render_chat([{"role": "user", "content": "Why?"},
                                          {"role": "assistant", "content": "Because."}], add_generation_prompt=False)


@pytest.mark.parametrize("content,needle", [
    ('{"messages": [{"role": "user"}]}\n', "line 1: message 0"),
    ('{"messages": []}\n', 'line 1 has no "messages"'),
    ("not json\n", "line 1 is not valid JSON"),
    ("\n", "holds no conversations"),
])
def test_bad_jsonl_is_one_clear_error(tmp_path, content, needle):
    p = tmp_path / "c.jsonl"
    p.write_text(content)
    with pytest.raises(PersonaError, match=needle):
        tm.read_conversations(str(p))


def test_bad_arguments(tiny, tmp_path):
    model, _, vec, _ = tiny
    with pytest.raises(PersonaError, match="layer 9 is outside 0..3"):
        tm.token_projections(model, vec, 9, CONVS)
    with pytest.raises(PersonaError, match="zero at layer 1"):
        tm.token_projections(model, np.where(np.arange(4)[:, None] == 1, 0, vec), 1, CONVS)
    with pytest.raises(PersonaError):
        tm.token_projections(model, vec[:, :10], 1, CONVS)
    with pytest.raises(PersonaError, match="neither .jsonl nor .csv"):
        (tmp_path / "x.txt").write_text("x")
        tm.read_conversations(str(tmp_path / "x.txt"))


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.token_spans, self.refs, self.titles = [], 0, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "span" and "t" in (a.get("class") or "").split():
            self.token_spans += 1
            self.titles.append(a.get("title", ""))
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_runner_writes_csvs_and_a_self_contained_page(tiny, tmp_path):
    model, _, vec, d = tiny
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    out = tmp_path / "out"
    vpath = d / "trait_response_avg_diff.npy"
    cmd = [sys.executable, "-m", "experiments.token_monitor", f"--model={d}", f"--vector={vpath}",
           f"--layer={LAYER}", f"--input={data}", f"--out={out}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    traces = tm.token_projections(model, vec, LAYER, CONVS)
    with open(out / "token_projections.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(t.token_ids) for t in traces)
    got = np.asarray([float(x["projection"]) for x in rows])
    np.testing.assert_allclose(got, np.concatenate([t.projection for t in traces]), rtol=1e-5, atol=1e-5)
    assert "".join(x["token"] for x in rows if x["conversation"] == "line 1") == traces[0].text
    with open(out / "turn_projections.csv", newline="") as f:
        turns = list(csv.DictReader(f))
    assert [(x["role"], x["content"]) for x in turns] == [(m["role"], m["content"]) for c in CONVS for m in c]
    page = (out / "token_monitor.html").read_text()
    parser = _Page()
    parser.feed(page)
    assert parser.token_spans == len(rows)  # every token is a shaded span
    assert parser.refs == [] and "<script" not in page and "<link" not in page and "url(" not in page
    # a turn plot per conversation, one line per role in it
    assert parser.tags.count("svg") == 2 and parser.tags.count("polyline") == 3 + 2
    assert "trait_response_avg_diff.npy" in page and f"layer <b>{LAYER}</b>" in page and 'class="legend"' in page
    assert parser.titles[5].endswith(f"{traces[0].projection[5]:.4g}")

    # a user error: one line, exit status 2, nothing written
    bad = tmp_path / "bad"
    r = subprocess.run(cmd[:-1] + ["--layer=7", f"--out={bad}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: layer 7 is outside")
    assert not bad.exists()


def test_sharded_equals_single_device(tiny):
    """Batch over the mesh's data axis, weights over its model axis: the same projections."""
    from persona_jax.model import load_model
    from persona_jax.model import sharding as sh

    model, _, vec, d = tiny
    sharded = load_model(str(d), mesh=sh.make_mesh(2, 2))
    convs = CONVS + [CONVS[1][:1]]  # 3 conversations: the batch is padded to the data axis
    want = tm.token_projections(model, vec, LAYER, convs, batch_size=3)
    got = tm.token_projections(sharded, vec, LAYER, convs, batch_size=3)
    for a, b in zip(want, got):
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.turn.tolist() == b.turn.tolist()
        np.testing.assert_allclose(b.projections, a.projections, rtol=1e-4, atol=1e-4)
        assert [t.mean for t in b.turns] == pytest.approx([t.mean for t in a.turns], rel=1e-4, abs=1e-4)
