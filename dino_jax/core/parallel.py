"""Processes and device mesh; sharding rules for parameters, optimizer state and batch;
host-to-global arrays.

Parameters (and the teacher, Adam moments and center) are replicated over "data" and split over
"fsdp" along the axis their layer leaves whole (FSDP_RULES); small tensors stay replicated, since
splitting them saves little memory and costs a collective each. The batch axis is split over every
mesh axis. The rule goes by the end of a tensor's key path, which a parameter shares with its
teacher copy and its optimizer moments, so all of them live on the same devices. The step
gathers the parameters for its forward passes (`gathered`) and reduce-scatters their gradients:
FSDP as ZeRO describes it, with activations split by batch only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

FSDP = "fsdp"
# Tensors with fewer elements than this are replicated rather than split over fsdp.
MIN_FSDP_SIZE = 2**14
# (regex searched in a tensor's key path, the axis to split over fsdp): the exceptions to the
# default, the leading axis. A kernel's leading axis is its input (contracted) axis: splitting it
# leaves whole each slice a layer takes of the output axis (qkv's q, k and v, the heads), which
# would otherwise cut across the split and reshard at every slice; its shards are contiguous
# rows, gathered by concatenation, with TPU's 128-lane minor axis unpadded.
FSDP_RULES: tuple[tuple[str, int], ...] = (
    # The head's [bottleneck, K] weight-normed kernel keeps whole columns: each column's norm is
    # local, and XLA splits the logits over K (gathering the small [rows, bottleneck] input)
    # rather than gathering the kernel, the largest tensor of a ViT-S run.
    (r"last_layer/kernel_v$", -1),
)


# JAX's default: long enough for a slow checkpoint write or compilation on one host.
HEARTBEAT_TIMEOUT_S = 100


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
) -> None:
    """Connect the processes of a multi-host run: explicitly (all three given), or from the
    environment on TPU pods, SLURM and JAX_COORDINATOR_ADDRESS clusters; else a no-op.

    When a process stops answering for `heartbeat_timeout_s` (a lost host), JAX's coordination
    service ends the others with a message, so that none waits on it in a collective forever;
    rerunning the command resumes from the last checkpoint."""
    timeout = {"heartbeat_timeout_seconds": int(heartbeat_timeout_s)}
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeout)
    elif _in_cluster():
        jax.distributed.initialize(**timeout)  # JAX reads the cluster from its environment


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


def param_spec(shape: Sequence[int], fsdp_size: int, path: str = "") -> P:
    """The spec of a tensor of `shape` at key path `path` ("student/head/mlp_0/kernel"): split over
    fsdp along the axis of the first FSDP_RULES pattern found in the path, else the leading axis,
    or failing that (not divisible by the fsdp size) the next divisible one; replicated if small
    or if no axis divides."""
    if fsdp_size == 1 or math.prod(shape) < MIN_FSDP_SIZE:
        return P()
    first = next((axis for pattern, axis in FSDP_RULES if re.search(pattern, path)), 0)
    first %= len(shape)
    axes = [first, *(i for i in range(len(shape)) if i != first)]
    axis = next((i for i in axes if shape[i] % fsdp_size == 0), None)
    if axis is None:
        return P()
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return P(*spec)


def state_sharding(shapes, mesh: Mesh):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (e.g. a TrainState from
    jax.eval_shape): each leaf's `param_spec` from its shape and key path. An optimizer moment's
    path ends in its parameter's (`opt_state/.../mu/head/mlp_0/kernel`), so it gets its spec."""
    fsdp_size = mesh.shape.get(FSDP, 1)

    def sharding(path, x) -> NamedSharding:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return NamedSharding(mesh, param_spec(x.shape, fsdp_size, name))

    return jax.tree_util.tree_map_with_path(sharding, shapes)


def gathered(params, mesh: Mesh):
    """`params` (split over fsdp) whole on every device, for a forward pass: the layers then
    compute on batch-split activations, as data parallelism does, rather than following the
    split of their weights. Their gradient goes back to the parameters' own split, so XLA sums
    it with a reduce-scatter over fsdp, not an all-reduce of the whole."""
    if mesh.shape.get(FSDP, 1) == 1:
        return params
    split = state_sharding(params, mesh)
    whole = jax.tree.map(lambda _: replicated(mesh), params)

    @jax.custom_vjp
    def gather(tree):
        return jax.lax.with_sharding_constraint(tree, whole)

    def forward(tree):
        return gather(tree), None

    def backward(_, grads):
        return (jax.lax.with_sharding_constraint(grads, split),)

    gather.defvjp(forward, backward)
    return gather(params)


def to_global(local_batch, mesh: Mesh):
    """This process's slice of the batch (NumPy) -> global jax.Arrays split over the batch axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
