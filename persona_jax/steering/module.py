"""`apply_module`: steer or capture any Flax linen module's site in one jitted call.

The one-call form of `sites.locate` + `sites.site_arrays` + `sites.apply` + `jax.jit`:
the layout (which instances, how many rows) is found from the model and its inputs, the
width from the vector, the batch from the coefficients or the mask.
"""
from __future__ import annotations

import functools

import jax

from persona_jax.steering import spec as st
from persona_jax.steering.sites import Layout, Site, apply, locate, site_arrays


@functools.partial(jax.jit, static_argnames=("module", "site", "layout", "capture", "kw"))
def _run(variables, args, interventions, *, module, site: Site, layout: Layout, capture: bool, kw: tuple):
    """`sites.apply` of one site named "site", jitted (module, site, layout static)."""
    out, captured = apply(module, variables, *args, sites={"site": site}, layouts={"site": layout},
                          interventions=interventions, capture={"site": "output" if capture else None},
                          **dict(kw))
    return out, captured.get("site")


def apply_module(module, variables, *args, at, steering=None, capture: bool = False, mask=None,
                 phase: st.Phase = "prefill", **kwargs):
    """`module.apply(variables, *args, **kwargs)` with `steering` at, and capture of, the
    outputs of the submodules `at` selects, in one jitted call.

    at: a `Site`, or what its `select` takes: a linen Module class (or tuple of them), or
      a module-path pattern ("block_*/mlp"). The matching instances, in the order of their
      first call, are the rows 0..N-1 (`sites.locate`).
    steering: `pj.Steering`s with vectors [N, D] (a row per instance) or one direction
      [D] with `layer=` the instance's row; `coef` one number or one per batch row.
    capture: also return the site's outputs [N, B, ..., D] (after the steering, as a
      forward hook on each instance would see them).
    mask, phase: the [B, T] attention mask and call phase that positions "prompt" /
      "response" need (`sites.site_arrays`).
    args are arrays (traced); kwargs are static options of the module's call (hashable).

    Returns (the module's output, captured [N, B, ..., D] or None).
    """
    site = at if isinstance(at, Site) else Site(at)
    layout = locate(site, module, variables, *args, **kwargs)
    steerings = st.as_list(steering)
    interventions = {"site": site_arrays(steerings, layout, mask=mask, phase=phase)} if steerings else None
    return _run(variables, args, interventions, module=module, site=site, layout=layout, capture=bool(capture),
                kw=tuple(sorted(kwargs.items())))
