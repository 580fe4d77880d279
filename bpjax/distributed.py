"""Beyond one device: data-parallel and FSDP-style sharded training on JAX's SPMD engine.

Nothing here is a home-made distributed runtime. A :class:`jax.sharding.Mesh` with one ``"data"``
axis spans the devices; the batch is sharded over it with :class:`~jax.sharding.NamedSharding`;
params and optimizer state are replicated, or sharded over the same axis (``fsdp=True``) to
divide their memory by the device count. The hand-written forward and backward then run under
``jax.jit`` exactly as on one device: the loss and every gradient are means over the *global*
batch, so XLA inserts the all-reduces, and ``batch_norm``'s statistics (and its backward's
reductions) are computed over the global batch too — one device seeing the whole batch gives
the same numbers.

Across hosts, call :func:`jax.distributed.initialize` in every process first (see the README);
``make_mesh`` then spans every device of every process.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "batch_sharding", "replicated", "fsdp_sharding", "shard_batch", "place"]

AXIS = "data"


def make_mesh(num_devices: Optional[int] = None, *, devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over the first ``num_devices`` devices (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"make_mesh: expected 1 <= num_devices <= {len(devices)} (the devices JAX "
                             f"sees: {jax.devices()[0].platform} x{len(devices)}), got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over ``"data"``: each device holds ``batch / n`` consecutive rows."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_sharding(mesh: Mesh, tree: Any):
    """Per leaf: shard its largest axis that the device count divides over ``"data"``, else
    replicate it (small leaves such as biases). Returns a tree of shardings."""
    n = mesh.shape[AXIS]

    def leaf(a):
        shape = np.shape(a)
        axes = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0 and shape[i] >= n]
        if n == 1 or not axes:
            return replicated(mesh)
        spec = [None] * len(shape)
        spec[axes[0]] = AXIS
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map(leaf, tree)


def check_batch(mesh: Mesh, batch_size: int, what: str = "batch") -> None:
    n = mesh.shape[AXIS]
    if batch_size % n:
        raise ValueError(f"distributed: expected the {what} size to be divisible by the {n} devices of "
                         f"the mesh, got {batch_size} (use a batch size that is a multiple of {n})")


def shard_batch(mesh: Mesh, *arrays):
    """Place arrays with a leading batch axis on the mesh, split over ``"data"``."""
    for a in arrays:
        check_batch(mesh, np.shape(a)[0])
    placed = [jax.device_put(a, batch_sharding(mesh)) for a in arrays]
    return placed[0] if len(placed) == 1 else tuple(placed)


def place(mesh: Mesh, tree: Any, *, fsdp: bool = False):
    """Put params or optimizer state on the mesh: replicated, or FSDP-sharded."""
    shardings = fsdp_sharding(mesh, tree) if fsdp else jax.tree_util.tree_map(lambda _: replicated(mesh), tree)
    return jax.device_put(tree, shardings), shardings
