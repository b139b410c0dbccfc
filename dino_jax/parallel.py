"""Processes and device mesh; sharding rules for parameters, optimizer state and batch;
host-to-global arrays.

Parameters (and everything shaped like them: teacher, Adam moments, center) are replicated over
"data" and split over "fsdp" along their largest divisible axis; small tensors stay replicated,
since splitting them saves little memory and costs a collective each. The batch axis is split over
every mesh axis. One rule, by shape, keeps a parameter and its moments on the same devices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

FSDP = "fsdp"
# Tensors with fewer elements than this are replicated rather than split over fsdp.
MIN_FSDP_SIZE = 2**14


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Connect the processes of a multi-host run: explicitly (all three given), or from the
    environment on TPU pods, SLURM and JAX_COORDINATOR_ADDRESS clusters; else a no-op."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _in_cluster():
        jax.distributed.initialize()  # JAX reads the cluster from its environment


def _in_cluster() -> bool:
    env = os.environ
    return (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or "JAX_COORDINATOR_ADDRESS" in env
    )


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from `(name, size)` pairs; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh={tuple(axes)}: at most one axis may have size -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"mesh={tuple(axes)} does not divide {len(devices)} devices: the fixed axis sizes "
                f"multiply to {known}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh={tuple(axes)} needs {math.prod(sizes)} devices but {len(devices)} are present: "
            "make the sizes multiply to the device count, or use -1 for one axis."
        )
    return jax.make_mesh(
        tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis; the rest of each array whole."""
    return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp_size: int) -> P:
    """Split the largest axis divisible by the fsdp size; replicate small or indivisible tensors."""
    if fsdp_size == 1 or math.prod(shape) < MIN_FSDP_SIZE:
        return P()
    divisible = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda i: shape[i])
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return P(*spec)


def state_sharding(shapes, mesh: Mesh):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape)."""
    fsdp_size = mesh.shape.get(FSDP, 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp_size)), shapes)


def to_global(local_batch, mesh: Mesh):
    """This process's slice of the batch (NumPy) -> global jax.Arrays split over the batch axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
