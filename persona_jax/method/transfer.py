"""A persona vector from one model applied to another (issue 26): direct when the two
share width and depth (base -> instruct, checkpoint -> checkpoint), else through a
linear map of the residual stream fitted on paired activations.

* layers are matched by relative depth: target hidden state l_t reads source hidden
  state round(l_t * L_src / L_tgt);
* the map of a matched pair is fitted on the same neutral texts run through both models,
  token by token (the two tokenizers must give the same ids), centred (a direction maps by
  the linear part only): ridge least squares, W = (Xc'Xc + lambda I)^-1 Xc'Yc with lambda
  relative to the mean eigenvalue of Xc'Xc, or orthogonal Procrustes (equal widths),
  W = U V' from the SVD of Xc'Yc;
* its fit is the R^2 of Yc predicted on held-out texts (not used to fit), over all
  target features. A map is only determined on the span of the states it was fitted on:
  hidden state 0 (the embeddings) spans just the texts' own tokens, so its row of a mapped
  vector is reliable only for tokens the texts hold.
The mapped vector is v_src[l_s] @ W per target layer, optionally rescaled row by row to
the norm the target's own hidden states have relative to the source's (the follow-up's
rescaling).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from persona_jax.errors import PersonaError
from persona_jax.runtime import batching
from persona_jax.runtime.forward import forward
from persona_jax.runtime.generate import tokenize

KINDS = ("ridge", "procrustes")


def match_layers(src_layers: int, tgt_layers: int) -> list[int]:
    """For each target hidden state 0..L_tgt, the source hidden state at the nearest
    relative depth (0 -> 0, L_tgt -> L_src)."""
    if src_layers < 1 or tgt_layers < 1:
        raise PersonaError(f"layer counts must be >= 1; got {src_layers} and {tgt_layers}")
    return [int(np.floor(l * src_layers / tgt_layers + 0.5)) for l in range(tgt_layers + 1)]


@dataclasses.dataclass
class LayerMap:
    """The fitted map of one (source, target) hidden-state pair: y_c ~ x_c @ weight, with
    x_c = x - x_mean, y_c = y - y_mean; r2 on the held-out texts."""

    src_layer: int
    tgt_layer: int
    kind: str
    weight: np.ndarray  # [D_src, D_tgt]
    x_mean: np.ndarray
    y_mean: np.ndarray
    r2: float
    norm_ratio: float  # mean |y| / mean |x| over the fitting tokens


def fit_map(x: np.ndarray, y: np.ndarray, kind: str = "ridge", ridge: float = 1e-3,
            holdout: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(weight [D_x, D_y], x_mean, y_mean, held-out R^2) of a centred linear map x -> y.

    x: [N, D_x], y: [N, D_y] paired rows; kind "ridge" or "procrustes" (D_x == D_y);
    ridge: lambda relative to the mean eigenvalue of Xc'Xc / N; holdout: (x, y) rows not
    used to fit (R^2 = 1 - SSE / SST over every target feature), or None (R^2 on the fit)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise PersonaError(f"a map needs paired rows [N, D] with N >= 2; got {x.shape} and {y.shape}")
    if kind not in KINDS:
        raise PersonaError(f"unknown map kind {kind!r}; use one of: {', '.join(KINDS)}")
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    if kind == "procrustes":
        if x.shape[1] != y.shape[1]:
            raise PersonaError(f"orthogonal Procrustes needs equal widths; got {x.shape[1]} and {y.shape[1]} (use ridge)")
        u, _, vt = np.linalg.svd(xc.T @ yc)
        w = u @ vt
    else:
        if not (np.isfinite(ridge) and ridge >= 0):
            raise PersonaError(f"ridge must be a finite number >= 0; got {ridge}")
        gram = xc.T @ xc
        lam = ridge * max(np.trace(gram) / gram.shape[0], 1e-12)
        w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc)
    hx, hy = (x, y) if holdout is None else (np.asarray(holdout[0], np.float64), np.asarray(holdout[1], np.float64))
    pred = (hx - xm) @ w + ym
    sst = float(((hy - hy.mean(0)) ** 2).sum())
    r2 = 1.0 - float(((hy - pred) ** 2).sum()) / max(sst, 1e-30)
    return w.astype(np.float32), xm.astype(np.float32), ym.astype(np.float32), r2


def token_states(model, texts: Sequence[str], layers: Sequence[int], batch_size: int = 8) -> tuple[list, np.ndarray]:
    """(token ids per text, [len(layers), tokens, D] float32 hidden states of every real
    token of every text, in order), state L after the final norm (HF convention)."""
    ids = tokenize(model, list(texts))
    out = [[] for _ in layers]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        tokens, mask = batching.pad_rows(chunk, max(map(len, chunk)), model.pad_token_id, left=False)
        hidden = np.asarray(forward(model, tokens, mask).hidden_states, np.float32)  # [L+1, B, T, D]
        for j, l in enumerate(layers):
            out[j].extend(hidden[l, i, : len(s)] for i, s in enumerate(chunk))
    return ids, np.stack([np.concatenate(o) for o in out])


def fit_maps(src_model, tgt_model, texts: Sequence[str], kind: str = "ridge", ridge: float = 1e-3,
             holdout_fraction: float = 0.25, batch_size: int = 8) -> list[LayerMap]:
    """One `LayerMap` per target hidden state 0..L_tgt (`match_layers`), fitted on the
    tokens of the first texts and scored on the last `holdout_fraction` of them. Both
    models must tokenize every text to the same ids (token-level pairing)."""
    texts = list(texts)
    n_hold = int(round(len(texts) * holdout_fraction))
    if len(texts) - n_hold < 2 or (holdout_fraction > 0 and n_hold < 1):
        raise PersonaError(f"fitting a map needs more texts: {len(texts)} give {len(texts) - n_hold} to fit and "
                           f"{n_hold} held out")
    match = match_layers(src_model.num_layers, tgt_model.num_layers)
    src_layers = sorted(set(match))
    ids_s, xs = token_states(src_model, texts, src_layers, batch_size)
    ids_t, ys = token_states(tgt_model, texts, list(range(tgt_model.num_layers + 1)), batch_size)
    bad = [i for i, (a, b) in enumerate(zip(ids_s, ids_t)) if a != b]
    if bad:
        raise PersonaError(f"the two models tokenize text {bad[0]} differently; token-level maps need one tokenizer")
    n_fit_tok = sum(len(s) for s in ids_s[: len(texts) - n_hold])
    maps = []
    for lt, ls in enumerate(match):
        x, y = xs[src_layers.index(ls)], ys[lt]
        hold = None if n_hold == 0 else (x[n_fit_tok:], y[n_fit_tok:])
        w, xm, ym, r2 = fit_map(x[:n_fit_tok], y[:n_fit_tok], kind, ridge, hold)
        ratio = float(np.linalg.norm(y[:n_fit_tok], axis=1).mean() / max(np.linalg.norm(x[:n_fit_tok], axis=1).mean(), 1e-30))
        maps.append(LayerMap(ls, lt, kind, w, xm, ym, r2, ratio))
    return maps


def transfer_vector(vector, maps: Optional[Sequence[LayerMap]] = None, rescale: bool = False,
                    tgt_shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """The source vector [L_src+1, D_src] (or a `PersonaVector`) on the target's layers:
    row l_t = v[l_s] @ W (maps, one per target hidden state), or v itself when `maps` is
    None (same width and depth: `tgt_shape` checks it). rescale: multiply each row by the
    target's hidden-state norm over the source's at that pair (`LayerMap.norm_ratio`)."""
    v = np.asarray(getattr(vector, "array", vector), np.float32)
    if v.ndim != 2:
        raise PersonaError(f"a persona vector has shape [layers+1, hidden]; got {tuple(v.shape)}")
    if maps is None:
        if tgt_shape is not None and tuple(tgt_shape) != v.shape:
            raise PersonaError(f"direct transfer needs the same width and depth: the vector is {v.shape}, the "
                               f"target needs {tuple(tgt_shape)}; fit maps (fit_maps) for another shape")
        return v.copy()
    out = []
    for m in maps:
        if not 0 <= m.src_layer < v.shape[0] or m.weight.shape[0] != v.shape[1]:
            raise PersonaError(f"the map of target layer {m.tgt_layer} reads source layer {m.src_layer} of width "
                               f"{m.weight.shape[0]}; the vector is {v.shape}")
        row = v[m.src_layer] @ m.weight
        out.append(row * m.norm_ratio if rescale else row)
    return np.stack(out).astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [L+1, D] vectors (NaN where a row is zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (a * b).sum(-1) / n, np.nan)
