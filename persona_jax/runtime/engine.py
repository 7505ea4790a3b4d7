"""Continuous batching: a fixed pool of decode slots fed by prefill -> insert -> generate.

The pattern of the JAX serving engines (JetStream, MaxText's inference), written for
this package's decoder and interventions:

* `insert`: a small batch of waiting requests (prompt widths bucketed) is prefilled with
  the scanned decoder, its first tokens are sampled, and its KV rows, positions,
  `kv_valid`, sampling parameters, PRNG keys and steering rows are written into free
  slots of one stacked state (cache [L, slots, ...]).
* `decode`: a jitted `lax.while_loop` of single-token steps over every slot, on device,
  for at most `chunk` steps; it returns early once `stop_at` slots are done (the host
  has requests waiting for them) or every slot is done.
* the host loop (`Engine.run`) streams finished rows out and refills free slots.

One copy of the weights: on CPU a decode step takes each layer's weights as arrays that
alias the stacked [L, ...] params (`model.layer_views`; slicing inside the program would
copy them), with per-layer KV caches; elsewhere it runs the blocks in a `lax.scan` over
the stacked params, with the whole KV cache in the scan carry, each block writing only
its new token's column (`decoder._slot_cache_update`), so no step copies the cache
through scan inputs / outputs.

Every request carries its own input index (its PRNG key is
`fold_in(PRNGKey(seed), index)`, then `fold_in(key, step)` per new token, as the static
path keys them), sampling parameters, token limits and steering row, so results are a
deterministic function of (seed, request index): they do not depend on the slot count,
the arrival order or the other requests.

Not covered: longrope checkpoints (Phi-3 128k) whose rows cross
`rope_original_max_position` recompute the whole sequence at that step; `generate`
sends those to the static path (`generate.generate_arrays`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from persona_jax.model import sharding as sh
from persona_jax.model.decoder import Block, Embedding, empty_cache, head_kernel, lm_logits, norm
from persona_jax.model.layer_views import layer_views
from persona_jax.runtime import apply, batching, closed_loop, executable_store
from persona_jax.runtime.closed_loop import ControlSpec
from persona_jax.runtime.sampling import SamplingParams, _filter_logits
from persona_jax.steering import interceptor as iv
from persona_jax.steering import sites
from persona_jax.steering.sites import Layout


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """The static shape of an engine (part of its compiled programs).

    slots: decode slots (a multiple of the mesh's data axis); cache_len: KV columns per
    slot (>= the widest prefill bucket + the largest max_new_tokens); max_new: width of
    the per-slot output buffer; greedy / use_top_k / use_top_p: which sampling code is
    compiled (per-slot temperature, top_k, top_p are dynamic); eos_ids, pad_id.
    """

    slots: int
    cache_len: int
    max_new: int
    greedy: bool
    use_top_k: bool
    use_top_p: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    layer_loop: str = "unrolled"  # "unrolled" | "scan", see `decode_logits`
    control: "ControlSpec | None" = None  # monitor / guards / conditions (then layer_loop is "unrolled")


def default_layer_loop() -> str:
    """The faster layer loop for this backend: "unrolled" on CPU, "scan" elsewhere (where a
    deep model then compiles one block). Measured for decode (benchmarks/engine_ragged.py:
    a rolled loop copies a dynamic slice of the stacked cache before the attention dot)
    and for the trainer's step (benchmarks/train_step.py: its backward pass copies each
    layer's saved activations)."""
    return "unrolled" if jax.default_backend() == "cpu" else "scan"


@dataclasses.dataclass
class Request:
    """One sequence to generate.

    ids: prompt token ids; index: the input index (PRNG key and steering row);
    max_new_tokens / min_new_tokens: its own limits; temperature (0 = greedy), top_k
    (0 = off), top_p (1.0 = off).
    """

    ids: Sequence[int]
    index: int
    max_new_tokens: int
    min_new_tokens: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


# ----------------------------------------------------------------------------- sampling
def pick_rows(logits, keys, step, temperature, top_k, top_p, min_new, spec: EngineSpec):
    """Next tokens [B] from logits [B, V], every sampling parameter per row ([B]).
    The same computation as `sampling._pick` row by row (same keys, same filters)."""
    logits = logits.astype(jnp.float32)
    if spec.eos_ids:
        eos = jnp.isin(jnp.arange(logits.shape[-1]), jnp.asarray(spec.eos_ids))
        logits = jnp.where((step < min_new)[:, None] & eos[None], jnp.finfo(jnp.float32).min, logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if spec.greedy:
        return greedy
    filt = _filter_logits(logits, temperature[:, None], top_k, top_p,
                          dataclasses.replace(_FILTER, use_top_k=spec.use_top_k, use_top_p=spec.use_top_p))
    step_keys = jax.vmap(jax.random.fold_in)(keys, step)
    sampled = jax.vmap(jax.random.categorical)(step_keys, filt).astype(jnp.int32)
    return jnp.where(temperature == 0, greedy, sampled)


_FILTER = SamplingParams(1, False, False, False, (), 0)


# ----------------------------------------------------------------------------- state
# slot axis of each state entry (the axis split over the mesh's data axis)
def _slot_axis(path) -> int:
    names = [str(getattr(k, "key", k)) for k in path]
    if names[0] == "cache":
        return 1 if names[1] in ("k", "v") else 0  # stacked [L, S, ...] or per layer [S, ...]
    if names[-1] in ("add_coef", "abl_coef"):
        return 2
    if names[-1] in ("add_vec", "abl_dir"):
        return -1  # shared, replicated
    if names[0] == "dpos":
        return 1
    if names[0] == "ctl":
        if names[-1] in ("grd_ceil", "grd_coef"):
            return 1
        if names[-1].endswith("_dir") or names[-1] in ("grd_vec", "grd_act"):
            return -1  # shared, replicated
    return 0


def _state_specs(state, mesh):
    def spec(path, x):
        ax = _slot_axis(path)
        if mesh is None or ax < 0 or x.ndim == 0:
            return P()
        s = [None] * x.ndim
        s[ax] = "data"
        return P(*s)
    return jax.tree_util.tree_map_with_path(spec, state)


def init_state(config, spec: EngineSpec, dtype, steer_template=None, dpos_template=None, mesh=None,
               ctl_template=None):
    """An empty engine state (every slot done): a dict of arrays, slots on the data axis.

    steer_template: `steering_arrays(...)` for `spec.slots` rows (vectors and zero
    coefficients) or None; dpos_template: decode position masks [K, slots, 1] or None;
    ctl_template: the control's shared directions {mon_dir [M, D], grd_dir, grd_vec,
    grd_act [G, D], cnd_dir [C, D]} (`closed_loop.Plan.shared`, with `spec.control`) or None.
    """
    s, c = spec.slots, spec.cache_len

    def control(shared):
        cs = spec.control
        m, g, nc = len(cs.monitor_layers), len(cs.guard_layers), len(cs.cond_layers)
        return {**shared,
                "grd_ceil": jnp.full((g, s), jnp.inf, jnp.float32), "grd_coef": jnp.zeros((g, s), jnp.float32),
                "mon": jnp.zeros((s, spec.max_new, m), jnp.float32),  # row i: the state token i came from
                "pmon": jnp.zeros((s, 2, m), jnp.float32),  # prompt_last, prompt_avg
                "fired": jnp.zeros((s, spec.max_new, g), bool),
                "gate": jnp.zeros((s, nc), bool)}

    def make():
        cache = empty_cache(config, s, c, dtype)
        if spec.layer_loop == "unrolled":
            cache = [{"k": cache["k"][l], "v": cache["v"][l]} for l in range(config.num_layers)]
        return {
            "cache": cache,
            "t": jnp.zeros((), jnp.int32),  # decode steps so far: step t writes column t % cache_len
            "kv_valid": jnp.zeros((s, c), bool),
            "kv_pos": jnp.zeros((s, c), jnp.int32),
            "n_prompt": jnp.zeros((s,), jnp.int32),
            "n": jnp.zeros((s,), jnp.int32),  # tokens generated so far
            "last": jnp.full((s,), spec.pad_id, jnp.int32),
            "done": jnp.ones((s,), bool),
            "out": jnp.full((s, spec.max_new), spec.pad_id, jnp.int32),
            "keys": jnp.zeros((s, 2), jnp.uint32),
            "temperature": jnp.ones((s,), jnp.float32),
            "top_k": jnp.zeros((s,), jnp.int32),
            "top_p": jnp.ones((s,), jnp.float32),
            "min_new": jnp.ones((s,), jnp.int32),
            "max_new": jnp.ones((s,), jnp.int32),
            "steer": jax.tree.map(jnp.asarray, steer_template),
            "dpos": jax.tree.map(jnp.asarray, dpos_template),
            "ctl": None if spec.control is None else control(jax.tree.map(jnp.asarray, ctl_template)),
        }

    templates = (steer_template or {}, dpos_template or {}, ctl_template or {})
    key = (config, spec, jnp.dtype(dtype).name, mesh, jax.tree.structure(templates),
           tuple((np.shape(x), np.asarray(x).dtype.name) for x in jax.tree.leaves(templates)))
    if key not in _INIT_CACHE:
        def maker(templates):
            nonlocal steer_template, dpos_template, ctl_template
            steer_template, dpos_template, ctl_template = templates
            return make()
        if mesh is None:  # committed to the device, as insert's and decode's outputs are:
            # an uncommitted first state would compile the first insert a second time
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            _INIT_CACHE[key] = jax.jit(maker, out_shardings=dev)
        else:
            shapes = jax.eval_shape(maker, templates)
            shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), _state_specs(shapes, mesh))
            _INIT_CACHE[key] = jax.jit(maker, out_shardings=shardings)
    return _INIT_CACHE[key](templates)


_INIT_CACHE: dict = {}


def state_bytes(state) -> dict:
    """Bytes held by the engine state: {"kv": the KV cache, "other": the rest}."""
    kv = sum(x.nbytes for x in jax.tree.leaves(state["cache"]))
    return {"kv": kv, "other": sum(x.nbytes for x in jax.tree.leaves(state)) - kv}


# ----------------------------------------------------------------------------- decode
def _layer_rows(interventions, num_layers: int) -> dict:
    """The blocks' `interventions` collections stacked [L, ...] (scan inputs): row l + 1
    of the hidden site, row l of attn / mlp (what `apply.layer_variables(l)` gives)."""
    rows, _ = apply.split_sites(interventions, None)
    out = {}
    for name, arrays in rows.items():
        r = {k: (v[1:] if name == "hidden" else v)[:num_layers] for k, v in arrays.items()}
        path = {"hidden": (), "attn": ("self_attn",), "mlp": ("mlp",)}[name]
        out = sites.merge(out, Layout(((path, None),)).place(name, {k: v[None] for k, v in r.items()}))
    return out


def _has_layer_views(params) -> bool:
    """params["layers"] is a list of per-layer views (`layer_views`), not the stacked tree."""
    return isinstance(params["layers"], (list, tuple))


def decode_logits(config, params, tokens, ctx, cache, interventions=None, layer_loop: str = "unrolled",
                  ring: bool = True, control=None, cspec: ControlSpec | None = None):
    """One decode call of every slot, the weights read from the stacked params (no copy of
    the model): params["layers"] is the stacked tree, sliced inside the step one layer at a
    time, or (layer_loop "unrolled") a list of per-layer trees from `layer_views.layer_views`,
    which alias the stacked buffers (on CPU a slice inside the program is a copy).

    tokens: [B, 1]; ctx: `make_ctx` with `cache_index` (the column every row writes) plus
    decode position masks; interventions: [L+1, ...] arrays with per-row coefficients, or None.
    layer_loop "unrolled": cache is a list of per-layer {k: [B, KV, hd, S], v: [B, KV, S, hd]}
      and the blocks are unrolled (compile time grows with depth, as the static path's);
    layer_loop "scan": cache is the stacked {k: [L, B, KV, hd, S], v: [L, B, KV, S, hd]},
      carried whole through a `lax.scan` over the layers, each writing its new column in
      place (no cache through scan inputs / outputs).
    ring=False (unrolled only): a plain cache written from `cache_index` on, the engine's
    prefill over per-layer views (tokens [B, P]).
    control / cspec (unrolled only): closed-loop control arrays (the state's "ctl":
    unit directions, per-row guard ceilings and coefficients) and their `ControlSpec`.
    Returns (logits [B, V] float32 of the last position, the updated cache, the control's
    records {fired [G, B], mon [M, B, T], cnd [C, B, T]}, or {} without control).
    """
    c = config
    dtype = params["embed_tokens"]["embedding"].dtype
    _, calls = apply.split_sites(interventions, ctx)

    def variables(p, row):
        return {"params": p, "interventions": row} if row else {"params": p}

    outs: dict = {}
    ctl_on = cspec is not None and control is not None
    final = lambda x: norm(c, dtype).apply({"params": params["norm"]}, x)  # noqa: E731
    at = lambda l, h: (closed_loop.at_hidden(l, h, control, cspec, outs, final if l == c.num_layers else None)  # noqa: E731
                       if ctl_on else h)
    if ctl_on and layer_loop != "unrolled":
        raise ValueError("closed-loop control runs with layer_loop='unrolled'")
    with iv.active(apply.SITES, None, calls):
        h = Embedding(c, dtype).apply(variables(params["embed_tokens"], apply.embed_variables(interventions)),
                                      tokens, ctx)
        h = at(0, h)
        if layer_loop == "unrolled":
            layers, per_layer = params["layers"], _has_layer_views(params)  # views: no slicing in the program
            new_cache = []
            for l in range(c.num_layers):
                lp = layers[l] if per_layer else jax.tree.map(lambda x: x[l], layers)
                layer_in = {"window": jnp.asarray(c.layer_windows[l], jnp.int32),
                            "cache": {**cache[l], "ring": True} if ring else cache[l]}
                h, nc = Block(c, dtype).apply(variables(lp, apply.layer_variables(interventions, l)), h,
                                              layer_in, ctx)
                h = at(l + 1, h)
                new_cache.append({"k": nc["k"], "v": nc["v"]})
        else:
            def body(carry, xs):
                h, k, v = carry
                lp, row, window, l = xs
                layer_in = {"window": window, "cache": {"k": k, "v": v, "layer": l, "ring": True}}
                h, nc = Block(c, dtype).apply(variables(lp, row), h, layer_in, ctx)
                return (h, nc["k"], nc["v"]), None

            xs = (params["layers"], _layer_rows(interventions, c.num_layers),
                  jnp.asarray(c.layer_windows, jnp.int32), jnp.arange(c.num_layers, dtype=jnp.int32))
            (h, k, v), _ = jax.lax.scan(body, (h, cache["k"], cache["v"]), xs)
            new_cache = {"k": k, "v": v}
    records = closed_loop.records(cspec, outs, *tokens.shape) if ctl_on else {}
    h = final(h[:, -1])
    return lm_logits(c, h, head_kernel(c, params)), new_cache, records


def _decode(config, spec: EngineSpec, chunk: int, params, state, stop_at):
    s = spec.slots
    rows = jnp.arange(s)
    eos = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,))

    def cond(carry):
        i, st = carry
        return (i < chunk) & (jnp.sum(st["done"]) < stop_at)

    def body(carry):
        i, st = carry
        st = dict(st)
        live = ~st["done"]
        col = st["t"] % spec.cache_len  # every row writes `last`, the token fed now, here
        pos = st["n_prompt"] + st["n"] - 1
        kv_valid = jax.lax.dynamic_update_slice(st["kv_valid"], live[:, None], (0, col))
        kv_pos = jax.lax.dynamic_update_slice(st["kv_pos"], pos[:, None], (0, col))
        ctx = apply.make_ctx(jnp.ones((s, 1), jnp.int32), positions=pos[:, None],
                             cache_index=col, kv_valid=kv_valid, kv_pos=kv_pos)
        ctx.update(st["dpos"])
        logits, cache, rec = decode_logits(config, params, st["last"][:, None], ctx, st["cache"],
                                           st["steer"] or None, spec.layer_loop, control=st["ctl"],
                                           cspec=spec.control)
        nxt = pick_rows(logits, st["keys"], st["n"], st["temperature"], st["top_k"], st["top_p"],
                        st["min_new"], spec)
        nxt = jnp.where(live, nxt, spec.pad_id)
        at_n = jnp.where(live, st["n"], spec.max_new)  # the output index of the token made now
        st["out"] = st["out"].at[rows, at_n].set(nxt, mode="drop")
        if spec.control is not None:  # the state token n was sampled from: this step's
            ctl = dict(st["ctl"])
            ctl["mon"] = ctl["mon"].at[rows, at_n].set(rec["mon"][:, :, -1].T, mode="drop")
            ctl["fired"] = ctl["fired"].at[rows, at_n].set(rec["fired"].T, mode="drop")
            st["ctl"] = ctl
        n = st["n"] + live.astype(jnp.int32)
        st.update(cache=cache, kv_valid=kv_valid, kv_pos=kv_pos, t=st["t"] + 1, n=n, last=jnp.where(live, nxt, st["last"]),
                  done=st["done"] | jnp.isin(nxt, eos) | (n >= st["max_new"]))
        return i + 1, st

    return jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), state))[1]


@executable_store.stored_jit(static_argnames=("config", "spec", "chunk"), donate_argnames=("state",))
def decode(config, params, state, stop_at, *, spec: EngineSpec, chunk: int):
    """Up to `chunk` decode steps of every slot, on device; returns early once at least
    `stop_at` slots are done. Returns the new state (the old one is donated)."""
    return sh.auto_axes_call(lambda p, st, a: _decode(config, spec, chunk, p, st, a),
                             (params, state, stop_at), lambda: _state_specs(state, _mesh_of(state)))


def _mesh_of(state):
    return sh.explicit_mesh(state)


# ----------------------------------------------------------------------------- insert
def _insert(config, spec: EngineSpec, params, state, tokens, mask, slot_ids, index, base_key, temperature, top_k,
            top_p, min_new, max_new, steer, prefill_pos, dpos, ctl_rows):
    b, p = tokens.shape
    cs = spec.control
    keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(index)  # as the static path keys its rows
    dtype = params["embed_tokens"]["embedding"].dtype
    ctx, n_prompt, _ = apply.prefill_ctx(mask, p)
    ctx.update(prefill_pos or {})
    empty = empty_cache(config, b, p, dtype)
    prefill_steer = steer
    if cs is not None and steer:  # a conditioned term does not act on the prompt
        prefill_steer = dict(steer)
        for key, terms in (("add_coef", cs.add_cond), ("abl_coef", cs.abl_cond)):
            if key in steer and any(t >= 0 for t in terms):
                keep = jnp.asarray([t < 0 for t in terms], steer[key].dtype)
                prefill_steer[key] = steer[key] * keep[None, :, None]
    rec = None
    if _has_layer_views(params) or cs is not None:  # per-layer views (CPU): no weight slice copies;
        # control reads and acts between the blocks, so it takes this loop everywhere
        control = None if cs is None else {**state["ctl"], **{k: v for k, v in ctl_rows.items() if k != "cnd_thr"}}
        last, per_layer, rec = decode_logits(
            config, params, tokens, ctx, [{"k": empty["k"][l], "v": empty["v"][l]} for l in range(config.num_layers)],
            prefill_steer or None, "unrolled", ring=False, control=control, cspec=cs)
        cache = {"k": [x["k"] for x in per_layer], "v": [x["v"] for x in per_layer]}
    else:
        logits, _, cache = apply.decoder_apply(config, params, tokens, ctx, interventions=prefill_steer or None,
                                               cache=empty, logits="last")
        last = logits[:, -1]
    first = pick_rows(last, keys, jnp.zeros((b,), jnp.int32), temperature, top_k, top_p, min_new, spec)
    # the prompt takes the p columns before the write head (the ring wraps), so the
    # slot's next decode step writes column t % cache_len right after it
    cols = (state["t"] - p + jnp.arange(p)) % spec.cache_len
    eos = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,))
    st = dict(state)
    put = lambda x, v: x.at[slot_ids].set(v, mode="drop")  # noqa: E731
    rows2, cols2 = slot_ids[:, None], cols[None, :]

    def put_cols(x, upd, slot_ax, col_ax):  # x[.., slot, .., col, ..] = upd (rows x prompt columns)
        idx = [slice(None)] * x.ndim
        idx[slot_ax], idx[col_ax] = rows2, cols2
        return x.at[tuple(idx)].set(jnp.moveaxis(upd, (slot_ax, col_ax), (0, 1)), mode="drop")

    if spec.layer_loop == "unrolled":
        st["cache"] = [{"k": put_cols(st["cache"][l]["k"], cache["k"][l], 0, 3),
                        "v": put_cols(st["cache"][l]["v"], cache["v"][l], 0, 2)} for l in range(config.num_layers)]
    else:
        st["cache"] = {"k": put_cols(st["cache"]["k"], cache["k"], 1, 4),
                       "v": put_cols(st["cache"]["v"], cache["v"], 1, 3)}
    kv_valid = jnp.zeros((b, spec.cache_len), bool).at[:, cols].set(mask.astype(bool))
    kv_pos = jnp.zeros((b, spec.cache_len), jnp.int32).at[:, cols].set(ctx["positions"])
    out = jnp.full((b, spec.max_new), spec.pad_id, jnp.int32).at[:, 0].set(first)
    st.update(kv_valid=put(st["kv_valid"], kv_valid), kv_pos=put(st["kv_pos"], kv_pos),
              n_prompt=put(st["n_prompt"], n_prompt),
              n=put(st["n"], jnp.ones((b,), jnp.int32)), last=put(st["last"], first),
              done=put(st["done"], jnp.isin(first, eos) | (max_new <= 1)), out=put(st["out"], out),
              keys=put(st["keys"], keys), temperature=put(st["temperature"], temperature),
              top_k=put(st["top_k"], top_k), top_p=put(st["top_p"], top_p), min_new=put(st["min_new"], min_new),
              max_new=put(st["max_new"], max_new))

    gate = None
    if cs is not None:
        ctl = dict(st["ctl"])
        n_real = jnp.maximum(mask.sum(1), 1).astype(jnp.float32)

        def prompt_reads(x):  # [N, B, P] -> prompt_last, prompt_avg [N, B] (left-padded rows)
            return x[:, :, -1], (x * mask[None].astype(jnp.float32)).sum(-1) / n_real

        mon_last, mon_avg = prompt_reads(rec["mon"])
        mon0 = jnp.zeros((b, spec.max_new, len(cs.monitor_layers)), jnp.float32).at[:, 0].set(mon_last.T)
        fired0 = jnp.zeros((b, spec.max_new, len(cs.guard_layers)), bool).at[:, 0].set(rec["fired"].T)
        c_last, c_avg = prompt_reads(rec["cnd"])
        c_read = jnp.where(jnp.asarray(cs.cond_avg, bool)[:, None], c_avg, c_last)  # [C, B]
        gate = (jnp.asarray(cs.cond_sign, jnp.float32)[:, None] * (c_read - ctl_rows["cnd_thr"])) > 0
        ctl.update(mon=put(ctl["mon"], mon0), fired=put(ctl["fired"], fired0),
                   pmon=put(ctl["pmon"], jnp.stack([mon_last.T, mon_avg.T], axis=1)), gate=put(ctl["gate"], gate.T),
                   grd_ceil=ctl["grd_ceil"].at[:, slot_ids].set(ctl_rows["grd_ceil"], mode="drop"),
                   grd_coef=ctl["grd_coef"].at[:, slot_ids].set(ctl_rows["grd_coef"], mode="drop"))
        st["ctl"] = ctl

    def put_coef(path, x, v):
        name = str(getattr(path[-1], "key", path[-1]))
        if not name.endswith("_coef"):
            return x
        terms = {"add_coef": cs.add_cond, "abl_coef": cs.abl_cond}.get(name, ()) if cs and len(path) == 1 else ()
        if any(t >= 0 for t in terms):  # conditioned terms decode with coef * (condition held)
            g = jnp.stack([gate[t] if t >= 0 else jnp.ones((b,), bool) for t in terms]).astype(v.dtype)  # [K, B]
            v = v * g[None]
        return x.at[:, :, slot_ids].set(v, mode="drop")
    st["steer"] = jax.tree_util.tree_map_with_path(put_coef, st["steer"], steer or {})
    st["dpos"] = jax.tree.map(lambda x, v: x.at[:, slot_ids].set(v, mode="drop"), st["dpos"], dpos or {})
    return st


@executable_store.stored_jit(static_argnames=("config", "spec"), donate_argnames=("state",))
def insert(config, params, state, tokens, mask, slot_ids, index, base_key, temperature, top_k, top_p, min_new,
           max_new, steer=None, prefill_pos=None, dpos=None, ctl_rows=None, *, spec: EngineSpec):
    """Prefill a batch of requests and write them into the slots `slot_ids` [B] (an id
    >= spec.slots marks a padding row, dropped). params: the model's, or with
    params["layers"] a list of per-layer views (`layer_views`; the prefill then runs the
    blocks unrolled over them). tokens, mask: [B, P] left-padded;
    index [B]: input indices, whose keys are fold_in(base_key, index); temperature, top_k, top_p, min_new, max_new: [B]; steer: intervention
    arrays for these rows (coefficients [L+1, K, B]); prefill_pos / dpos: position masks
    [K, B, P] / [K, B, 1]; ctl_rows: these rows' guard ceilings and coefficients and
    condition thresholds {grd_ceil [G, B], grd_coef [G, B], cnd_thr [C, B]} (with
    `spec.control`). Returns the new state (the old one is donated)."""
    return sh.auto_axes_call(
        lambda *a: _insert(config, spec, *a),
        (params, state, tokens, mask, slot_ids, index, base_key, temperature, top_k, top_p, min_new, max_new,
         steer, prefill_pos, dpos, ctl_rows), lambda: _state_specs(state, _mesh_of(state)))


# ----------------------------------------------------------------------------- compact
@executable_store.stored_jit
def compact(state, slot_ids):
    """The state of a smaller pool: slot i of the result is slot `slot_ids[i]` of `state`
    ([S'] int32; ids of done slots fill the rows beyond the live ones). Shared entries
    (steering vectors, control directions) and the write head `t` are kept. The drain of
    a ragged run (the last long requests, every other slot idle) then decodes in a pool
    whose step costs less (on CPU, in a profiling run on benchmarks/engine_cold.py's
    model: 1.6 ms at 8 slots against 7.3 ms at 32)."""
    def gather(st, ids):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x if _slot_axis(path) < 0 or x.ndim == 0 else jnp.take(x, ids, axis=_slot_axis(path)), st)
    return sh.auto_axes_call(gather, (state, slot_ids),
                             lambda: _state_specs(jax.eval_shape(gather, state, slot_ids), _mesh_of(state)))


def drain_slots(slots: int, multiple: int = 1) -> int | None:
    """The pool a run's drain moves to: a quarter of the slots, at least 8 (a multiple
    of the mesh's data axis), or None where that is not smaller or not worth two more
    programs. Only on CPU, where a decode step's cost follows its rows (its matmuls bind);
    on an accelerator a step at small batch reads the same weights whatever its rows."""
    if jax.default_backend() != "cpu":
        return None
    small = batching.grow_batch(max(8, slots // 4), multiple)
    return small if small < slots else None


def host_key(seed: int) -> np.ndarray:
    """`jax.random.PRNGKey(seed)` computed on the host ([2] uint32, threefry's seed words:
    the high and low 32 bits, the high word 0 without x64): the same key without the two
    small programs PRNGKey compiles in a fresh process."""
    seed = int(seed)
    if jax.config.jax_default_prng_impl != "threefry2x32" or not (
            -2**63 <= seed < 2**63 if jax.config.jax_enable_x64 else -2**31 <= seed < 2**31):
        return jax.random.PRNGKey(seed)  # another PRNG, or a seed JAX itself refuses
    high = (seed >> 32) & 0xFFFFFFFF if jax.config.jax_enable_x64 else 0
    return np.asarray([high, seed & 0xFFFFFFFF], np.uint32)


class Engine:
    """A pool of `spec.slots` decode slots over one model's params.

    The programs a run needs are bounded: one `decode` of the full pool (a finished slot
    is masked until it is refilled), one `insert` per prompt-width bucket (prefill groups
    always have `prefill_batch` rows, padded), and the state's initialiser; and, for the
    drain (nothing waits and the live rows fit `drain_slots`), one `compact` and one
    `decode` of the small pool. The state starts committed to the device, as the
    programs' outputs are, so the first insert is not compiled twice.

    steering: (steer_fn, prefill_fn, decode_fn) building, for a list of input indices,
    the intervention arrays (per-row coefficients), the prefill position masks (given the
    [B, P] mask) and the decode masks; None for no steering. views: the params' per-layer
    views (`Model.layer_views()`, kept on the model) or None to build them here.
    An engine can be kept and `run` again: every slot is free when a run returns.
    """

    def __init__(self, config, params, spec: EngineSpec, mesh=None, seed: int = 0, steering=None,
                 prefill_batch: int = 8, chunk: int = 8, refill_fraction: float = 0.125,
                 weight_views: bool = True, control=None, views=None, drain: bool = True):
        self.config, self.params, self.spec, self.mesh = config, params, spec, mesh
        self.base_key = host_key(seed)
        self.steering = steering
        # control: (shared unit directions, rows_fn(input indices) -> ctl_rows) with spec.control
        self.control = control
        self.records: dict[int, dict] = {}  # per finished input: the control's records
        self.multiple = batching.batch_multiple(mesh)
        self.refill = max(1, int(spec.slots * refill_fraction))  # free slots a waiting queue refills at once
        if jax.default_backend() == "cpu":  # a group no larger than a refill (at least 4 rows):
            # there prefill is matmul-bound, and a refill of 4 slots padded to a group of 8
            # prefilled twice its tokens (the ragged benchmark at 32 slots: 4.9 -> 4.55 s)
            prefill_batch = min(prefill_batch, max(4, self.refill))
        self.prefill_batch = batching.grow_batch(max(1, prefill_batch), self.multiple)
        self.chunk = chunk
        dtype = params["embed_tokens"]["embedding"].dtype
        steer = dpos = None
        if steering is not None:
            empty = np.full(spec.slots, -1)
            steer = steering[0](empty)
            dpos = steering[2](empty)
        # decode reads per-layer views of the stacked weights where the backend allows (CPU)
        if not (weight_views and spec.layer_loop == "unrolled"):
            views = None
        elif views is None:
            views = layer_views(params["layers"], config.num_layers)
        self.decode_params = params if views is None else {**params, "layers": views.layers}
        ctl = None if control is None else control[0]
        self._fresh_state = lambda: init_state(config, spec, dtype, steer, dpos, mesh, ctl)  # a cached program
        self.state = self._fresh_state()
        self.drain_slots = drain_slots(spec.slots, self.multiple) if drain else None
        self.stats = {"decode_calls": 0, "insert_calls": 0, "compactions": 0, "layer_views": views is not None,
                      "copied_weight_bytes": 0 if views is None else views.copied_bytes}

    def _insert(self, reqs: list[Request], slot_ids: list[int]):
        spec = self.spec
        b = self.prefill_batch  # one group size: a short group pads rather than compiling its own program
        rows = np.full(b, -1)
        rows[: len(reqs)] = [r.index for r in reqs]
        ids = [list(r.ids) for r in reqs] + [[spec.pad_id]] * (b - len(reqs))
        p = batching.bucket(max(len(s) for s in ids))
        tokens, mask = batching.pad_rows(ids, p, spec.pad_id, left=True)
        pad = b - len(reqs)

        def col(f, dtype, fill):
            return np.asarray([f(r) for r in reqs] + [fill] * pad, dtype)
        slots = np.asarray(list(slot_ids) + [spec.slots] * pad, np.int32)
        steer = prefill_pos = dpos = None
        if self.steering is not None:
            steer = self.steering[0](rows)
            prefill_pos = self.steering[1](rows, mask)
            dpos = self.steering[2](rows)
        arrays = [tokens, mask, slots, np.maximum(rows, 0).astype(np.int32), col(lambda r: r.temperature, np.float32, 1.0),
                  col(lambda r: r.top_k, np.int32, 0), col(lambda r: r.top_p, np.float32, 1.0),
                  col(lambda r: r.min_new_tokens, np.int32, 1), col(lambda r: r.max_new_tokens, np.int32, 1)]
        placed = batching.place(self.mesh, *arrays)
        if steer is not None:
            steer = jax.tree_util.tree_map_with_path(
                lambda path, x: batching.place(self.mesh, x, batch_axis=2)
                if str(getattr(path[-1], "key", "")).endswith("_coef") else jnp.asarray(x), steer)
            prefill_pos = jax.tree.map(lambda x: batching.place(self.mesh, x, batch_axis=1), prefill_pos)
            dpos = jax.tree.map(lambda x: batching.place(self.mesh, x, batch_axis=1), dpos)
        ctl_rows = None
        if self.control is not None:
            ctl_rows = jax.tree.map(lambda x: batching.place(self.mesh, x, batch_axis=1), self.control[1](rows))
        self.state = insert(self.config, self.decode_params, self.state, *placed[:4], self.base_key, *placed[4:], steer,
                            prefill_pos, dpos, ctl_rows, spec=spec)
        self.stats["insert_calls"] += 1

    def run(self, requests: Sequence[Request], progress=None) -> dict[int, list[int]]:
        """Generate every request; returns {request.index: new token ids (EOS included
        when emitted)}. Requests are admitted in the given order."""
        spec = self.spec
        for r in requests:
            if r.max_new_tokens > spec.max_new:
                raise ValueError(f"request {r.index}: max_new_tokens {r.max_new_tokens} > engine max {spec.max_new}")
        waiting = list(requests)[::-1]  # pop() from the end = arrival order
        owner: list[Request | None] = [None] * spec.slots
        results: dict[int, list[int]] = {}
        pool = spec  # the full pool, then (the drain) the small one
        while waiting or any(o is not None for o in owner):
            free = [s for s in range(pool.slots) if owner[s] is None]
            while waiting and free:
                batch, slots = [], []
                while waiting and free and len(batch) < self.prefill_batch:
                    batch.append(waiting.pop())
                    slots.append(free.pop(0))
                for s, r in zip(slots, batch):
                    owner[s] = r
                self._insert(batch, slots)
            busy = sum(o is not None for o in owner)
            small = self.drain_slots if pool is spec else None
            if waiting:  # come back when a few slots can take waiting requests
                want = min(len(waiting), self.refill)
                stop_at = spec.slots - busy + want
            elif small is not None and busy > small:  # come back when the live rows fit the small pool
                stop_at = spec.slots - small
            else:
                stop_at = pool.slots
            self.state = decode(self.config, self.decode_params, self.state, np.int32(stop_at), spec=pool,
                                chunk=self.chunk)
            self.stats["decode_calls"] += 1
            done = batching.to_host(self.state["done"])
            finished = [s for s in range(pool.slots) if owner[s] is not None and done[s]]
            if finished:
                n = batching.to_host(self.state["n"])
                out = batching.to_host(self.state["out"])
                ctl = None if self.control is None else {
                    k: batching.to_host(self.state["ctl"][k]) for k in ("mon", "pmon", "fired", "gate")}
                for s in finished:
                    results[owner[s].index] = out[s, : n[s]].tolist()
                    if ctl is not None:
                        self.records[owner[s].index] = {
                            "projections": ctl["mon"][s, : n[s]].copy(), "prompt_last": ctl["pmon"][s, 0].copy(),
                            "prompt_avg": ctl["pmon"][s, 1].copy(), "fired": ctl["fired"][s, : n[s]].copy(),
                            "gate": ctl["gate"][s].copy()}
                    owner[s] = None
                    if progress is not None:
                        progress.update(1)
            live = [s for s in range(pool.slots) if owner[s] is not None]
            if small is not None and not waiting and 0 < len(live) <= small:
                idle = next(s for s in range(pool.slots) if owner[s] is None)  # a done slot pads the rest
                ids = np.asarray(live + [idle] * (small - len(live)), np.int32)
                self.state = compact(self.state, ids)
                owner = [owner[s] for s in live] + [None] * (small - len(live))
                pool = dataclasses.replace(spec, slots=small)
                self.stats["compactions"] += 1
        if pool is not spec:  # the full pool again for the next run
            self.state = self._fresh_state()
        return results


def generate_tokens(model, ids, limits, temperature, top_p, top_k, min_new_tokens, seed, steerings, site_rows,
                    batch_size, progress=False, layer_loop: str | None = None, chunk: int = 8,
                    prefill_batch: int = 8, weight_views: bool = True, max_new: int | None = None,
                    plan: "closed_loop.Plan | None" = None):
    """`generate`'s engine path: token ids per input (new tokens, EOS included when
    emitted). ids: prompt token ids per input; limits: max_new_tokens per input; max_new:
    the longest continuation the slots are sized for (default the largest limit; a fixed
    cap, as an EOS-driven run has, keeps the compiled programs across calls).
    plan: closed-loop control (`closed_loop.plan`); then returns (token ids, the control's
    records per input: projections [n, M], prompt_last / prompt_avg [M], fired [n, G],
    gate [C])."""
    from tqdm.auto import tqdm
    from persona_jax.steering.spec import position_masks, steering_arrays

    n = len(ids)
    spec = engine_spec(model, [len(s) for s in ids], max(max(limits), max_new or 0), batch_size, temperature,
                       top_k, top_p, layer_loop, plan)
    steering = None
    if steerings:
        L, D = model.num_layers, model.hidden_size
        steering = (lambda rows: steering_arrays(steerings, L, D, rows, len(rows), site_rows, conditions_ok=True),
                    lambda rows, mask: position_masks(steerings, "prefill", mask),
                    lambda rows: position_masks(steerings, "decode", np.ones((len(rows), 1), np.int32)))
    views = model.layer_views() if weight_views and spec.layer_loop == "unrolled" else None
    eng = Engine(model.config, model.params, spec, model.mesh, seed=seed, steering=steering,
                 prefill_batch=min(spec.slots, prefill_batch), chunk=chunk, weight_views=weight_views,
                 control=None if plan is None else (plan.shared, plan.rows), views=views)
    reqs = [Request(ids[i], i, limits[i], min_new_tokens, float(temperature), int(top_k or 0), float(top_p))
            for i in range(n)]
    with tqdm(total=n, desc="generate", disable=not progress) as bar:
        out = eng.run(reqs, progress=bar)
    tokens = [out[i] for i in range(n)]
    return tokens if plan is None else (tokens, [eng.records[i] for i in range(n)])


def slot_count(n: int, batch_size: int, multiple: int = 1) -> int:
    """Decode slots for n requests: `batch_size`, or for fewer requests the next power of
    two from 8 (a multiple of the mesh's data axis), so the small calls of a run (a
    sweep's short arms, a test's tiny budgets) share one decode program instead of
    compiling one per request count. The idle slots this adds (fewer than the requests)
    cost less than a compile: on an accelerator a step reads the same weights whatever
    its rows; on CPU, where rows cost, at most twice the requests' rows."""
    want = max(8, 1 << (max(n, 1) - 1).bit_length())
    return batching.grow_batch(min(batch_size, want), multiple)


def engine_spec(model, prompt_lens, max_new_tokens: int, batch_size: int, temperature: float, top_k, top_p: float,
                layer_loop: str | None = None, plan=None) -> EngineSpec:
    """The `EngineSpec` `generate_tokens` runs: slots from `slot_count`, the output width
    rounded up to 16, cache columns for the widest prompt's bucket plus that width."""
    slots = slot_count(len(prompt_lens), batch_size, batching.batch_multiple(model.mesh))
    max_new = -(-max_new_tokens // 16) * 16
    return EngineSpec(slots=slots, cache_len=batching.bucket(max(prompt_lens)) + max_new, max_new=max_new,
                      greedy=temperature == 0, use_top_k=top_k is not None, use_top_p=top_p < 1.0,
                      eos_ids=model.eos_token_ids, pad_id=model.pad_token_id,
                      layer_loop="unrolled" if plan is not None else layer_loop or default_layer_loop(),
                      control=None if plan is None else plan.spec)
