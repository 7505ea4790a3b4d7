"""Reading and writing module outputs, as `flax.linen.intercept_methods` interceptors.

Generic over models: a site (see `persona_jax.steering.sites.Site`) says which module
calls are intercepted and which array of their return value is acted on ([B, ..., D]).
Everything an intervention needs is array data, so one compiled program serves every
layer x coefficient choice:

* row data, in the `interventions` collection at each intercepted module's scope under
  the variable `"@" + site name` (a dict; scanned modules get one row per scan step):
    add_vec  [K, D]   vectors to add
    add_coef [K, B]   per-row coefficients (0 = off)
    abl_dir  [J, D]   unit directions to project out
    abl_coef [J, B]   per-row ablation strength (1 = full projection removal)
    grd_dir, grd_vec, grd_act [G, D], grd_ceil, grd_coef [G, B], grd_cap [G]
                      projection guards (`guard_rule`; steering/control.py's `Guard`):
                      unit trigger direction, subtracted vector, the cap's step per unit
                      of excess, per-row ceiling (inf = off), per-row subtract
                      coefficient, 1 = cap / 0 = subtract
* per-call data, closed over by the interceptor (the same for every instance):
    add_pos [K, B, ...], abl_pos [J, B, ...], grd_pos [G, B, ...]  position masks over the output's leading
      dims (1 where the term acts; see `spec.position_masks`); absent = everywhere;
    readout [R, B, ...]  capture sows sum_t w[r, b, t] * h[b, t] per instance instead of
      the whole output, so reductions happen on device.

At each intercepted call the interceptor ablates, then adds, then guards, then reads (so
captured values are the steered ones, as a forward hook on the module output would see them).
"""
from __future__ import annotations

import contextlib
from typing import Literal, Mapping

import flax.linen as nn
import jax.numpy as jnp

Capture = Literal[None, "output", "readout"]
ROW_KEYS = ("add_vec", "add_coef", "abl_dir", "abl_coef", "grd_dir", "grd_vec", "grd_act", "grd_ceil", "grd_coef",
            "grd_cap")
CALL_KEYS = ("add_pos", "abl_pos", "grd_pos", "readout")


def variable_name(site_name: str) -> str:
    """The variable holding a site's rows (and captures) at a module's scope."""
    return "@" + site_name


def readout(h, weights):
    """Weighted sums over the leading dims. h: [B, ..., D]; weights: [R, B, ...] -> [R, B, D] float32."""
    return jnp.einsum("b...d,rb...->rbd", h.astype(jnp.float32), weights.astype(jnp.float32))


def write(module: nn.Module, name: str, h, call: Mapping):
    """Ablate then add the site's terms at this module, if it has any."""
    var = variable_name(name)
    if not module.has_variable("interventions", var):
        return h
    rows = module.get_variable("interventions", var)
    if "abl_dir" in rows:
        dirs, coef, pos = rows["abl_dir"], rows["abl_coef"], call.get("abl_pos")  # [J, D], [J, B], [J, B, ...]
        for j in range(dirs.shape[0]):  # sequential, like stacked hooks
            u = dirs[j].astype(h.dtype)
            proj = jnp.einsum("b...d,d->b...", h, u)
            scale = coef[j].reshape((-1,) + (1,) * (proj.ndim - 1)) * (1.0 if pos is None else pos[j])
            h = h - (scale.astype(h.dtype) * proj)[..., None] * u
    if "add_vec" in rows:
        vec, coef, pos = rows["add_vec"], rows["add_coef"], call.get("add_pos")  # [K, D], [K, B], [K, B, ...]
        lead = h.shape[:-1]
        scale = coef.reshape(coef.shape + (1,) * (len(lead) - 1))
        scale = scale * (1.0 if pos is None else pos)
        scale = jnp.broadcast_to(scale, (coef.shape[0],) + lead)
        h = h + jnp.einsum("k...,kd->...d", scale.astype(h.dtype), vec.astype(h.dtype))
    if "grd_dir" in rows:
        pos = call.get("grd_pos")
        for g in range(rows["grd_dir"].shape[0]):
            h, _ = guard_rule(h, rows["grd_dir"][g], rows["grd_vec"][g], rows["grd_act"][g], rows["grd_ceil"][g],
                              rows["grd_coef"][g], rows["grd_cap"][g], None if pos is None else pos[g])
    return h


def guard_rule(h, u, vec, act, ceiling, coef, cap, pos=None):
    """One projection guard on h [B, ..., D]: where h . u (u the unit direction) exceeds the
    row's `ceiling` [B], "cap" (cap = 1) removes the excess, h <- h - max(0, h.u - ceiling) act
    (act = u, or a direction d / (d . u): the same change along u); "subtract" (cap = 0)
    adds -coef[b] * vec. pos [B, ...]: 1 where the guard acts (None = everywhere).
    Computed in float32.
    Returns (h, fired [B, ...] bool)."""
    hf = h.astype(jnp.float32)
    lead = (slice(None),) + (None,) * (h.ndim - 2)
    excess = hf @ u.astype(jnp.float32) - ceiling.astype(jnp.float32)[lead]  # [B, ...]; inf ceiling: never
    fired = excess > 0
    if pos is not None:
        fired = fired & (pos > 0)
    on = fired.astype(jnp.float32)
    cap = jnp.asarray(cap, jnp.float32)
    excess = jnp.where(fired, excess, 0.0)  # (0 * -inf would be NaN)
    delta = (-(cap * excess)[..., None] * act.astype(jnp.float32)
             - ((1.0 - cap) * on * coef.astype(jnp.float32)[lead])[..., None] * vec.astype(jnp.float32))
    return (hf + delta).astype(h.dtype), fired


def read(module: nn.Module, name: str, h, capture: Capture, call: Mapping):
    if capture == "output":
        module.sow("intermediates", variable_name(name), h)
    elif capture == "readout":
        module.sow("intermediates", variable_name(name), readout(h, call["readout"]))


def interceptor(sites: Mapping[str, "Site"], capture: Mapping[str, Capture] | None = None,
                calls: Mapping[str, Mapping] | None = None):
    """The `nn.intercept_methods` interceptor for named sites: for each site whose
    `select` matches the called module, write (ablate, add) then read (capture).
    capture: {site: None | "output" | "readout"}; calls: {site: per-call arrays}."""
    capture, calls = capture or {}, calls or {}

    def fn(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        for name, site in sites.items():
            if site.matches(context.module, context.method_name):
                call = calls.get(name, {})
                h = write(context.module, name, site.get(out), call)
                read(context.module, name, h, capture.get(name), call)
                out = site.put(out, h)
        return out

    return fn


@contextlib.contextmanager
def active(sites: Mapping[str, "Site"], capture=None, calls=None):
    with nn.intercept_methods(interceptor(sites, capture, calls)):
        yield
