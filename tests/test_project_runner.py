"""experiments.project (the reference's cal_projection.py) and the process-0 rule of the
runners: projections against transformers on a (4, 2) mesh, one projection type per run,
existing columns kept unless --overwrite; a vector of another width or depth refused;
flag_data, project and finetune write nothing on a process other than 0 (they wrote their
reports on every process before)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from persona_jax.io.csvio import read_csv, write_csv_atomic
from persona_jax.method.projection import column_name
from persona_jax.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEM = "evil_response_avg_diff"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    d = root / "model"
    tm = tiny_checkpoint(str(d), "qwen2", num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    vec = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    torch.save(torch.tensor(vec), root / f"{STEM}.pt")
    return {"root": root, "model": d, "tm": tm, "vec": vec}


def _csv(path, tok):
    rows = []
    for i in range(3):
        prompt = f"<|user|>question {i}?<|end|><|assistant|>"
        rows.append({"question": f"question {i}?", "prompt": prompt, "answer": "an answer" + " y" * i,
                     "question_id": str(i)})
    write_csv_atomic(path, ["question", "prompt", "answer", "question_id"], rows)
    return rows


def _torch_proj(tm, tok, prompt, answer, v):
    ids = tok(prompt + answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
    pl = len(tok.encode(prompt, add_special_tokens=False))
    with torch.no_grad():
        hs = torch.stack(tm(ids, output_hidden_states=True).hidden_states)[:, 0].double().numpy()
    u = v / np.linalg.norm(v)
    return {"proj": hs[2, pl:].mean(0) @ u, "prompt_last_proj": hs[2, pl - 1] @ u,
            "cos_sim": hs[2, pl:].mean(0) @ u / np.linalg.norm(hs[2, pl:].mean(0))}


def project(setup, *args):
    cmd = [sys.executable, "-m", "experiments.project", f"--model={setup['model']}", "--layers=2",
           "--dtype=float32", "--batch_size=8", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_projection_types_keep_and_overwrite(setup, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(setup["model"])
    path = tmp_path / "r.csv"
    rows = _csv(path, tok)
    vec = f"--vectors={setup['root'] / (STEM + '.pt')}"
    name = {k: column_name(str(setup["model"]), STEM, k, 2) for k in ("proj", "prompt_last_proj", "cos_sim")}
    r = project(setup, vec, f"--input={path}", "--projection=proj", "--mesh_data=4", "--mesh_model=2")
    assert r.returncode == 0, r.stderr[-3000:]
    fields, back = read_csv(path)
    assert fields == ["question", "prompt", "answer", "question_id", name["proj"]]
    want = [_torch_proj(setup["tm"], tok, x["prompt"], x["answer"], setup["vec"][2]) for x in rows]
    np.testing.assert_allclose([float(b[name["proj"]]) for b in back], [w["proj"] for w in want], atol=1e-4)
    # a column already there is kept (mark it), the others are added
    for b in back:
        b[name["proj"]] = "7.5"
    write_csv_atomic(path, fields, back)
    from persona_jax.method.projection import project_file, vectors_by_stem
    import persona_jax as pj
    model = pj.load_model(str(setup["model"]))
    vectors = vectors_by_stem([str(setup["root"] / (STEM + ".pt"))])
    project_file(model, str(path), vectors, [2], kinds="all", overwrite=False, progress=False)
    fields, back = read_csv(path)
    assert fields[4:] == [name["proj"], name["prompt_last_proj"], name["cos_sim"]]
    assert all(b[name["proj"]] == "7.5" for b in back)
    for kind in ("prompt_last_proj", "cos_sim"):
        np.testing.assert_allclose([float(b[name[kind]]) for b in back], [w[kind] for w in want], atol=1e-4)
    project_file(model, str(path), vectors, [2], kinds="proj", overwrite=True, progress=False)
    np.testing.assert_allclose([float(b[name["proj"]]) for b in read_csv(path)[1]], [w["proj"] for w in want],
                               atol=1e-4)


def test_vector_of_another_width_or_depth(setup, tmp_path):
    path = tmp_path / "r.csv"
    _csv(path, None)
    before = path.read_bytes()
    for shape in ((4, 16),):  # another width (another depth: tests/test_eval_persona.py)
        vpath = tmp_path / f"evil_{shape[0]}x{shape[1]}.npy"
        np.save(vpath, np.ones(shape, np.float32))
        r = project(setup, f"--vectors={vpath}", f"--input={path}")
        line = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and line.startswith("error: ") and f"({shape[0]}, {shape[1]})" in line, r.stderr[-2000:]
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["evil_4x16.npy", "r.csv"]


WRAPPER = """
import runpy, sys
import persona_jax.io.distributed as d
d.is_writer = lambda: False  # this process is not process 0
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _as_process_1(module, *args):
    cmd = [sys.executable, "-c", WRAPPER, module, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_runners_write_nothing_on_other_processes(setup, tmp_path):
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(4):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": f"a{i} " * (i + 1)}]}) + "\n")
    before = data.read_bytes()
    vec = setup["root"] / f"{STEM}.pt"
    flag = tmp_path / "flag"
    r = _as_process_1("experiments.flag_data", f"--model={setup['model']}", f"--data={data}", f"--vector={vec}",
                      "--layer=2", f"--workdir={flag}", "--max_new_tokens=4", "--dtype=float32", "--batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not flag.exists() or os.listdir(flag) == []
    r = _as_process_1("experiments.project", f"--model={setup['model']}", f"--vectors={vec}", "--layers=2",
                      f"--input={data}", f"--output={tmp_path / 'projected.jsonl'}", "--dtype=float32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "projected.jsonl").exists() and data.read_bytes() == before
    ft = tmp_path / "ft"
    r = _as_process_1("experiments.finetune", "--config=configs/finetune.py", f"--workdir={ft}",
                      f"--config.model={setup['model']}", f"--config.data={data}", "--config.dtype=float32",
                      "--config.mesh.data=1", "--config.finetune.batch_size=2", "--config.finetune.grad_accum=1",
                      "--config.finetune.num_steps=2", "--config.finetune.compute_dtype=float32",
                      "--config.finetune.lora_rank=2", "--config.finetune.progress=False", "--config.eval_fraction=0.0",
                      "--config.export=both")
    assert r.returncode == 0, r.stderr[-3000:]
    # Orbax writes the training checkpoints under its own multi-host protocol; nothing else
    assert sorted(os.listdir(ft)) == ["checkpoints"]
