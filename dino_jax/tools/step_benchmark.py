"""`benchmark step`: the real jitted train step on random data, per config: compile time, median
step time, images/s, FLOPs from XLA's cost analysis, MFU against the device's peak, peak memory."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax.core import parallel
from dino_jax.core.config import crops_summary
from dino_jax.core.step import abstract_batch, init_state, make_train_step
from dino_jax.cpu import attention_kernel, host_memory

# Dense peak FLOP/s per chip by matmul input dtype (vendor data sheets; GPUs: SXM parts, without
# sparsity; float32 on GPUs is TF32 on the tensor cores, XLA's default precision there; TPUs do
# float32 matmuls as bfloat16 passes at the default precision).
PEAK_FLOPS = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p reports "TPU v5"
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},
    "H200": {"bfloat16": 989e12, "float32": 495e12},
}


def device_peak_flops(device: jax.Device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device for matmuls in `dtype`, where the figure comes from).

    Accelerators: the table above, matched on `device_kind`. CPUs: a measured matmul in `dtype`.
    """
    if device.platform == "cpu":
        return measured_matmul_peak(device, dtype), "measured matmul"
    kind = device.device_kind
    # The longest matching name wins ("TPU v5 lite" before "TPU v5").
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name][dtype], f"{name} data sheet"
    raise ValueError(f"No peak FLOP/s known for device_kind={kind!r}: add it to PEAK_FLOPS.")


def mesh_peak_flops(devices, dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of all `devices` together. CPU devices share the host's cores, so their
    peak is the host's measured one, however many devices the host is split into."""
    peak, source = device_peak_flops(devices[0], dtype)
    if devices[0].platform == "cpu":
        return peak, source
    return peak * len(devices), source


@functools.cache
def measured_matmul_peak(
    device: jax.Device, dtype: str = "float32", size: int = 2048, repeats: int = 7
) -> float:
    """The best FLOP/s of a [size, size] @ [size, size] matmul in `dtype` on `device` (all
    cores), accumulated in float32 as the step's are (for bfloat16, on the CPU's matrix units
    where it has them), measured once per process and dtype, so that the configs of one run
    share one peak."""
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """A global batch of noise shaped as the method's batch spec: uint8 levels where it asks
    for uint8 (crops the step augments on device), booleans (DINOv2's masks) True at 15% (the
    official masks' rate: half the crops at ratios of 0.1 to 0.5), else normal floats."""
    rng = np.random.default_rng(seed)
    batch = {}
    for key, spec in abstract_batch(config).items():
        if spec.dtype == np.uint8:
            batch[key] = rng.integers(0, 256, spec.shape, dtype=np.uint8)
        elif spec.dtype == np.bool_:
            batch[key] = rng.random(spec.shape) < 0.15
        else:
            batch[key] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return batch


@dataclasses.dataclass
class StepReport:
    """What `benchmark step` measures for one config; FLOPs are for the whole (global) step."""

    compile_s: float
    step_s: float  # median
    cpu_s: float  # median process CPU time per step: the work done, whatever else runs
    images_per_s: float
    flops: float  # per step, all devices
    flops_per_s: float
    peak_flops: float  # all devices
    peak_source: str
    mfu: float
    peak_memory_bytes: float  # per device
    memory_source: str


def peak_memory(device: jax.Device, compiled) -> tuple[float, str]:
    """Peak bytes on one device: the allocator's high-water mark where the backend keeps one,
    else XLA's static estimate (arguments + outputs + temporaries - donated aliases)."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "memory_stats"
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return float(total), "memory_analysis"


def step_flops(compiled, num_devices: int) -> float:
    """FLOPs of one step from XLA's cost analysis (per device program) times the device count."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jaxlibs: one dict per program
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA's cost analysis gave no 'flops' for this backend")
    return float(cost["flops"]) * num_devices


def counted_program(config: ml_collections.ConfigDict, mesh, state, batch, compiled):
    """The compiled step whose cost analysis counts all of the step's FLOPs.

    XLA cannot see inside the CPU attention kernel's custom calls, so a step that has them is
    counted as compiled with the stock layers instead: the same maths, one compile more.
    """
    if attention_kernel.FORWARD not in compiled.as_text():
        return compiled
    with_xla = config.copy_and_resolve_references()
    with_xla.compute.cpu_tuning = False
    return make_train_step(with_xla, mesh).lower(state, batch).compile()


@dataclasses.dataclass
class PreparedStep:
    """One config's compiled step, its state and its batch, ready to be timed."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    compiled: Any
    state: Any
    batch: dict[str, jax.Array]
    compile_s: float
    times: list[float] = dataclasses.field(default_factory=list)
    cpu_times: list[float] = dataclasses.field(default_factory=list)

    def run(self, timed: bool) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        if timed:
            self.times.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu_start)
        if not math.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"the step gave loss={float(metrics['loss'])}")


def prepare_step(config: ml_collections.ConfigDict) -> PreparedStep:
    """Compile the train step of `config` ahead of time, with its state and a random batch."""
    if config.train.OFFICIAL_EPOCH_LENGTH is None:
        config.train.OFFICIAL_EPOCH_LENGTH = 1000  # any value: the schedules only need one
    mesh = parallel.make_mesh(config.compute.mesh)
    state = init_state(config, jax.random.key(config.train.seed), mesh)
    batch = parallel.to_global(random_batch(config), mesh)
    start = time.perf_counter()
    compiled = make_train_step(config, mesh).lower(state, batch).compile()
    return PreparedStep(config, mesh, compiled, state, batch, time.perf_counter() - start)


def report_step(step: PreparedStep) -> StepReport:
    """The figures of a prepared step's timed runs."""
    config, mesh = step.config, step.mesh
    device, n = mesh.devices.flat[0], mesh.size
    counted = counted_program(config, mesh, step.state, step.batch, step.compiled)
    flops = step_flops(counted, n)
    step_s = statistics.median(step.times)
    peak, peak_source = mesh_peak_flops(list(mesh.devices.flat), config.compute.dtype)
    memory, memory_source = peak_memory(device, step.compiled)
    return StepReport(
        compile_s=step.compile_s,
        step_s=step_s,
        cpu_s=statistics.median(step.cpu_times),
        images_per_s=config.train.batch_size / step_s,
        flops=flops,
        flops_per_s=flops / step_s,
        peak_flops=peak,
        peak_source=peak_source,
        mfu=flops / step_s / peak,
        peak_memory_bytes=memory,
        memory_source=memory_source,
    )


def benchmark_steps(
    configs: list[ml_collections.ConfigDict], steps: int, warmup: int
) -> list[StepReport]:
    """Time the configs' steps in turn, one step of each per round, in one process: on a machine
    whose speed drifts, every config sees the same minutes (compare these, not separate runs)."""
    prepared = [prepare_step(config) for config in configs]
    for i in range(warmup + steps):
        for step in prepared:
            step.run(timed=i >= warmup)
    return [report_step(step) for step in prepared]


def benchmark_step(config: ml_collections.ConfigDict, steps: int, warmup: int) -> StepReport:
    """Compile the train step of `config` ahead of time and time `steps` runs on random data."""
    step = prepare_step(config)
    for i in range(warmup + steps):
        step.run(timed=i >= warmup)
    return report_step(step)


def run(args: argparse.Namespace, configs: list[tuple[str, ml_collections.ConfigDict]]) -> None:
    """Print the table of `benchmark step` for `configs` ([(label, config)])."""
    if all(c.compute.cpu_tuning and host_memory.cpu_run(c.compute.platform) for _, c in configs):
        host_memory.reuse_freed_memory()  # as the training job does, before JAX's threads start
    devices = jax.devices()
    order = "in turn, one step of each per round" if args.interleave else "one config after another"
    print(
        f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), JAX {jax.__version__}"
        f", median of {args.steps} steps after {args.warmup} warm-up, {order}\n"
    )
    print(
        "| config | model | batch, crops | dtype | compile s | step s | images/s | GFLOP/step "
        "| achieved TFLOP/s | peak TFLOP/s | MFU | peak memory GiB | CPU s/step |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if args.interleave:
        reports = benchmark_steps([c for _, c in configs], args.steps, args.warmup)
    else:
        reports = (benchmark_step(c, args.steps, args.warmup) for _, c in configs)
    rows = []
    for (label, config), r in zip(configs, reports, strict=True):
        model = (
            f"{config.student.arch}/{config.student.patch_size}, K={config.dino.head_n_prototypes}"
        )
        print(
            f"| {label} | {model} | {config.train.batch_size}, {crops_summary(config)} "
            f"| {config.compute.dtype} "
            f"| {r.compile_s:.1f} | {r.step_s:.3f} | {r.images_per_s:.2f} | {r.flops / 1e9:.1f} "
            f"| {r.flops_per_s / 1e12:.3f} | {r.peak_flops / 1e12:.3f} ({r.peak_source}) "
            f"| {100 * r.mfu:.1f}% | {r.peak_memory_bytes / 2**30:.2f} ({r.memory_source}) "
            f"| {r.cpu_s:.2f} |",
            flush=True,
        )
        rows.append((label, r))
    if args.interleave and len(rows) > 1:
        first_label, first = rows[0]
        print(f"\nspeed against {first_label} (its median step time over each one's):")
        for label, r in rows[1:]:
            print(f"  {label}: {first.step_s / r.step_s:.3f}x")
