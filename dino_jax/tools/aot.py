"""The train step compiled ahead of time for a target's devices (dino_jax.tools.targets), and its
report: memory per device against the chip's HBM, XLA's cost, roofline bounds and collectives.

Nothing runs: the state and batch are ShapeDtypeStructs with the step's shardings, so a CPU host
compiles the exact program of a TPU slice or GPU node, at any batch size. The figures are XLA's
static ones for one device; the roofline bounds are the least time the step could take.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import ml_collections

from dino_jax.core import parallel
from dino_jax.core.step import abstract_batch, abstract_state, make_train_step
from dino_jax.tools import targets

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute", "all-to-all")
DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
# One instruction of post-optimisation HLO text: `%name = SHAPE opcode(operands), attributes`.
# Async pairs (`all-gather-start` / `-done`) are counted at `-done`, whose shape is the result
# alone (a `-start` holds the operands too); `async-start` wrappers call the plain opcode, which
# is counted where the wrapped computation spells it.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (?P<shape>.+?) (?P<op>" + "|".join(COLLECTIVES) + r")(?:-done)?\(",
    re.MULTILINE,
)
_REDUCE_SCATTER_FUSION = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (?P<shape>.+?) fusion\(.*calls=%all-reduce-scatter[\w.\-]*"
)
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
# Any instruction, and each array of its shape with its layout (where the memory space shows).
_ANY_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY_LAYOUT = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_WORKSPACE = re.compile(r", [su]8\[\d+\]\{0\}\)$")
# Instructions that move no data themselves (async `-done` halves: counted at their `-start`).
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "copy-done", "slice-done", "opt-barrier",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective of a compiled program: its kind and the arrays it produces."""

    kind: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (HLO dtype, dims) of each result array

    @property
    def bytes(self) -> int:
        return int(sum(DTYPE_BYTES[t] * math.prod(dims) for t, dims in self.arrays))


@dataclasses.dataclass(frozen=True)
class CollectiveTotal:
    count: int
    bytes: int


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """The collectives of post-optimisation HLO text (`compiled.as_text()`), in program order.

    TPU compilers write a reduce-scatter as a fusion calling an `%all-reduce-scatter`
    computation (an all-reduce and this device's slice of it, done as one): counted as one
    reduce-scatter of the fusion's result, its body not counted again."""
    ops = []
    inside_reduce_scatter = False
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and not line.startswith(" "):  # a computation's header
            inside_reduce_scatter = line.startswith("%all-reduce-scatter")
            continue
        if inside_reduce_scatter:
            continue
        if match := _INSTRUCTION.match(line):
            ops.append(CollectiveOp(match["op"], _arrays(match["shape"])))
        elif match := _REDUCE_SCATTER_FUSION.match(line):
            ops.append(CollectiveOp("reduce-scatter", _arrays(match["shape"])))
    return ops


def _arrays(shape: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(
        (dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims in _ARRAY.findall(shape)
        if dtype in DTYPE_BYTES
    )


def _hbm_and_onchip(shape: str) -> tuple[int, int]:
    """Bytes of a shape's arrays in HBM (memory space 0) and on chip (any other space)."""
    hbm = onchip = 0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        if dtype not in DTYPE_BYTES:
            continue
        size = int(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
        space = _MEMORY_SPACE.search(layout or "")
        if space and space.group(1) != "0":
            onchip += size
        else:
            hbm += size
    return hbm, onchip


def hbm_traffic(hlo_text: str) -> int:
    """Bytes one step reads from and writes to HBM, by our count of the compiled program.

    Each top-level instruction counts its operands and results that its layouts place in HBM
    (memory space 0); a prefetch or eviction (`copy-start`, `slice-start`) counts the slice it
    moves, once; a library call's scratch workspace is left out. On TPUs, XLA's "bytes
    accessed" counts every operand and result wherever it lies, including the on-chip memories
    that memory-space assignment stages data in (v4's CMEM and VMEM, spaces S(1..)), and the
    whole operand of a sliced prefetch: an upper bound of HBM traffic, not an estimate of it. On
    GPUs XLA's generic analysis counts the cuBLAS and cuDNN calls as moving nothing; this counts
    their operands and results.
    """
    computations: dict[str, list[re.Match]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?(%[\w.\-]+) ", line)
        if header and line.rstrip().endswith("{"):
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif current is not None and (instruction := _ANY_INSTRUCTION.match(line)):
            current.append(instruction)
    shapes = {m.group(1): m.group(2) for body in computations.values() for m in body}
    total = 0
    for instruction in computations.get(entry, []):
        _, shape, opcode, rest = instruction.groups()
        if opcode in _NO_TRAFFIC:
            continue
        if opcode in ("copy-start", "slice-start"):  # ((source), destination, context)
            moved = _ARRAY_LAYOUT.search(shape[shape.index(")") + 1 :])
            total += sum(_hbm_and_onchip(moved.group(0)))
            continue
        if opcode == "custom-call":  # (result, scratch): the workspace is no output
            shape = _WORKSPACE.sub(")", shape)
        operands = re.findall(r"(%[\w.\-]+)", rest.split("), ")[0])
        total += _hbm_and_onchip(shape)[0]
        total += sum(_hbm_and_onchip(shapes.get(name, ""))[0] for name in operands)
    return total


def laid_out_bytes(dtype: str, dims: str, layout: str = "") -> int:
    """Bytes of one array as its layout stores it: `{minor_to_major:T(a,b)...}` tiles its most
    minor dimensions in memory order, padding each to a multiple of the tile's (TPU's (8,128):
    a [.., 32, 3] image's 3 channels take 128 lanes). Sub-tiles within a tile pad nothing more."""
    shape = [int(d) for d in dims.split(",") if d]
    inner = (layout or "{}")[1:-1]
    order, _, tiling = inner.partition(":")
    minor_to_major = [int(d) for d in order.split(",") if d.strip().isdigit()]
    if len(minor_to_major) == len(shape):
        shape = [shape[d] for d in reversed(minor_to_major)]
    tile = re.match(r"T\(([\d,]+)\)", tiling)
    if tile and shape:
        sizes = [int(t) for t in tile.group(1).split(",")]
        for i, t in enumerate(reversed(sizes), start=1):
            if i <= len(shape):
                shape[-i] = -(-shape[-i] // t) * t
    return int(DTYPE_BYTES[dtype] * math.prod(shape))


def entry_parameter_bytes(hlo_text: str, prefix: str) -> int | None:
    """Bytes, as laid out, of the entry parameters whose source name (`op_name` metadata:
    "batch['global']", "state.student[...]") starts with `prefix`; None if none is named so."""
    entry = hlo_text[hlo_text.find("\nENTRY") :]
    total, found = 0, False
    for line in entry.splitlines():
        match = re.match(r"\s*%[\w.\-]+ = (\w+)\[([\d,]*)\](\{[^}]*\})? parameter\(", line)
        name = re.search(r'op_name="([^"]*)"', line)
        if match and name and name.group(1).startswith(prefix):
            total += laid_out_bytes(*match.groups())
            found = True
    return total if found else None


def collective_totals(ops: list[CollectiveOp]) -> dict[str, CollectiveTotal]:
    """Count and result bytes per kind, every kind present (zeros included)."""
    return {
        kind: CollectiveTotal(
            sum(op.kind == kind for op in ops), sum(op.bytes for op in ops if op.kind == kind)
        )
        for kind in COLLECTIVES
    }


@dataclasses.dataclass
class CompileReport:
    """One config's step compiled for one target. Bytes, FLOPs and times are per device."""

    label: str
    target: str
    chip: str
    devices: int
    mesh: dict[str, int]
    batch_size: int
    dtype: str
    compile_s: float
    argument_bytes: int  # state + this device's share of the batch
    batch_bytes: int  # this device's share of the batch as laid out (TPUs pad it to tiles)
    output_bytes: int
    temp_bytes: int
    alias_bytes: int  # outputs written into donated arguments (the state)
    hbm_bytes: int
    flops: float
    bytes_accessed: float  # XLA's figure: an upper bound of HBM traffic (see hbm_traffic)
    hbm_traffic: int  # our count of HBM reads and writes (hbm_traffic)
    cost_source: str
    peak_flops: float
    hbm_bandwidth: float
    collectives: dict[str, CollectiveTotal]
    hlo: str = dataclasses.field(repr=False)  # post-optimisation HLO text

    @property
    def state_bytes(self) -> int:
        return self.argument_bytes - self.batch_bytes

    @property
    def peak_bytes(self) -> int:
        """XLA's static peak: arguments + outputs + temporaries, donated buffers counted once."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def headroom(self) -> float:
        """The share of HBM left over at the static peak (negative: it does not fit)."""
        return 1 - self.peak_bytes / self.hbm_bytes

    @property
    def compute_s(self) -> float:
        return self.flops / self.peak_flops

    @property
    def memory_s(self) -> float:
        """The least time to move the step's HBM traffic (our count) at the chip's bandwidth."""
        return self.hbm_traffic / self.hbm_bandwidth

    @property
    def xla_memory_s(self) -> float:
        """The same bound from XLA's bytes accessed."""
        return self.bytes_accessed / self.hbm_bandwidth

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def compile_step(config: ml_collections.ConfigDict, target: targets.Target | str):
    """(compiled, lowered, mesh) of `make_train_step(config, mesh)` over the target's devices,
    `config.compute.mesh` laid over them."""
    target = targets.get_target(target) if isinstance(target, str) else target
    mesh = parallel.make_mesh(config.compute.mesh, targets.abstract_devices(target))
    step = make_train_step(config, mesh)
    lowered = step.lower(abstract_state(config, mesh), abstract_batch(config, mesh))
    # Triton GEMM autotuning times candidate kernels on a GPU; without one, cuBLAS it is.
    options = {"xla_gpu_enable_triton_gemm": False} if target.platform == "gpu" else None
    return lowered.compile(compiler_options=options), lowered, mesh


def program_cost(compiled, lowered, devices: int) -> tuple[float, float, str]:
    """(FLOPs, bytes accessed, where they come from) of one device's program.

    XLA's own analysis of the compiled program where the backend gives one (TPU). The CUDA
    plugin gives none without a GPU, so there XLA's generic analysis stands in: bytes from the
    compiled program (fusions count their operands and results once), FLOPs from the program
    before optimisation split evenly over the devices, since the compiled one hides its matmuls
    in cuBLAS calls the generic analysis counts as 0 FLOPs.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jaxlibs: one dict per program
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        return float(cost["flops"]), float(cost["bytes accessed"]), "XLA cost analysis"
    # Private modules, imported here: only this fallback needs them.
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    cpu = xla_bridge.get_backend("cpu")
    (module,) = compiled.runtime_executable().hlo_modules()
    after = _jax.hlo_module_cost_analysis(cpu, module)
    before = _jax.hlo_module_cost_analysis(cpu, lowered.compiler_ir("hlo").as_hlo_module())
    return (
        float(before["flops"]) / devices,
        float(after["bytes accessed"]),
        "XLA generic analysis (FLOPs before optimisation / devices)",
    )


def compile_report(
    config: ml_collections.ConfigDict, target: targets.Target | str, label: str = ""
) -> CompileReport:
    """Compile the train step of `config` for `target` and report it (see CompileReport)."""
    target = targets.get_target(target) if isinstance(target, str) else target
    config = config.copy_and_resolve_references()
    if config.train.OFFICIAL_EPOCH_LENGTH is None:
        config.train.OFFICIAL_EPOCH_LENGTH = 1000  # any value: the schedules only need one
    start = time.perf_counter()
    compiled, lowered, mesh = compile_step(config, target)
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    batch = abstract_batch(config, mesh)
    flops, bytes_accessed, cost_source = program_cost(compiled, lowered, mesh.size)
    hlo = compiled.as_text()
    return CompileReport(
        label=label,
        target=target.name,
        chip=target.chip.name,
        devices=mesh.size,
        mesh=dict(mesh.shape),
        batch_size=config.train.batch_size,
        dtype=config.compute.dtype,
        compile_s=compile_s,
        argument_bytes=memory.argument_size_in_bytes,
        batch_bytes=entry_parameter_bytes(hlo, "batch[")
        or sum(x.size * x.dtype.itemsize for x in batch.values()) // mesh.size,
        output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        hbm_bytes=target.chip.hbm_bytes,
        flops=flops,
        bytes_accessed=bytes_accessed,
        hbm_traffic=hbm_traffic(hlo),
        cost_source=cost_source,
        peak_flops=target.chip.peak_flops,
        hbm_bandwidth=target.chip.hbm_bandwidth,
        collectives=collective_totals(collective_ops(hlo)),
        hlo=hlo,
    )


_COLUMNS = (
    "config", "target", "mesh", "batch", "dtype", "compile s", "arguments GiB (state)",
    "temp GiB", "output GiB", "alias GiB", "peak GiB / HBM", "headroom", "GFLOP",
    "GB accessed (XLA)", "GB HBM (ours)", "compute ms", "memory ms (XLA / ours)", "bound",
    *COLLECTIVES,
)  # fmt: skip
_TEXT_COLUMNS = ("config", "target", "mesh", "dtype", "bound")
_ALIGN = "".join("---|" if c in _TEXT_COLUMNS else "---:|" for c in _COLUMNS)
TABLE_HEADER = f"| {' | '.join(_COLUMNS)} |\n|{_ALIGN}"


def table_row(r: CompileReport) -> str:
    """The report as a row under TABLE_HEADER (per device; collectives as count / MiB)."""
    gib = 2**30
    mesh = " x ".join(f"{name} {size}" for name, size in r.mesh.items())
    collectives = " | ".join(
        f"{t.count} / {t.bytes / 2**20:.2f}" if t.count else "0" for t in r.collectives.values()
    )
    return (
        f"| {r.label} | {r.target} ({r.devices} x {r.chip}) | {mesh} | {r.batch_size} | {r.dtype} "
        f"| {r.compile_s:.0f} | {r.argument_bytes / gib:.3f} ({r.state_bytes / gib:.3f}) "
        f"| {r.temp_bytes / gib:.3f} | {r.output_bytes / gib:.3f} | {r.alias_bytes / gib:.3f} "
        f"| {r.peak_bytes / gib:.2f} / {r.hbm_bytes / gib:.1f} | {100 * r.headroom:.0f}% "
        f"| {r.flops / 1e9:.4g} | {r.bytes_accessed / 1e9:.4g} | {r.hbm_traffic / 1e9:.4g} "
        f"| {1e3 * r.compute_s:.4g} | {1e3 * r.xla_memory_s:.4g} / {1e3 * r.memory_s:.4g} "
        f"| {r.bound} | {collectives} |"
    )
