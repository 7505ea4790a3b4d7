"""The ragged decode-attention kernel (Pallas, interpret mode on CPU) against numpy."""
import numpy as np
import pytest

from persona_jax.model.decode_attention import ragged_decode_attention

S, BLK, HD = 32, 8, 8  # ring of 4 blocks


def _ring(rng, lengths, starts):
    """kv_valid / kv_pos for rows whose live columns are (start + i) mod S, i < length,
    holding positions 0..length-1 in ring order; the query sits at position length - 1."""
    b = len(lengths)
    valid = np.zeros((b, S), bool)
    pos = rng.integers(-50, 50, (b, S))  # garbage in dead columns: must be ignored
    for r, (n, st) in enumerate(zip(lengths, starts)):
        cols = (st + np.arange(n)) % S
        valid[r, cols] = True
        pos[r, cols] = np.arange(n)
    return valid, pos, np.asarray(lengths) - 1


def _numpy_attention(q, k, v, valid, pos, qpos, scale, softcap, window):
    b, hq, hd = q.shape
    kvh = k.shape[1]
    g = hq // kvh
    out = np.zeros_like(q, dtype=np.float64)
    for r in range(b):
        ok = valid[r] & ((window == 0) | (qpos[r] - pos[r] < window))
        for h in range(hq):
            kh = h // g
            s = (q[r, h].astype(np.float64) @ k[r, kh].astype(np.float64)) * scale
            if softcap:
                s = np.tanh(s / softcap) * softcap
            s = np.where(ok, s, -np.inf)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[r, h] = p @ v[r, kh].astype(np.float64)
    return out


# rows: full ring, partial from 0, partial wrapped past the end, length 1, wrapped full
LENGTHS, STARTS = [S, 11, 13, 1, S], [0, 0, 27, 5, 19]


@pytest.mark.parametrize("hq,kvh,softcap,window", [
    (4, 2, None, 0),     # GQA, groups of 2
    (4, 1, 30.0, 0),     # all heads on one KV head, Gemma 2 soft-cap
    (2, 2, None, 6),     # sliding window shorter than most rows
    (4, 2, 5.0, 9),      # soft-cap and window together
])
def test_kernel_equals_numpy(hq, kvh, softcap, window):
    rng = np.random.default_rng(hq * 10 + kvh + window)
    b = len(LENGTHS)
    q = rng.standard_normal((b, hq, HD)).astype(np.float32)
    k = rng.standard_normal((b, kvh, HD, S)).astype(np.float32) * 2
    v = rng.standard_normal((b, kvh, S, HD)).astype(np.float32)
    valid, pos, qpos = _ring(rng, LENGTHS, STARTS)
    span = np.stack([STARTS, LENGTHS], axis=1)
    scale = HD ** -0.5
    got = ragged_decode_attention(q, k, v, valid, pos, qpos, span, scale=scale,
                                  softcap=softcap, window=window, block=BLK, interpret=True)
    want = _numpy_attention(q, k, v, valid, pos, qpos, scale, softcap, window)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_span_prunes_columns_outside_it():
    """Columns outside the span are never read: poisoning them (NaN) changes nothing."""
    rng = np.random.default_rng(0)
    b, hq, kvh = 2, 2, 1
    lengths, starts = [5, 10], [30, 3]  # the first wraps (blocks 3 and 0), the second in blocks 0-1
    q = rng.standard_normal((b, hq, HD)).astype(np.float32)
    k = rng.standard_normal((b, kvh, HD, S)).astype(np.float32)
    v = rng.standard_normal((b, kvh, S, HD)).astype(np.float32)
    valid, pos, qpos = _ring(rng, lengths, starts)
    want = _numpy_attention(q, k, v, valid, pos, qpos, 1.0, None, 0)
    k[0, :, :, 8:24] = np.nan  # blocks 1-2 of row 0: outside its span
    v[1, :, 16:, :] = np.nan  # blocks 2-3 of row 1
    got = ragged_decode_attention(q, k, v, valid, pos, qpos, np.stack([starts, lengths], 1),
                                  scale=1.0, block=BLK, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
