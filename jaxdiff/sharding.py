"""Meshes and logical-axis rules: map the logical names on every parameter onto mesh axes (data, fsdp, tensor)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or None = replicated). FSDP shards the model width and conv outputs;
# tensor parallelism splits heads and MLP width. Norm params and conv kernel spatial dims stay replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); `shape` like {"fsdp": 8}; one axis may be -1 (all the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {shape} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_mesh_spec(
    logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """Mesh PartitionSpec for one array: each logical name mapped by `rules`; a mesh axis is used at most
    once per array, and a dimension not divisible by its mesh axes' size is replicated instead."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def param_shardings(params: Any, logical_axes: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedSharding tree for `params` (arrays or ShapeDtypeStructs) from their logical axis names."""
    return jax.tree_util.tree_map(
        lambda spec, p: NamedSharding(mesh, logical_to_mesh_spec(spec, p.shape, mesh, rules)),
        logical_axes,
        params,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_params(params: Any, logical_axes: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Place params on the mesh according to their logical axes."""
    return jax.device_put(params, param_shardings(params, logical_axes, mesh, rules))


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes of `tree`'s arrays actually resident on each device (from addressable shards)."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


def rules_from_config(pairs: Iterable[Sequence]) -> tuple:
    """Rules from a config list like [["embed", "fsdp"], ["heads", None]]."""
    return tuple((str(k), (tuple(v) if isinstance(v, (list, tuple)) else v)) for k, v in pairs)
