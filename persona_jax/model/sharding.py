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
