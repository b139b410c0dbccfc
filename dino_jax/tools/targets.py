"""Compilation targets by name (TPU slices, GPU nodes): their abstract devices and chip figures.

`abstract_devices("v4-32")` gives the 16 devices of a v4-32 slice without the slice: libtpu
(the `tpu` extra) and the CUDA plugin (the `gpu-compile` extra) describe a topology from which
XLA compiles on any host, so a CPU machine can build the exact program a slice would run and
read its memory and cost. One device per chip on every target here (v4 and v5p in megacore
mode), so the per-chip figures are per-device figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import jax
from jax.experimental import topologies

GPU_SPECS = Path(__file__).with_name("target_specs")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Data-sheet figures of one chip: HBM capacity, dense bf16 matmul peak, HBM bandwidth."""

    name: str
    hbm_bytes: int
    peak_flops: float  # bf16, dense, per second
    hbm_bandwidth: float  # bytes per second
    source: str  # where the figures come from


# Cloud TPU pages (docs.cloud.google.com/tpu/docs/<version>), "key specifications" tables. They
# give v4's HBM in GiB but v5e's, v5p's and v6e's in GB: taken as written, so the headroom is
# never flattered.
V4 = Chip("TPU v4", 32 * 2**30, 275e12, 1200e9, "docs.cloud.google.com/tpu/docs/v4")
V5E = Chip("TPU v5e", 16 * 10**9, 197e12, 819e9, "docs.cloud.google.com/tpu/docs/v5e")
V5P = Chip("TPU v5p", 95 * 10**9, 459e12, 2765e9, "docs.cloud.google.com/tpu/docs/v5p")
V6E = Chip("TPU v6e", 32 * 10**9, 918e12, 1638e9, "docs.cloud.google.com/tpu/docs/v6e")
# nvidia.com/en-us/data-center/h100: 1,979 TFLOP/s bf16 "with sparsity", half that dense. HBM
# size and bandwidth as CUDA reports them, from the device description XLA compiles against
# (target_specs/h100_sxm.txtpb: device_memory_size, memory_bandwidth; the data sheet's "80GB",
# "3.35TB/s").
H100 = Chip(
    "H100 SXM",
    84_942_979_072,
    989e12,
    3_352_320_000_000,
    "nvidia.com/en-us/data-center/h100 (bf16 dense), target_specs/h100_sxm.txtpb (HBM)",
)


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice or node: which chips, how many, and how to describe their topology to XLA."""

    name: str
    platform: str  # "tpu" or "gpu"
    chip: Chip
    topology: str  # libtpu's "version:AxBxC", or the GPU topology "slices x hosts x devices"
    chips: int
    chip_config: str = "default"  # TPU: "megacore" fuses a chip's two TensorCores into a device
    chips_per_host: tuple[int, int, int] = (2, 2, 1)  # TPU hosts of 4 chips
    spec: str = ""  # GPU: the GpuTargetConfigProto file under target_specs/


TARGETS = {
    t.name: t
    for t in (
        Target("v4-8", "tpu", V4, "v4:2x2x1", 4, "megacore"),
        Target("v4-32", "tpu", V4, "v4:2x2x4", 16, "megacore"),
        Target("v5e-16", "tpu", V5E, "v5e:4x4", 16),
        Target("v5p-32", "tpu", V5P, "v5p:2x2x4", 16, "megacore"),
        Target("v5p-64", "tpu", V5P, "v5p:2x4x4", 32, "megacore"),
        Target("v6e-16", "tpu", V6E, "v6e:4x4", 16),
        Target("h100x8", "gpu", H100, "1x1x8", 8, spec="h100_sxm.txtpb"),
    )
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"Unknown target {name!r}; choose one of {', '.join(TARGETS)}.")
    return TARGETS[name]


def abstract_devices(target: Target | str) -> list[jax.Device]:
    """The devices of `target`, described by its compiler plugin: programs compile for them on
    this host, nothing runs. Fails in one line when the plugin is missing or cannot describe
    the topology."""
    target = get_target(target) if isinstance(target, str) else target
    _host_only()
    if target.platform == "tpu":
        devices = _tpu_devices(target)
    else:
        devices = _gpu_devices(target)
    if len(devices) != target.chips:
        raise RuntimeError(
            f"target {target.name}: topology {target.topology} gave {len(devices)} devices, "
            f"expected {target.chips}; fix its entry in dino_jax/tools/targets.py."
        )
    return devices


def _host_only() -> None:
    """Compiling for other devices needs no local accelerator, and probing for one misleads:
    libtpu queries a TPU VM's metadata server, the CUDA plugin refuses to register without a
    CUDA install. Keep JAX's own backends to the CPU unless the caller chose them."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def _tpu_devices(target: Target) -> list[jax.Device]:
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            f"target {target.name} needs libtpu: pip install -e '.[tpu]' (make test installs it)."
        )
    try:
        topology = topologies.get_topology_desc(
            topology_name=target.topology,
            platform="tpu",
            chip_config_name=target.chip_config,
            chips_per_host_bounds=target.chips_per_host,
            num_slices=1,
        )
    except Exception as e:  # libtpu's errors are long; the first line names the problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"target {target.name}: this libtpu cannot describe topology {target.topology!r} "
            f"({first}); try another libtpu version or target."
        ) from e
    return list(topology.devices)


def _gpu_devices(target: Target) -> list[jax.Device]:
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise RuntimeError(
            f"target {target.name} needs the CUDA plugin: pip install -e '.[gpu-compile]' "
            "(make test installs it)."
        )
    spec = (GPU_SPECS / target.spec).read_text()
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=spec, topology=target.topology
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"target {target.name}: the CUDA plugin cannot describe {target.spec} x "
            f"{target.topology} ({first}); its XLA may not know a field of the spec file."
        ) from e
    return list(topology.devices)
