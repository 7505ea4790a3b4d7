"""Device meshes and parameter placement.

Mesh axes are ("data", "model"): the batch is split over "data"; weights over "model"
Megatron-style (q/k/v/gate/up split on their output features, o/down on their input
features, so each block needs one all-reduce per sublayer). A dimension that the model
axis does not divide stays replicated rather than failing.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from persona_jax.errors import PersonaError

# leaf path suffix -> which axis (counted from the end) is split over "model"
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROW = ("o_proj", "down_proj")


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over the available devices (all of them by default)."""
    devices = list(devices if devices is not None else jax.devices())
    if data is None:
        if len(devices) % model:
            raise PersonaError(f"model axis {model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model > len(devices):
        raise PersonaError(f"a ({data}, {model}) mesh needs {data * model} devices; {len(devices)} are available")
    used = {d.process_index for d in devices[: data * model]}
    if len(used) < jax.process_count():
        raise PersonaError(f"a ({data}, {model}) mesh holds devices of {len(used)} of the {jax.process_count()} "
                           "processes; in a multi-host run the mesh must span every process (set mesh.data=-1 "
                           "to use all devices)")
    return Mesh(np.array(devices[: data * model]).reshape(data, model), ("data", "model"))


def maybe_initialize_distributed(enabled: bool, **kwargs):
    """Multi-host runs call `jax.distributed.initialize()` once, before any other JAX call.

    On Cloud TPU, SLURM, Open MPI and Kubernetes JAX finds the processes itself. Elsewhere
    set JAX_COORDINATOR_ADDRESS (host:port of process 0, read by JAX), JAX_NUM_PROCESSES
    and JAX_PROCESS_ID in each process's environment; explicit kwargs win.
    """
    if enabled:
        for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if kwargs.get(key) is None and os.environ.get(var):
                kwargs[key] = int(os.environ[var])
        jax.distributed.initialize(**kwargs)


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], model_size: int) -> P:
    """PartitionSpec for one param leaf given its flax path."""
    names = [str(getattr(k, "key", k)) for k in path]
    spec = [None] * len(shape)
    axis = None
    if names[-1] in ("kernel", "bias"):
        owner = names[-2]
        if owner in _COLUMN:
            axis = len(shape) - 1
        elif owner in _ROW and names[-1] == "kernel":
            axis = len(shape) - 2
    elif names[-1] == "embedding":
        axis = len(shape) - 1  # hidden dim; the gather stays local
    if axis is not None and model_size > 1 and shape[axis] % model_size == 0:
        spec[axis] = "model"
    return P(*spec)


def param_shardings(params_shape, mesh: Mesh):
    """NamedSharding pytree matching a params (or ShapeDtypeStruct) pytree."""
    model_size = mesh.shape["model"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, model_size)), params_shape)


def data_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = "data"
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------
# Meshes made the way JAX documents them (Explicit axis types) and the user's axis names.

AXES = ("data", "model")


def check_mesh(mesh, where: str = "mesh"):
    """The mesh itself if it has axes named "data" and "model" (other axes may be added:
    arrays are replicated over them); else a PersonaError that names the expected axes.
    Axis types may be Auto or Explicit (`jax.make_mesh`'s default)."""
    if mesh is None:
        return None
    names = tuple(getattr(mesh, "axis_names", ()))
    missing = [a for a in AXES if a not in names]
    if missing:
        hint = ", ".join(f"{n!r}: {a!r}" for n, a in zip([n for n in names if n not in AXES], missing))
        raise PersonaError(
            f"the {where} has axes {names} but persona_jax splits the batch over an axis named 'data' and "
            f"the weights over one named 'model'; name your axes so (e.g. jax.make_mesh((4, 2), ('data', 'model'))) "
            f"or map yours with pj.rename_mesh_axes(mesh, {{{hint or 'your_axis: ' + repr(missing[0])}}})")
    return mesh


def rename_mesh_axes(mesh: Mesh, mapping: dict[str, str]) -> Mesh:
    """The same devices and axis types with axes renamed, e.g. {"batch": "data", "tp": "model"}."""
    unknown = [k for k in mapping if k not in mesh.axis_names]
    if unknown:
        raise PersonaError(f"rename_mesh_axes: {unknown} are not axes of the mesh {tuple(mesh.axis_names)}")
    names = tuple(mapping.get(n, n) for n in mesh.axis_names)
    if len(set(names)) != len(names):
        raise PersonaError(f"rename_mesh_axes: renaming {tuple(mesh.axis_names)} with {mapping} gives duplicate names {names}")
    return Mesh(mesh.devices, names, axis_types=mesh.axis_types)


def context_mesh():
    """The concrete mesh set with `jax.set_mesh(...)` (or `jax.sharding.use_mesh` where
    it exists), or None."""
    get = getattr(jax.sharding, "get_mesh", None)
    mesh = get() if get is not None else None
    return None if mesh is None or mesh.empty else mesh


def spec_of(x) -> P:
    """The PartitionSpec in the type of a traced (or concrete) array; P() when it has none."""
    s = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(s, "spec", None)
    return P() if spec is None else spec


def batch_spec(x):
    """The mesh axis (or None) over which dimension 0 of x is split, from its type."""
    spec = spec_of(x)
    return spec[0] if len(spec) else None


def explicit_mesh(tree):
    """The abstract mesh with Explicit axes that the arrays of `tree` (or the context)
    are typed with, or None (Auto meshes, one device, no mesh)."""
    for leaf in jax.tree.leaves(tree):
        try:
            m = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        except TypeError:
            continue
        if m is not None and not m.empty and m.explicit_axes:
            return m
    m = jax.sharding.get_abstract_mesh()
    return m if not m.empty and m.explicit_axes else None


def auto_axes_call(fn, args: tuple, out_specs):
    """fn(*args), run with every mesh axis in Auto mode when its inputs are typed with an
    Explicit mesh (`jax.sharding.auto_axes`); else fn(*args) unchanged.

    Under Explicit sharding every op whose output sharding is ambiguous (the embedding
    gather, the row-parallel matmuls, cache updates) would need an `out_sharding`; inside
    Auto axes the compiler chooses, as with `pj.make_mesh`'s meshes. `args` holds arrays
    only (static values are closed over); out_specs: a PartitionSpec pytree matching fn's
    output (None where the output is None), or a function returning it, used only under
    an Explicit mesh.
    """
    mesh = explicit_mesh(args)
    if mesh is None:
        return fn(*args)
    specs = out_specs() if callable(out_specs) else out_specs
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=specs)(*args)
