"""The continuous-batching engine (runtime/engine.py): per-request results equal
transformers' in mixed batches that refill slots, and do not depend on the slot count,
the arrival order or the other requests."""
import random

import jax.numpy as jnp
import numpy as np
import pytest

import persona_jax as pj
from persona_jax.runtime import engine
from persona_jax.runtime.generate import generate
from persona_jax.steering.spec import Steering
from persona_jax.testing import tiny_checkpoint
from test_generate import COEFS, EXTRA, PROMPTS, ablate_hook, add_hook, hf_generate

LIMITS = [5, 40, 12, 33, 1, 20, 40, 7]  # per input of PROMPTS + EXTRA


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("engine_llama"))
    torch_model = tiny_checkpoint(d, "llama", seed=1, initializer_range=0.4)
    return d, torch_model, pj.load_model(d)


@pytest.fixture(scope="module")
def vec(llama):
    _, _, model = llama
    v = np.random.RandomState(0).randn(model.num_layers + 1, model.hidden_size).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True) * 8.0


@pytest.fixture(params=["unrolled", "scan"])
def layer_loop(request, monkeypatch):
    monkeypatch.setattr(engine, "default_layer_loop", lambda: request.param)
    return request.param


def test_mixed_limits_greedy_and_steering_match_hf(llama, vec, layer_loop):
    """8 requests of different prompt lengths and token limits through 3 slots (every slot
    is refilled, the cache ring wraps): each equals transformers' greedy continuation of
    that prompt, cut at its own limit; the same with per-row steering at two layers."""
    _, torch_model, model = llama
    prompts = PROMPTS + EXTRA
    got = generate(model, prompts, LIMITS, temperature=0, batch_size=3, return_tokens=True).tokens
    ref = hf_generate(torch_model, model.tokenizer, prompts, max(LIMITS))
    assert got == [r[:m] for r, m in zip(ref, LIMITS)]
    assert sum(len(t) == m for t, m in zip(got, LIMITS)) >= 6  # the limits, not EOS, ended most rows

    coefs = COEFS + [2.5, -3.0]
    steer = [Steering(vec, layer=2, coef=coefs, positions="response"), Steering(vec, layer=1, kind="ablate")]
    got_s = generate(model, prompts, LIMITS, temperature=0, batch_size=3, return_tokens=True, steering=steer).tokens
    ref_s = hf_generate(torch_model, model.tokenizer, prompts, max(LIMITS),
                        hooks=[(1, ablate_hook(vec[1])), (2, add_hook(vec[2], coefs, "response"))])
    assert got_s == [r[:m] for r, m in zip(ref_s, LIMITS)]
    assert sum(a != b for a, b in zip(got_s, got)) >= 4  # the steering acted


def test_the_drain_moves_to_a_small_pool_and_still_matches_hf(llama, vec):
    """24 requests (the 8 prompts three times, other limits) through 16 slots: once nothing
    waits and at most 8 rows live, the engine compacts them into an 8-slot pool
    (`engine.compact`). Each row still equals transformers' greedy continuation cut at its
    limit, plain and with per-row steering (the coefficients move with their rows)."""
    _, torch_model, model = llama
    prompts = (PROMPTS + EXTRA) * 3
    limits = [int(x) for x in np.random.RandomState(5).randint(1, 41, size=len(prompts))]
    limits[-1] = 40  # one long request keeps the drain going
    calls = []
    real = engine.compact

    def spy(state, ids):
        calls.append(np.asarray(ids).tolist())
        return real(state, ids)
    import unittest.mock
    with unittest.mock.patch.object(engine, "compact", spy):
        got = generate(model, prompts, limits, temperature=0, batch_size=16, return_tokens=True).tokens
        coefs = [float(c) for c in np.linspace(-4, 4, len(prompts))]
        steer = Steering(vec, layer=2, coef=coefs, positions="response")
        got_s = generate(model, prompts, limits, temperature=0, batch_size=16, return_tokens=True,
                         steering=steer).tokens
    assert len(calls) == 2 and all(len(c) == 8 for c in calls), calls
    ref = hf_generate(torch_model, model.tokenizer, PROMPTS + EXTRA, 40)
    assert got == [ref[i % 8][:m] for i, m in enumerate(limits)]
    ref_s = hf_generate(torch_model, model.tokenizer, prompts, 40, hooks=[(2, add_hook(vec[2], coefs, "response"))])
    assert got_s == [r[:m] for r, m in zip(ref_s, limits)]
    assert sum(a != b for a, b in zip(got_s, got)) >= 8  # the steering acted


def _requests(n, limits, ids):
    return [engine.Request(ids[i % len(ids)], i, limits[i], 1, 1.0, 20 if i % 3 == 0 else 0,
                           0.9 if i % 2 else 1.0) for i in range(n)]


def test_sampled_results_independent_of_slots_and_arrival_order(llama, vec):
    """Sampled requests (per-request top-k / top-p, per-row steering) give the same tokens
    at 8 and 64 slots and in a shuffled arrival order; and equal `generate`'s."""
    _, _, model = llama
    tok = model.tokenizer
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS + EXTRA]
    n = 20
    rng = np.random.RandomState(3)
    limits = rng.randint(1, 30, size=n).tolist()
    coefs = rng.uniform(-4, 4, size=n).tolist()
    steerings = [Steering(vec, layer=2, coef=coefs, positions="all")]
    from persona_jax.steering.spec import position_masks, steering_arrays
    L, D = model.num_layers, model.hidden_size
    steering = (lambda rows: steering_arrays(steerings, L, D, rows, len(rows)),
                lambda rows, mask: position_masks(steerings, "prefill", mask),
                lambda rows: position_masks(steerings, "decode", np.ones((len(rows), 1), np.int32)))

    def run(slots, order):
        spec = engine.EngineSpec(slots=slots, cache_len=128 + 32, max_new=32, greedy=False, use_top_k=True,
                                 use_top_p=True, eos_ids=model.eos_token_ids, pad_id=model.pad_token_id,
                                 layer_loop=engine.default_layer_loop())
        eng = engine.Engine(model.config, model.params, spec, seed=7, steering=steering, prefill_batch=4)
        reqs = _requests(n, limits, ids)
        out = eng.run([reqs[i] for i in order])
        return [out[i] for i in range(n)], eng.stats

    base, stats = run(8, list(range(n)))
    assert stats["insert_calls"] > 2  # slots were refilled
    shuffled = list(range(n))
    random.Random(0).shuffle(shuffled)
    assert run(64, list(range(n)))[0] == base
    assert run(8, shuffled)[0] == base
    assert all(len(t) <= m for t, m in zip(base, limits))
    assert len({tuple(t) for t in base}) >= n - 2
    # one request alone gives what it gave among the others
    solo = engine.Engine(model.config, model.params,
                         engine.EngineSpec(8, 160, 32, False, True, True, model.eos_token_ids, model.pad_token_id,
                                           engine.default_layer_loop()),
                         seed=7, steering=steering).run([_requests(n, limits, ids)[5]])
    assert solo[5] == base[5]


def test_sampling_equals_the_static_path(llama):
    """`generate` through the engine samples exactly what the static batches sampled
    (same per-row keys, same filters): compared with `generate_arrays` directly."""
    import jax
    from persona_jax.runtime import batching
    from persona_jax.runtime.generate import SamplingParams, generate_arrays
    _, _, model = llama
    prompts = PROMPTS + EXTRA
    got = generate(model, prompts, 24, temperature=0.8, top_k=30, seed=11, batch_size=3, return_tokens=True).tokens
    ids = [model.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    p = batching.bucket(max(map(len, ids)))
    tokens, mask = batching.pad_rows(ids, p, model.pad_token_id, left=True)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(11), i))(jnp.arange(len(ids)))
    sp = SamplingParams(24, False, True, False, model.eos_token_ids, model.pad_token_id)
    out, lengths = generate_arrays(model.config, model.params, tokens, mask, keys, jnp.float32(0.8), jnp.int32(30),
                                   jnp.float32(1.0), jnp.int32(1), sp=sp, cache_len=p + 32)
    want = [np.asarray(out)[i, : int(lengths[i])].tolist() for i in range(len(ids))]
    assert got == want


def test_max_new_tokens_list(llama):
    _, _, model = llama
    limits = [3, 1, 17, 9, 30, 2]
    got = generate(model, PROMPTS, limits, temperature=1.0, min_new_tokens=30, batch_size=2,
                   return_tokens=True).tokens
    assert [len(t) for t in got] == limits  # no EOS before 30 tokens: every row runs to its own limit
    with pytest.raises(pj.PersonaError, match="6 inputs"):
        generate(model, PROMPTS, [4, 4], temperature=0)
    with pytest.raises(pj.PersonaError, match="max_new_tokens"):
        generate(model, PROMPTS, [4, 0, 4, 4, 4, 4], temperature=0)


def test_host_key_equals_prng_key():
    import jax
    for seed in (0, 1, 7, 12345, 2**31 - 1, -1, -2**31):
        np.testing.assert_array_equal(engine.host_key(seed), np.asarray(jax.random.PRNGKey(seed)))


def test_a_ragged_call_compiles_a_bounded_set_of_programs(llama):
    """A first ragged, sampled call (prompts of two width buckets, rows ending at EOS or
    their own limits, short refill groups) obtains at most 6 programs: one decode, one
    insert per prompt bucket, the state initialiser (8 slots: no drain pool); the same
    call again obtains none."""
    import jax
    from persona_jax.runtime.compile_count import counting
    _, _, model = llama
    rng = np.random.RandomState(3)
    prompts = ["".join(rng.choice(list("abcdefgh "), rng.randint(2, 24))) for _ in range(37)]
    limits = [int(x) for x in rng.randint(1, 40, size=len(prompts))]
    jax.clear_caches()
    with counting() as first:
        out = generate(model, prompts, limits, temperature=1.0, seed=0, batch_size=8, return_tokens=True)
    assert [len(t) <= n for t, n in zip(out.tokens, limits)] == [True] * len(prompts)
    assert len({len(t) for t in out.tokens}) > 3  # really ragged
    assert first.total <= 6 and first.programs["decode"] == 1, first.summary()
    with counting() as again:
        generate(model, prompts, limits, temperature=1.0, seed=0, batch_size=8)
    assert again.total == 0, again.summary()
