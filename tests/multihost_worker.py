"""One process of a simulated multi-host run (launched by tests/test_multihost.py).

    python tests/multihost_worker.py CKPT OUT PORT PROCESS_ID NUM_PROCESSES

Each process sees 8 / NUM_PROCESSES CPU devices; they join one 8-device global mesh
through `jax.distributed.initialize` on 127.0.0.1:PORT (CPU cross-process collectives
are gloo, JAX's default). `run` is also called in-process by the test, with one process
and 8 devices, to give the single-process reference.
"""
import json
import os
import sys
import time

import numpy as np

PROMPTS = [f"<|user|>question {i}: {'why ' * (i % 4)}?<|end|><|assistant|>" for i in range(8)]
RESPONSES = [f"answer {i} {'and more ' * (i % 3)}." for i in range(8)]
COLUMNS = ["question", "prompt", "answer", "question_id"]


def run(ckpt: str, out: str, pid: int, nproc: int):
    """Place a batch, capture, generate and write on a (4, 2) mesh over all 8 devices.

    Library writes go to per-process names (responses_p{pid}.csv, vector_p{pid}.npy,
    report_p{pid}.json, nested_p{pid}.csv) so the test sees which processes wrote, plus
    shared files that every process reads right after the write (responses.csv, and
    slow.txt from a writer that sleeps first: the writer's barrier makes that safe).
    What this process computed goes to result_p{pid}.npz (a plain np.savez: the
    harness's record, not a library write).
    """
    import jax

    from persona_jax.runtime import batching
    from persona_jax.model import sharding as sh
    from persona_jax.runtime.capture import capture
    from persona_jax.io.csvio import read_csv, write_csv_atomic
    from persona_jax.io.distributed import writer_only
    from persona_jax.errors import PersonaError
    from persona_jax.runtime.generate import generate
    from persona_jax.model import load_model
    from persona_jax.pipeline.steps import write_summary
    from persona_jax.io.vectors import export_npy

    assert jax.process_count() == nproc and jax.process_index() == pid and jax.device_count() == 8

    # Per-host data shards: the rows of a placed [8, 3] batch this process's devices hold.
    batch = np.arange(24, dtype=np.int32).reshape(8, 3)
    shard_rows = {}
    for shape in ((8, 1), (4, 2)):
        placed = batching.place(sh.make_mesh(*shape), batch)
        rows = []
        for s in placed.addressable_shards:
            assert s.device.process_index == pid
            np.testing.assert_array_equal(np.asarray(s.data), batch[s.index])
            r = range(*s.index[0].indices(8))
            rows.append([s.device.id, r.start, r.stop])
        shard_rows[f"{shape[0]}x{shape[1]}"] = sorted(rows)
        np.testing.assert_array_equal(batching.to_host(placed), batch)

    model = load_model(ckpt, mesh=sh.make_mesh(4, 2))
    cap = capture(model, PROMPTS, RESPONSES, batch_size=8)
    # Sampled rather than greedy: the random tiny model's greedy output is one repeated
    # token, while sampling checks the per-row keys too (same decode loop otherwise).
    sampled = generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=3, batch_size=8,
                       return_tokens=True)

    rows = [{"question": p, "prompt": p, "answer": a, "question_id": i}
            for i, (p, a) in enumerate(zip(PROMPTS, sampled.texts))]
    write_csv_atomic(os.path.join(out, f"responses_p{pid}.csv"), COLUMNS, rows)
    export_npy(cap["response_avg"].mean(axis=0), os.path.join(out, f"vector_p{pid}.npy"))
    write_summary(os.path.join(out, f"report_p{pid}.json"), {"process": pid})
    # The usual case: every process calls the writer with the same path, then reads it.
    write_csv_atomic(os.path.join(out, "responses.csv"), COLUMNS, rows)
    assert read_csv(os.path.join(out, "responses.csv"))[1][0]["answer"] == sampled.texts[0]

    @writer_only
    def slow_write(path, text):  # a slow write must still be readable right after the call
        time.sleep(1.0)
        with open(path, "w") as f:
            f.write(text)

    @writer_only
    def nested(path):  # a writer inside a writer: one barrier, at the outer call
        write_csv_atomic(path, ["a"], [{"a": 1}])

    slow_write(os.path.join(out, "slow.txt"), "written")
    with open(os.path.join(out, "slow.txt")) as f:
        assert f.read() == "written"
    nested(os.path.join(out, f"nested_p{pid}.csv"))
    assert os.path.exists(os.path.join(out, "nested_p0.csv"))

    # An API-style judge (not collective) is asked on process 0 only; every process gets
    # the same summary and reads the same filled CSV.
    from persona_jax.judges.base import Judge, judge_csv

    class CountingJudge(Judge):
        calls = 0

        def trait_scores(self, trait, eval_prompt, questions, answers):
            CountingJudge.calls += len(answers)
            return [float(len(a) % 100) for a in answers]

        def coherence_scores(self, questions, answers):
            CountingJudge.calls += len(answers)
            return [50.0] * len(answers)

    write_csv_atomic(os.path.join(out, "judged.csv"), COLUMNS, rows)
    summary = judge_csv(CountingJudge(), os.path.join(out, "judged.csv"), "evil", "{question} {answer}",
                        chunk_size=3, progress=False)
    judged = read_csv(os.path.join(out, "judged.csv"))[1]
    judge_record = {"calls": CountingJudge.calls, "summary": summary,
                    "scores": [r["evil"] for r in judged]}

    if nproc > 1:  # a mesh over process 0's devices only is refused with a clear message
        try:
            sh.make_mesh(4, 1)
            raise AssertionError("make_mesh(4, 1) over 2 processes did not raise")
        except PersonaError as e:
            assert "span every process" in str(e), e

    np.savez(os.path.join(out, f"result_p{pid}.npz"),
             **{k: cap[k] for k in ("prompt_avg", "prompt_last", "response_avg", "kept")},
             sampled=np.asarray(json.dumps(sampled.tokens)),
             shard_rows=np.asarray(json.dumps(shard_rows)),
             judge=np.asarray(json.dumps(judge_record)))


if __name__ == "__main__":
    ckpt, out, port, pid, nproc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from persona_jax.model import sharding as sh

    # Exactly what runner.setup does with cfg.distributed=True; with no cluster to detect,
    # the processes are named by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(nproc),
                      JAX_PROCESS_ID=str(pid))
    sh.maybe_initialize_distributed(nproc > 1)
    try:
        run(ckpt, out, pid, nproc)
    except BaseException:  # exit now: a normal exit would wait for the peer at shutdown
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    if nproc > 1:
        import jax
        jax.distributed.shutdown()
    print(f"worker {pid} done", flush=True)
