"""Closed-loop control (issue 27): per-token projections from generation, conditional
steering, projection guards and whitening, against a greedy transformers loop written
here with forward hooks that apply the same rules step by step, and against numpy."""
import numpy as np
import pytest
import torch
import transformers

import persona_jax as pj
from persona_jax.errors import PersonaError
from persona_jax.testing import tiny_checkpoint

L, D = 3, 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("closed_loop"))
    tm = tiny_checkpoint(d, num_hidden_layers=L, hidden_size=D, intermediate_size=64, initializer_range=0.3)
    rng = np.random.default_rng(7)
    vecs = [rng.normal(size=(L + 1, D)).astype(np.float32) * 2 for _ in range(3)]
    return d, tm, pj.load_model(d), transformers.AutoTokenizer.from_pretrained(d), vecs


PROMPTS = ["<|user|>hi<|assistant|>", "<|user|>tell me a long story please<|assistant|>",
           "<|user|>abc<|assistant|>", "<|user|>why is the sky so very blue<|assistant|>"]


def reference(tm, ids, n_new, steer=(), guards=(), conds=(), mon=None, eos=2):
    """Greedy decoding of one prompt with hooks. steer: (layer, vec, coef, condition index
    or -1); guards: (layer, vec, ceiling, coef, cap[, direction]); conds: (layer, vec, threshold, sign,
    avg); mon: (layers, vec). Every rule acts at hidden state l in this order: steering,
    guards (last position), then reads (state L after the final norm).
    Returns tokens, projections [n, M], fired [n, G], gate [C], prompt (last, avg) [2, M]."""
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    st = {"step": 0, "gate": [False] * len(conds), "reads": {}, "fired": []}

    def at(l, h):
        h = h.clone()
        for sl, v, c, ci in steer:
            if sl == l and (ci < 0 or (st["step"] > 0 and st["gate"][ci])):
                h = h + c * torch.tensor(v[sl])
        for g, (gl, v, ceil, coef, cap, *direction) in enumerate(guards):
            if gl == l:
                u = torch.tensor(unit(v[gl]))
                dv = torch.tensor((direction[0] if direction else v)[gl])  # the direction acted along
                exc = float(h[0, -1] @ u) - ceil
                if cap:
                    h[0, -1] = h[0, -1] - max(exc, 0.0) * dv / float(dv @ u)
                elif exc > 0:
                    h[0, -1] = h[0, -1] - coef * dv
                st["fired"][-1][g] = exc > 0
        if l < L:
            st["reads"][l] = h[0].detach().numpy().astype(np.float64)
        return h

    def block_hook(i):
        return lambda mod, args, out: (at(i + 1, out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else at(i + 1, out)

    def norm_hook(mod, args, out):
        st["reads"][L] = out[0].detach().numpy().astype(np.float64)

    hs = [tm.model.embed_tokens.register_forward_hook(lambda m, a, o: at(0, o))]
    hs += [layer.register_forward_hook(block_hook(i)) for i, layer in enumerate(tm.model.layers)]
    hs += [tm.model.norm.register_forward_hook(norm_hook)]
    toks, projs, prompt = [], [], None

    def read(layer, v, avg=False):
        r = st["reads"][layer]
        return float((r.mean(0) if avg else r[-1]) @ unit(v[layer]).astype(np.float64))
    try:
        with torch.no_grad():
            inp, past = torch.tensor([ids]), None
            for step in range(n_new):
                st["step"] = step
                st["fired"].append([False] * len(guards))
                out = tm(input_ids=inp, past_key_values=past, use_cache=True)
                past = out.past_key_values
                if step == 0:
                    for ci, (cl, v, thr, sign, avg) in enumerate(conds):
                        st["gate"][ci] = sign * (read(cl, v, avg) - thr) > 0
                    if mon:
                        prompt = [[read(l, mon[1]) for l in mon[0]], [read(l, mon[1], True) for l in mon[0]]]
                if mon:
                    projs.append([read(l, mon[1]) for l in mon[0]])
                nxt = int(out.logits[0, -1].argmax())
                toks.append(nxt)
                if nxt == eos:
                    break
                inp = torch.tensor([[nxt]])
    finally:
        for h in hs:
            h.remove()
    return toks, np.asarray(projs), np.asarray(st["fired"][:len(toks)]), st["gate"], np.asarray(prompt)


def ids_of(tok, prompts):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def test_monitor_projections_equal_transformers_hidden_states(tiny):
    d, tm, model, tok, vecs = tiny
    layers = [0, 2, L]
    out = pj.generate(model, PROMPTS, 7, temperature=0, batch_size=3, monitor=pj.Monitor(vecs[0], layers))
    assert out.monitor_layers == tuple(layers)
    for i, ids in enumerate(ids_of(tok, PROMPTS)):
        toks, projs, _, _, prompt = reference(tm, ids, 7, mon=(layers, vecs[0]))
        assert out.tokens[i] == toks
        assert out.projections[i].shape == (len(toks), 3)
        np.testing.assert_allclose(out.projections[i], projs, atol=1e-4)
        np.testing.assert_allclose(out.prompt_projections["prompt_last"][i], prompt[0], atol=1e-4)
        np.testing.assert_allclose(out.prompt_projections["prompt_avg"][i], prompt[1], atol=1e-4)


def test_guards_and_conditions_match_hooked_transformers_in_a_mixed_batch(tiny):
    d, tm, model, tok, vecs = tiny
    ids = ids_of(tok, PROMPTS)
    n = len(PROMPTS)
    # ceilings from the unguarded run, so each guard fires on some tokens and not on others
    free = pj.generate(model, PROMPTS, 8, temperature=0, monitor=pj.Monitor(vecs[1], [2]))
    ceil_cap = float(np.median(np.concatenate(free.projections)))
    free3 = pj.generate(model, PROMPTS, 8, temperature=0, monitor=pj.Monitor(vecs[2], [1]))
    ceil_sub = float(np.median(np.concatenate(free3.projections)))
    thr = float(np.median(free.prompt_projections["prompt_last"]))  # (the monitor read layer 2 on vecs[1])
    inf = np.inf
    # row 0 plain, rows 1-2 capped (vecs[1] at 2), rows 2-3 subtract-guarded (vecs[2] at 1)
    guards = [pj.Guard(vecs[1], 2, [inf, ceil_cap, ceil_cap, inf], "cap"),
              pj.Guard(vecs[2], 1, [inf, inf, ceil_sub, ceil_sub], "subtract", coef=[0, 0, 3.0, 1.5])]
    cond = pj.Condition(vecs[1], 2, thr, "above")
    steering = [pj.Steering(vecs[0], layer=1, coef=[0.0, 2.0, 0.0, 1.0]),  # plain, per-row
                pj.Steering(vecs[2], layer=2, coef=4.0, condition=cond)]  # only prompts above thr
    out = pj.generate(model, PROMPTS, 8, temperature=0, batch_size=2, steering=steering, guard=guards,
                      monitor=pj.Monitor(vecs[1], [2]))
    fired_any = gated = 0
    for i in range(n):
        toks, projs, fired, gate, _ = reference(
            tm, ids[i], 8, steer=[(1, vecs[0], [0.0, 2.0, 0.0, 1.0][i], -1), (2, vecs[2], 4.0, 0)],
            guards=[(2, vecs[1], [inf, ceil_cap, ceil_cap, inf][i], 0.0, True),
                    (1, vecs[2], [inf, inf, ceil_sub, ceil_sub][i], [0, 0, 3.0, 1.5][i], False)],
            conds=[(2, vecs[1], thr, 1.0, False)], mon=([2], vecs[1]))
        assert out.tokens[i] == toks, i
        np.testing.assert_allclose(out.projections[i], projs, atol=1e-4)
        np.testing.assert_array_equal(out.guard_fired[i], fired)
        assert list(out.condition_met[i]) == gate
        fired_any += int(fired.any())
        gated += int(gate[0])
    assert fired_any >= 2 and 0 < gated < n  # the rules were exercised, both ways
    # a cap holds the projection at the ceiling on the guarded rows
    for i in (1, 2):
        assert out.projections[i].max() <= ceil_cap + 1e-4


def test_results_do_not_depend_on_slots_or_order(tiny):
    d, tm, model, tok, vecs = tiny
    g = pj.Guard(vecs[1], 2, [0.5, 1.0, 0.0, 2.0], "cap")
    m = pj.Monitor(vecs[1], [1, 2])
    a = pj.generate(model, PROMPTS, 6, temperature=0, batch_size=1, guard=g, monitor=m)
    b = pj.generate(model, PROMPTS[::-1], 6, temperature=0, batch_size=4,
                    guard=pj.Guard(vecs[1], 2, [2.0, 0.0, 1.0, 0.5], "cap"), monitor=m)
    for i in range(4):
        assert a.tokens[i] == b.tokens[3 - i]
        np.testing.assert_allclose(a.projections[i], b.projections[3 - i], atol=1e-5)
        np.testing.assert_array_equal(a.guard_fired[i], b.guard_fired[3 - i])


def test_whiten_equals_numpy_solve():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)) * np.linspace(0.2, 3, 16)
    sigma = x.T @ x / len(x)
    v = rng.normal(size=16)
    w = pj.whiten(v, sigma, ridge=0.1)
    lam = 0.1 * np.trace(sigma) / 16
    ref = np.linalg.solve(sigma + lam * np.eye(16), v)
    ref *= (v @ v) / (ref @ v)
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    np.testing.assert_allclose(w @ v / np.linalg.norm(v), np.linalg.norm(v), rtol=1e-5)
    # per layer
    vs = rng.normal(size=(3, 16))
    np.testing.assert_allclose(pj.whiten(vs, np.stack([sigma] * 3), 0.1)[2], pj.whiten(vs[2], sigma, 0.1), rtol=1e-6)


def test_second_moment_equals_numpy_of_transformers_states(tiny):
    d, tm, model, tok, vecs = tiny
    texts = ["hello there", "the cat sat", "a b c d e f g"]
    sigma = pj.second_moment(model, texts, layers=[1, L])
    acc, n = np.zeros((2, D, D)), 0
    with torch.no_grad():
        for t in texts:
            hs = tm(input_ids=torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]),
                    output_hidden_states=True).hidden_states
            for j, l in enumerate([1, L]):
                h = hs[l][0].numpy().astype(np.float64)
                acc[j] += h.T @ h
            n += hs[0].shape[1]
    np.testing.assert_allclose(sigma, acc / n, rtol=1e-4, atol=1e-5)


def test_calibrate_threshold_separates_the_classes():
    pos, neg = np.array([2.0, 3.0, 2.5, 0.9]), np.array([0.0, 1.0, -1.0, 0.5])
    c = pj.calibrate(pos, neg)

    def f1(t):  # brute force over a fine grid of thresholds
        tp, fp = (pos > t).sum(), (neg > t).sum()
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + (pos.size - tp))
    best = max(f1(t) for t in np.linspace(-2, 4, 6001))
    assert c["direction"] == "above" and c["f1"] == pytest.approx(best) and f1(c["threshold"]) == pytest.approx(best)
    rule = lambda x: x > c["threshold"]  # noqa: E731
    assert rule(pos).sum() / 4 == pytest.approx(c["recall"]) and rule(neg).sum() / 4 == pytest.approx(c["fpr"])
    low = pj.calibrate(-pos, -neg)
    assert low["direction"] == "below" and low["threshold"] == pytest.approx(-c["threshold"])
    strict = pj.calibrate(pos, neg, target="fpr", max_fpr=0.0)
    assert strict["fpr"] == 0.0 and strict["threshold"] >= 1.0


@pytest.mark.parametrize("make, message", [
    (lambda v: pj.Guard(v[:, :5], 1, 0.0), "shape"),
    (lambda v: pj.Guard(v, 9, 0.0), "outside"),
    (lambda v: pj.Guard(v, 1, float("nan")), "NaN"),
    (lambda v: pj.Guard(v, 1, 0.0, action="clip"), "unknown guard action"),
    (lambda v: pj.Monitor(v[:2]), "shape"),
    (lambda v: pj.Steering(v, layer=1, coef=1.0, condition=pj.Condition(v[:2], 1, 0.0)), "condition vector has shape"),
    (lambda v: pj.Steering(v, layer=1, coef=1.0, condition=pj.Condition(v, 1, float("nan"))), "threshold is NaN"),
])
def test_bad_guard_and_monitor_are_one_clean_error(tiny, make, message):
    d, tm, model, tok, vecs = tiny
    bad = make(vecs[0])
    kw = ({"monitor": bad} if isinstance(bad, pj.Monitor) else {"steering": bad} if isinstance(bad, pj.Steering)
          else {"guard": bad})
    with pytest.raises(PersonaError, match=message):
        pj.generate(model, PROMPTS[:1], 2, **kw)


def test_bad_second_moment_and_calibration_sets():
    v = np.ones(4)
    with pytest.raises(PersonaError, match="shape"):
        pj.whiten(v, np.eye(5))
    with pytest.raises(PersonaError, match="symmetric"):
        pj.whiten(v, np.triu(np.ones((4, 4))))
    with pytest.raises(PersonaError, match="positive semi-definite"):
        pj.whiten(v, -np.eye(4))
    with pytest.raises(PersonaError, match="both classes"):
        pj.calibrate([1.0, 2.0], [])
    with pytest.raises(PersonaError, match="both classes"):
        pj.calibrate([], [0.5])


def test_a_conditioned_steering_is_refused_outside_generate(tiny):
    d, tm, model, tok, vecs = tiny
    s = pj.Steering(vecs[0], layer=1, coef=1.0, condition=pj.Condition(vecs[1], 1, 0.0))
    with pytest.raises(PersonaError, match="only in pj.generate"):
        pj.capture(model, ["a"], ["b"], steering=s)


@pytest.mark.parametrize("action", ["cap", "subtract"])
def test_teacher_forced_guard_in_capability_scoring_matches_hooked_transformers(tiny, action):
    """The guard of a teacher-forced capability call acts on each position that predicts a
    reply token, on its own state (what generating the reply would do)."""
    from persona_jax.method import capability as cap
    d, tm, model, tok, vecs = tiny
    v, layer = vecs[1], 2
    u = v[layer] / np.linalg.norm(v[layer])
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in ["yes it is", "no", "maybe so then"]]
    with torch.no_grad():  # the ceiling: the median projection over the positions the guard reads
        hs = [tm(input_ids=torch.tensor([p + c]), output_hidden_states=True).hidden_states[layer][0].numpy()
              for p, c in zip(prompts, conts)]
    ceiling = float(np.median(np.concatenate([h[len(p) - 1:-1] @ u for h, p in zip(hs, prompts)])))
    got = cap.score_continuations(model, prompts, conts, guard=pj.Guard(v, layer, ceiling, action, coef=2.0),
                                  batch_size=2)
    ref = []
    for p, c in zip(prompts, conts):
        lo, hi = len(p) - 1, len(p) + len(c) - 1

        def hook(mod, args, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            ut = torch.tensor(u)
            for t in range(lo, hi):
                exc = float(h[0, t] @ ut) - ceiling
                if exc > 0:
                    h[0, t] = h[0, t] - (exc * ut if action == "cap" else 2.0 * torch.tensor(v[layer]))
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handle = tm.model.layers[layer - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = tm(input_ids=torch.tensor([p + c])).logits[0].double()
        finally:
            handle.remove()
        logp = torch.log_softmax(logits, -1)
        ref.append(float(sum(logp[t, (p + c)[t + 1]] for t in range(lo, hi))))
    plain = cap.score_continuations(model, prompts, conts, batch_size=2)
    np.testing.assert_allclose(got, ref, atol=2e-4)
    assert np.abs(got - plain).max() > 1e-3  # the guard acted


def test_a_guard_acting_along_a_whitened_direction_matches_hooked_transformers(tiny):
    d, tm, model, tok, vecs = tiny
    v = vecs[1]
    sigma = pj.second_moment(model, ["some neutral text here", "and more of it"], layers=2)
    w = np.zeros_like(v)
    w[2] = pj.whiten(v[2], sigma, ridge=0.1)
    free = pj.generate(model, PROMPTS, 6, temperature=0, monitor=pj.Monitor(v, [2]))
    ceil = float(np.median(np.concatenate(free.projections)))
    for action in ("cap", "subtract"):
        out = pj.generate(model, PROMPTS, 6, temperature=0, batch_size=3,
                          guard=pj.Guard(v, 2, ceil, action, coef=1.5, direction=w), monitor=pj.Monitor(v, [2]))
        for i, ids in enumerate(ids_of(tok, PROMPTS)):
            toks, projs, fired, _, _ = reference(tm, ids, 6, guards=[(2, v, ceil, 1.5, action == "cap", w)],
                                                 mon=([2], v))
            assert out.tokens[i] == toks
            np.testing.assert_allclose(out.projections[i], projs, atol=1e-4)
            np.testing.assert_array_equal(out.guard_fired[i], fired)
        if action == "cap":  # the whitened cap still holds the projection on v at the ceiling
            assert max(p.max() for p in out.projections) <= ceil + 1e-4


def test_a_vector_keeps_its_second_moment_in_orbax(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    sigma = (x.T @ x / 50)[None].astype(np.float32)
    v = pj.PersonaVector(rng.normal(size=(4, 8)), "evil", second_moment=sigma, second_moment_layers=(2,))
    pj.save_vector(v, tmp_path / "v")
    back = pj.load_vector(tmp_path / "v")
    np.testing.assert_array_equal(back.sigma(2), sigma[0])
    np.testing.assert_allclose(pj.whiten(back.array[2], back.sigma(2)), pj.whiten(v.array[2], sigma[0]), rtol=1e-6)
    assert back.metadata["second_moment_layers"] == [2]
    pj.save_vector(pj.PersonaVector(v.array, "evil"), tmp_path / "plain")  # without one, as before
    assert pj.load_vector(tmp_path / "plain").second_moment is None
    with pytest.raises(PersonaError, match="no second moment at layer 1"):
        back.sigma(1)
    with pytest.raises(PersonaError, match="shape"):
        pj.PersonaVector(v.array, "evil", second_moment=sigma[:, :4], second_moment_layers=(2,))


def test_token_monitor_takes_a_generation_without_a_second_pass(tiny, tmp_path):
    """A generation's projections as `TokenTrace`s: reply token t's own state, checked
    against a teacher-forced transformers forward over prompt + reply."""
    from persona_jax.method import token_monitor as tmon
    d, tm, model, tok, vecs = tiny
    v, layer = vecs[0], 2
    out = pj.generate(model, PROMPTS[:2], 8, temperature=0, monitor=pj.Monitor(v, [layer, L]))
    traces = tmon.traces_from_generation(model, out, names=["a", "b"])
    u = v[layer] / np.linalg.norm(v[layer])
    for tr, ids, p_ids in zip(traces, out.tokens, ids_of(tok, PROMPTS[:2])):
        with torch.no_grad():
            hs = tm(input_ids=torch.tensor([p_ids + ids]), output_hidden_states=True).hidden_states
        want = hs[layer][0, len(p_ids):].numpy() @ u
        assert tr.projection.shape == (len(ids),) and np.isnan(tr.projection[-1])
        np.testing.assert_allclose(tr.projection[:-1], want[:-1], atol=1e-4)
        assert "".join(tr.pieces) == tr.text and np.isnan(tr.projections[1]).all()
    tmon.write_html(traces, str(tmp_path / "page.html"), "v")
    page = (tmp_path / "page.html").read_text()
    assert "<h2>a</h2>" in page and "nan" not in page.split("<h2>a</h2>")[0].lower()  # the scale ignores the NaN
    with pytest.raises(PersonaError, match="no projections"):
        tmon.traces_from_generation(model, pj.generate(model, PROMPTS[:1], 2, return_tokens=True))
