"""Multi-host conventions (persona_jax.io.distributed) with two real JAX processes on CPU.

Two subprocesses (tests/multihost_worker.py), 4 CPU devices each, join one 8-device
global mesh through `jax.distributed.initialize` on 127.0.0.1. Checked against the
documented conventions:
  * per-host data shards: each process's devices hold only its own half of a placed batch;
  * results (capture, sampled generation) equal a single-process 8-device run
    of the same code (the reference is computed here, in the test process);
  * only process 0 writes files (CSV, vector, JSON report), also when both write one path,
    and a file is readable on every process as soon as the writer returns (barrier);
  * a judge that needs no collective (an API) is asked on process 0 only, and every
    process gets the same summary and the same filled CSV;
  * a mesh that leaves out a process's devices is refused with a clear error.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from persona_jax.io import distributed
from persona_jax.io.csvio import write_csv_atomic
from persona_jax.testing import tiny_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost_worker  # noqa: E402

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ckpt: str, out: str, nproc: int = 2):
    """Start the worker processes; returns (procs, log paths)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs, logs = [], []
    for pid in range(nproc):
        log = os.path.join(out, f"log_p{pid}.txt")
        with open(log, "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "multihost_worker.py"), ckpt, out, str(port), str(pid), str(nproc)],
                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(HERE)))
        logs.append(log)
    return procs, logs


def _wait(procs, logs, deadline: float):
    """Wait for every worker until `deadline`; kill them all on timeout, or 5 s after one
    fails (the other then usually waits forever in a collective)."""
    failed_at = None
    try:
        while time.time() < deadline and any(p.poll() is None for p in procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.time()
            if failed_at is not None and time.time() > failed_at + 5:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        tails = "\n".join(f"--- process {i} (rc {rc}) ---\n" + open(logs[i]).read()[-3000:] for i, rc in bad)
        pytest.fail(f"multi-host workers failed or exceeded {TIMEOUT_S}s:\n{tails}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if jax.device_count() != 8:
        pytest.skip("needs the 8 simulated CPU devices of conftest.py")
    root = tmp_path_factory.mktemp("multihost")
    ckpt, multi, single = (str(root / n) for n in ("ckpt", "multi", "single"))
    tiny_checkpoint(ckpt, "llama")
    os.makedirs(multi)
    os.makedirs(single)
    procs, logs = _launch(ckpt, multi)
    deadline = time.time() + TIMEOUT_S
    try:
        multihost_worker.run(ckpt, single, 0, 1)  # reference, while the workers run
    finally:
        _wait(procs, logs, deadline)
    load = lambda d, p: dict(np.load(os.path.join(d, f"result_p{p}.npz")))
    return {"multi": multi, "single": single, "ref": load(single, 0),
            "procs": [load(multi, p) for p in range(2)]}


def test_each_process_holds_only_its_rows(runs):
    for pid, res in enumerate(runs["procs"]):
        shards = json.loads(str(res["shard_rows"]))
        # data=8: one row per device, process p holds rows 4p..4p+3
        assert sorted((a, b) for _, a, b in shards["8x1"]) == [(r, r + 1) for r in range(4 * pid, 4 * pid + 4)]
        # (4, 2): rows split 4 ways, each pair of rows on both model-axis devices
        assert sorted((a, b) for _, a, b in shards["4x2"]) == sorted(
            [(4 * pid, 4 * pid + 2)] * 2 + [(4 * pid + 2, 4 * pid + 4)] * 2)
    ids = [{d for d, _, _ in json.loads(str(r["shard_rows"]))["4x2"]} for r in runs["procs"]]
    assert len(ids[0]) == len(ids[1]) == 4 and not ids[0] & ids[1]


def test_results_equal_single_process(runs):
    ref = runs["ref"]
    for res in runs["procs"]:  # every process sees the whole (all-gathered) result
        for k in ("prompt_avg", "prompt_last", "response_avg"):
            assert res[k].shape == ref[k].shape == (8, 4, 48)
            np.testing.assert_allclose(res[k], ref[k], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(res["kept"], ref["kept"])
        assert json.loads(str(res["sampled"])) == json.loads(str(ref["sampled"]))
    sampled = json.loads(str(ref["sampled"]))
    assert len({tuple(t) for t in sampled}) > 1  # per-row keys: rows differ


def test_only_process_zero_writes(runs):
    names = set(os.listdir(runs["multi"]))
    assert {"responses_p0.csv", "vector_p0.npy", "report_p0.json", "nested_p0.csv", "responses.csv", "slow.txt"} <= names
    assert not [n for n in names if "_p1." in n and not n.startswith(("result_", "log_"))]
    assert not [n for n in names if n.endswith(".tmp")]
    for name in ("responses.csv", "responses_p0.csv"):
        with open(os.path.join(runs["multi"], name)) as a, open(os.path.join(runs["single"], "responses.csv")) as b:
            assert a.read() == b.read()
    np.testing.assert_allclose(np.load(os.path.join(runs["multi"], "vector_p0.npy")),
                               runs["ref"]["response_avg"].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_api_judge_asked_once_across_processes(runs):
    ref = json.loads(str(runs["ref"]["judge"]))
    got = [json.loads(str(r["judge"])) for r in runs["procs"]]
    assert ref["calls"] == 16  # 8 rows x (trait + coherence), single process
    assert [g["calls"] for g in got] == [16, 0]
    for g in got:
        assert g["summary"] == ref["summary"] == {"rows": 8, "trait_missing": 0, "coherence_missing": 0, "judged": 8}
        assert g["scores"] == ref["scores"] and all(s != "" for s in g["scores"])


def test_writer_only_skips_off_process_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    assert not distributed.is_writer()
    assert write_csv_atomic(tmp_path / "x.csv", ["a"], [{"a": 1}]) is None
    assert not os.listdir(tmp_path)
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 0)
    write_csv_atomic(tmp_path / "x.csv", ["a"], [{"a": 1}])
    assert (tmp_path / "x.csv").read_text() == "a\n1\n"
