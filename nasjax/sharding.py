"""Device mesh and logical-axis sharding (pjit semantics through ``jax.jit``).

Weights and key activations carry logical axis names (``embed``, ``mlp``, ``heads``,
``kv``, ``vocab``; ``activation_batch`` ...). A rule table from the config maps them
onto the mesh axes ``(data, fsdp, tensor)``. Shardings are derived without
allocating anything: ``jax.eval_shape`` -> ``nn.get_partition_spec`` -> rules.

Search candidates have arbitrary widths (LTS heads 2/4/8, odd vocabularies), so a
dimension that the mesh axes do not divide is replicated instead of failing: the
same code then runs on 1 CPU, 8 simulated CPUs, a GPU and a TPU slice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default logical -> mesh rules: batch over data and fsdp, weights' model width over
# fsdp (ZeRO-3 style), heads / FFN width / vocabulary over tensor (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)


class MeshError(ValueError):
    """The requested mesh does not fit the available devices."""


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh with Auto axes.

    Args:
      shape: sizes of the three axes; one entry may be -1 (takes the remaining devices).
      devices: defaults to all devices.

    Returns:
      A ``Mesh`` whose axes are ``AxisType.Auto`` (``jax.make_mesh`` defaults to
      Explicit axes, which Linen's ``with_logical_constraint`` does not support).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {tuple(shape)}")
    n = len(devices)
    if shape.count(-1) > 1:
        raise MeshError(f"mesh.shape may contain at most one -1, got {tuple(shape)}")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh.shape entries must be positive or -1, got {tuple(shape)}")
    if -1 in shape:
        if n % known:
            raise MeshError(f"mesh.shape {tuple(shape)}: {n} devices are not divisible by {known}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise MeshError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, but {n} are available")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises a rule table from a config (lists become tuples, '' / 'none' -> None)."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for item in rules:
        name, axes = item
        if isinstance(axes, str) and axes.lower() in ("", "none"):
            axes = None
        elif isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh.shape[axes]
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (or specs of the wrong rank)."""
    if len(spec) > len(shape):
        return P()
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        fitted.append(axes if axes is not None and dim % _axis_size(mesh, axes) == 0 else None)
    return P(*fitted)


def logical_to_shardings(logical_specs: Any, abstract: Any, mesh: Mesh, rules) -> Any:
    """Maps a tree of logical PartitionSpecs onto NamedShardings for ``abstract`` leaves.

    Args:
      logical_specs: tree from ``nn.get_partition_spec`` (PartitionSpec of logical names).
      abstract: matching tree of arrays or ShapeDtypeStructs (unboxed).
      mesh: the device mesh.
      rules: logical -> mesh axis rules.
    """

    def one(lspec, leaf):
        if not isinstance(lspec, P):
            lspec = P()
        mesh_spec = nn.logical_to_mesh_axes(tuple(lspec), rules) if len(lspec) else P()
        return NamedSharding(mesh, fit_spec(mesh_spec, np.shape(leaf), mesh))

    return jax.tree.map(one, logical_specs, abstract, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's slice of a global batch on the mesh."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
