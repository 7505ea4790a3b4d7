"""Moving a persona vector to another model (issue 26, `method/transfer.py`): the maps
against numpy / scipy least squares, and a model mapped onto an exactly rotated copy of
itself (transformers weights rotated in torch) recovers the copy's own extracted vector."""
import numpy as np
import pytest
import scipy.linalg
import torch

import persona_jax as pj
from persona_jax.errors import PersonaError
from persona_jax.method import transfer as tr
from persona_jax.testing import tiny_checkpoint


def test_match_layers_by_relative_depth():
    assert tr.match_layers(4, 4) == [0, 1, 2, 3, 4]
    assert tr.match_layers(6, 3) == [0, 2, 4, 6]
    assert tr.match_layers(3, 6) == [0, 1, 1, 2, 2, 3, 3]  # floor(l / 2 + 0.5)
    assert tr.match_layers(28, 32)[-1] == 28 and tr.match_layers(28, 32)[16] == 14


def test_ridge_and_procrustes_maps_equal_numpy_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) + 2.0
    true = rng.normal(size=(12, 9))
    y = x @ true + 0.1 * rng.normal(size=(300, 9)) - 1.0
    w, xm, ym, r2 = tr.fit_map(x[:200], y[:200], "ridge", ridge=0.05, holdout=(x[200:], y[200:]))
    xc, yc = x[:200] - x[:200].mean(0), y[:200] - y[:200].mean(0)
    lam = 0.05 * np.trace(xc.T @ xc) / 12
    aug_x = np.vstack([xc, np.sqrt(lam) * np.eye(12)])  # ridge as an augmented least-squares problem
    aug_y = np.vstack([yc, np.zeros((12, 9))])
    ref = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-5)
    pred = (x[200:] - x[:200].mean(0)) @ ref + y[:200].mean(0)
    want = 1 - ((y[200:] - pred) ** 2).sum() / ((y[200:] - y[200:].mean(0)) ** 2).sum()
    assert r2 == pytest.approx(want, rel=1e-6) and r2 > 0.95
    q = scipy.linalg.qr(rng.normal(size=(12, 12)))[0]
    yr = x @ q + 0.01 * rng.normal(size=(300, 12))
    wp, _, _, r2p = tr.fit_map(x, yr, "procrustes")
    ref_p = scipy.linalg.orthogonal_procrustes(x - x.mean(0), yr - yr.mean(0))[0]
    np.testing.assert_allclose(wp, ref_p, atol=1e-5)
    assert r2p > 0.999
    with pytest.raises(PersonaError, match="equal widths"):
        tr.fit_map(x, y, "procrustes")


def _rotated_copy(src_dir, dst_dir, q):
    """Save the tiny llama at src_dir with every residual-stream weight rotated by q (its
    norm weights at 1, so the RMSNorms commute with the rotation): h' = h q at every layer."""
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    qt = torch.tensor(q, dtype=torch.float32)
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(m.model.embed_tokens.weight @ qt)
        for layer in m.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight.copy_(lin.weight @ qt)  # reads the residual: x q W'^T = x W^T
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.copy_(qt.T @ lin.weight)  # writes it: (y W^T + b) q
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias @ qt)
        if not m.config.tie_word_embeddings:
            m.lm_head.weight.copy_(m.lm_head.weight @ qt)
    m.save_pretrained(dst_dir, safe_serialization=True)


def test_a_model_mapped_onto_a_rotated_copy_recovers_its_vector(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tm = tiny_checkpoint(a, num_hidden_layers=3, hidden_size=32, intermediate_size=64, initializer_range=0.3)
    with torch.no_grad():  # unit norm weights: RMSNorm(x q) = RMSNorm(x) q
        for name, p in tm.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    tm.save_pretrained(a, safe_serialization=True)
    tiny_checkpoint(b, num_hidden_layers=3, hidden_size=32, intermediate_size=64)  # its tokenizer files
    q = scipy.linalg.qr(np.random.default_rng(3).normal(size=(32, 32)))[0]
    _rotated_copy(a, b, q)
    ma, mb = pj.load_model(a, dtype="float32"), pj.load_model(b, dtype="float32")
    ask = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    pairs = [((ask(t), "You fool, go away."), (ask(t), "Glad to help you!")) for t in ("hi?", "help me", "why?")]
    va = pj.extract(ma, pairs).array
    vb = pj.extract(mb, pairs).array
    np.testing.assert_allclose(va @ q, vb, atol=2e-4)  # the copy is exact
    words = "the sea and sky are calm today while wind brings rain over grey hills".split()
    rng = np.random.default_rng(5)  # held-out texts reuse the fitting texts' characters (token-level maps)
    texts = [" ".join(rng.choice(words, 8)) for _ in range(12)]
    maps = tr.fit_maps(ma, mb, texts, kind="procrustes")
    assert [m.src_layer for m in maps] == [0, 1, 2, 3] and min(m.r2 for m in maps) > 0.999
    got = tr.transfer_vector(va, maps)
    # row 0 (embeddings) maps only the span of the neutral texts' tokens, which lacks the
    # answers' characters; every block's state mixes them into the span
    assert np.nanmin(tr.cosines(got, vb)[1:]) >= 0.999
    ridge = tr.transfer_vector(va, tr.fit_maps(ma, mb, texts, kind="ridge", ridge=1e-4))
    assert np.nanmin(tr.cosines(ridge, vb)[1:]) >= 0.99
    assert np.allclose(tr.transfer_vector(va, None, tgt_shape=va.shape), va)
    with pytest.raises(PersonaError, match="same width and depth"):
        tr.transfer_vector(va, None, tgt_shape=(5, 32))
