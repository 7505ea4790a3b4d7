"""Per-layer arrays that share the memory of the stacked [L, ...] block params (no copy).

A decode step reads every layer's weights once. Slicing `params["layers"][l]` inside a
jitted program makes XLA on CPU copy the slice before each dot (a dot's operand must be
its own buffer there), which costs a second copy of the block weights in the program's
temporaries and a memcpy of every layer per step. On CPU a major-axis slice of a stacked
buffer is itself a contiguous buffer: `np.asarray` of a CPU array is a view of its memory
and `jax.device_put` of an aligned host view wraps that memory without copying, so the
step can take each layer's weights as separate arguments that alias the stacked ones.

Aliasing is checked by buffer address, leaf by leaf and shard by shard. A leaf whose
per-layer slices are not 64-byte aligned (tiny ones, such as a norm scale of an odd width)
is copied, and its bytes are counted in `copied_bytes`. Off CPU, `layer_views` returns
None: the caller slices inside its program (accelerator compilers fuse the slice).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding


@dataclasses.dataclass
class LayerViews:
    """layers: [L] per-layer trees of arrays (the block params' structure, the leading
    axis dropped); copied_bytes: bytes that could not alias the stacked buffers."""

    layers: list
    copied_bytes: int


def _layer_sharding(sharding, ndim: int):
    """The sharding of one layer's slice of an array sharded as `sharding`, or None when
    the layer axis itself is split (then a slice is not one shard's contiguous block)."""
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        if spec[0] is not None:
            return None
        return NamedSharding(sharding.mesh, P(*spec[1:]))
    return None


def _leaf_views(x, num_layers: int):
    """([L] arrays aliasing x's memory where aligned, bytes copied), or None."""
    if x.ndim == 0 or x.shape[0] != num_layers or not x.is_fully_addressable:
        return None
    if any(d.platform != "cpu" for d in x.sharding.device_set):
        return None
    sharding = _layer_sharding(x.sharding, x.ndim)
    if sharding is None:
        return None
    per_layer = [[] for _ in range(num_layers)]
    copied = 0
    for shard in x.addressable_shards:
        host = np.asarray(shard.data)  # a view of the shard's buffer on CPU
        if host.size and host.ctypes.data != shard.data.unsafe_buffer_pointer():
            return None
        for l in range(num_layers):
            part = jax.device_put(host[l], shard.device)
            if host[l].size and part.unsafe_buffer_pointer() != host[l].ctypes.data:
                copied += host[l].nbytes  # unaligned slice: PjRt copied it
            per_layer[l].append(part)
    arrays = [jax.make_array_from_single_device_arrays(x.shape[1:], sharding, parts) for parts in per_layer]
    return arrays, copied


def layer_views(layers, num_layers: int) -> LayerViews | None:
    """Per-layer views of stacked block params.

    layers: a tree of [L, ...] arrays (`params["layers"]`). Returns LayerViews whose
    `layers[l]` holds the arrays of layer l, sharing the stacked buffers' memory (CPU),
    or None when any leaf cannot be viewed (another backend, the layer axis sharded, a
    multi-process array): then slice inside the program.
    """
    leaves, treedef = jax.tree.flatten(layers)
    per_leaf, copied = [], 0
    for x in leaves:
        got = _leaf_views(x, num_layers) if isinstance(x, jax.Array) else None
        if got is None:
            return None
        per_leaf.append(got[0])
        copied += got[1]
    return LayerViews([treedef.unflatten([v[l] for v in per_leaf]) for l in range(num_layers)], copied)
