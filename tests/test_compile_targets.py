"""The train step compiled on this CPU host for a TPU slice and an 8-GPU node (dino_jax.tools.aot):
the accelerators' program (no CPU kernels, no per-block conditionals), float32 gradient reductions
in bfloat16 runs, and the state split 4 ways under fsdp 4.

Each compilation runs in a subprocess, once per session whatever the test workers: libtpu must
not load into a test worker, and only one process at a time may load it, so TPU compilations
hold the lock every libtpu user on this machine takes. The subprocess runs the interpreter of
$DINO_JAX_AOT_PYTHON (`make test` sets it to a venv holding libtpu and the CUDA plugin, which
would otherwise make every JAX process of the main venv probe for a TPU and a GPU).
"""

from __future__ import annotations

import fcntl
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

from dino_jax.benchmark import parse_configs
from dino_jax.core.step import init_state
from dino_jax.cpu import attention_kernel
from dino_jax.tools import aot, targets

REPO = Path(__file__).resolve().parents[1]
LIBTPU_LOCK = Path(tempfile.gettempdir()) / "libtpu.lock"
TARGETS = {"tpu": "v4-8", "gpu": "h100x8"}
AOT_PYTHON = os.environ.get("DINO_JAX_AOT_PYTHON", sys.executable)
FSDP = 4
# The smoke ViT (batch 8: a multiple of both targets' device counts) in bfloat16, at width 128:
# every weight matrix (qkv 128x384 included) is then over parallel.MIN_FSDP_SIZE and split over
# fsdp, so the state divides by 4 but for small vectors.
RECIPE = [
    "--config",
    "configs/vit_small16.py:smoke",
    "--config.compute.dtype=bfloat16",
    "--config.student.embed_dim=128",
]
MESHES = {
    # Parameters replicated: every cross-device sum is a gradient or a batch statistic.
    "data": "--config.compute.mesh=(('data', -1), ('fsdp', 1))",
    "fsdp": f"--config.compute.mesh=(('data', -1), ('fsdp', {FSDP}))",
}
# DINOv2's smoke step with the batch-subset stochastic depth (rate > 0.1) and 4 ranks of 2 images
# on the 4 chips of a v4-8: each rank's subsets and masked-patch buffers stay on its chip.
DINOV2_RECIPE = [
    "--config",
    "configs/dinov2_vits14.py:smoke",
    "--config.student.drop_path_rate=0.4",
    "--config.train.rank_batch_size=2",
    "--config.dino.koleo_loss_weight=0.1",
]
COMPILE = """
import pickle, sys
from dino_jax.tools import aot
from dino_jax.benchmark import parse_configs
label, config = parse_configs(sys.argv[3:])[0]
report = aot.compile_report(config, sys.argv[1], label)
open(sys.argv[2], "wb").write(pickle.dumps(report))
"""


def compile_report(target: str, mesh: str, shared: Path) -> aot.CompileReport:
    """aot.compile_report in a fresh process (TPU: holding the libtpu lock), once per session:
    the first test worker to get here compiles, the others read its report."""
    platform = targets.get_target(target).platform
    module, extra = {"tpu": ("libtpu", "tpu"), "gpu": ("jax_plugins.xla_cuda12", "gpu-compile")}[
        platform
    ]
    probe = [AOT_PYTHON, "-c", f"import importlib.util as u; assert u.find_spec({module!r})"]
    if subprocess.run(probe, capture_output=True).returncode:
        pytest.fail(
            f"{module} is not installed for {AOT_PYTHON}, so nothing compiles for {target}: "
            f"`make test` installs it (pip install -e '.[{extra}]')."
        )
    out = shared / f"{target}-{mesh}.pkl"
    with open(shared / f"{target}-{mesh}.lock", "a") as mine, open(LIBTPU_LOCK, "a") as libtpu:
        fcntl.flock(mine, fcntl.LOCK_EX)
        if not out.exists():
            if platform == "tpu":
                fcntl.flock(libtpu, fcntl.LOCK_EX)
            recipe = DINOV2_RECIPE if mesh == "dinov2" else [*RECIPE, MESHES[mesh]]
            command = [AOT_PYTHON, "-c", COMPILE, target, str(out), *recipe]
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
            if result.returncode:
                pytest.fail(f"compiling for {target} failed:\n{result.stderr[-3000:]}")
    return pickle.loads(out.read_bytes())


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A directory every test worker of this session sees (pytest-xdist's recipe)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(params=list(TARGETS))
def platform(request) -> str:
    return request.param


@pytest.fixture
def data_report(platform, shared_dir) -> aot.CompileReport:
    return compile_report(TARGETS[platform], "data", shared_dir)


@pytest.fixture
def fsdp_report(platform, shared_dir) -> aot.CompileReport:
    return compile_report(TARGETS[platform], "fsdp", shared_dir)


def _abstract_state():
    _, config = parse_configs(RECIPE)[0]
    return jax.eval_shape(lambda key: init_state(config, key), jax.random.key(0))


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_no_cpu_kernels_or_per_block_conditionals(data_report):
    hlo = data_report.hlo
    calls = set(re.findall(r'custom_call_target="([^"]+)"', hlo))
    cpu_kernels = {attention_kernel.FORWARD, attention_kernel.BACKWARD}
    assert not {c for c in calls if c.startswith("dino_") or c in cpu_kernels}, calls
    # The CPU layers' gradient barrier made one conditional per block; the one allowed is
    # optim.py's last-layer freeze (optax.transforms.conditionally_mask).
    conditionals = len(re.findall(r" conditional\(", hlo))
    assert conditionals <= 1, f"{conditionals} conditionals in the {data_report.target} program"


@pytest.mark.slow
def test_gradients_reduce_in_float32(data_report):
    """bfloat16 matmuls, float32 parameters: with the parameters replicated, the cross-device
    sums are gradients and batch statistics, all float32, and carry the gradients (XLA may
    combine and flatten them, so shapes cannot tell which is which; and may sum a gradient
    before a linear map that widens it, like the position embedding's interpolation, so 90%)."""
    reductions = [
        (op.kind, dtype, dims)
        for op in aot.collective_ops(data_report.hlo)
        if op.kind in ("all-reduce", "reduce-scatter")
        for dtype, dims in op.arrays
    ]
    assert all(dtype == "f32" for _, dtype, _ in reductions), [
        r for r in reductions if r[1] != "f32"
    ]
    # A reduce-scatter leaves each device its share of a sum over all of them.
    shares = {"all-reduce": 1, "reduce-scatter": data_report.devices}
    reduced = sum(4 * math.prod(dims) * shares[kind] for kind, _, dims in reductions)
    student = _nbytes(_abstract_state().student)
    assert reduced >= 0.9 * student, f"{reduced} B reduced, student parameters {student} B"


@pytest.mark.slow
def test_fsdp_splits_the_state(fsdp_report):
    """Per device, the state's arguments are a quarter of the state (+15%: small vectors, norms
    and biases, stay whole, and TPUs pad them to their tiles)."""
    total = _nbytes(_abstract_state())
    ratio = fsdp_report.state_bytes / (total / FSDP)
    assert 0.95 < ratio < 1.15, f"{fsdp_report.state_bytes} B per device of {total} B: {ratio:.2f}"


@pytest.mark.slow
def test_fsdp_reduce_scatters_gradients_and_gathers_weights(fsdp_report):
    """Each device receives its [D/4, 3D] rows of the qkv kernel's gradient from a reduce-scatter,
    not the whole [D, 3D] from an all-reduce; weights are gathered for use, so no split makes
    XLA reshard activations (collective-permutes, all-to-alls)."""
    ops = aot.collective_ops(fsdp_report.hlo)
    width = 128  # RECIPE's embed_dim
    shard, whole = ("f32", (width // FSDP, 3 * width)), ("f32", (width, 3 * width))
    assert [op for op in ops if op.kind == "reduce-scatter" and shard in op.arrays]
    assert not [op for op in ops if op.kind == "all-reduce" and whole in op.arrays]
    totals = aot.collective_totals(ops)
    assert totals["collective-permute"].count == totals["all-to-all"].count == 0, totals


@pytest.mark.slow
def test_dinov2_keeps_each_ranks_work_on_its_devices(shared_dir):
    """DINOv2's per-rank parts (stochastic-depth subsets, the masked patches' buffers and
    heads) run where the rank's images are: with the parameters replicated the only collectives
    are the gradients' and the losses' all-reduces, no activation is gathered or moved."""
    report = compile_report(TARGETS["tpu"], "dinov2", shared_dir)
    totals = aot.collective_totals(aot.collective_ops(report.hlo))
    assert totals["all-reduce"].count > 0
    moved = ("all-gather", "reduce-scatter", "collective-permute", "all-to-all")
    assert all(totals[kind].count == 0 for kind in moved), totals


@pytest.mark.slow
def test_report_figures(fsdp_report):
    r = fsdp_report
    assert r.devices == targets.get_target(r.target).chips
    assert r.mesh == {"data": r.devices // FSDP, "fsdp": FSDP}
    assert r.flops > 0 and r.bytes_accessed > 0
    if r.target.startswith("v"):  # TPU: XLA's counts on-chip staging too, and whole slices
        assert 0 < r.hbm_traffic < r.bytes_accessed
    else:  # GPU: XLA's generic analysis counts no bytes for the cuBLAS and cuDNN calls
        assert r.hbm_traffic > r.bytes_accessed > 0
    assert 0 < r.peak_bytes < r.hbm_bytes and 0 < r.headroom < 1
    assert r.bound in ("compute", "memory")
    assert r.collectives["all-gather"].count > 0  # the fsdp-split parameters, gathered for use
    assert aot.table_row(r).count("|") == aot.TABLE_HEADER.splitlines()[0].count("|")


def test_hbm_traffic_counts_hbm_operands_and_results_and_moved_slices():
    """A hand-made program: a fusion reading an HBM parameter (f32[64,128]: 32 KiB) and a
    CMEM-staged one (S(3), not HBM), writing 16 KiB to HBM; a prefetch of a [16,128] slice of
    that parameter (8 KiB moved, counted once for its start/done pair); a copy from HBM to HBM
    (2 x 4 KiB); a cuBLAS call reading two [8,128] arrays and writing one (its 4 MiB workspace is
    no traffic). Constants and parameters themselves move nothing."""
    hlo = """
HloModule m

%fused (a: f32[64,128], b: f32[64,128]) -> bf16[64,128] {
  %a = f32[64,128]{1,0:T(8,128)} parameter(0)
  %b = f32[64,128]{1,0:T(8,128)S(3)} parameter(1)
  %add = f32[64,128]{1,0:T(8,128)} add(%a, %b)
  ROOT %c = bf16[64,128]{1,0:T(8,128)(2,1)} convert(%add)
}

ENTRY %main (p0: f32[64,128], p1: f32[64,128], p2: f32[8,128]) -> bf16[64,128] {
  %p0 = f32[64,128]{1,0:T(8,128)} parameter(0)
  %p1 = f32[64,128]{1,0:T(8,128)S(3)} parameter(1)
  %p2 = f32[8,128]{1,0:T(8,128)} parameter(2)
  %k = f32[] constant(1)
  %s-start = ((f32[64,128]{1,0:T(8,128)}), f32[16,128]{1,0:T(8,128)S(3)}, s32[]{:S(2)}) slice-start(%p0), slice={[0:16], [0:128]}
  %s-done = f32[16,128]{1,0:T(8,128)S(3)} slice-done(%s-start)
  %copy = f32[8,128]{1,0:T(8,128)} copy(%p2)
  %gemm = (f32[8,128]{1,0}, s8[4194304]{0}) custom-call(%copy, %p2), custom_call_target="__cublas$gemm"
  ROOT %f = bf16[64,128]{1,0:T(8,128)(2,1)} fusion(%p0, %p1), kind=kLoop, calls=%fused
}
"""  # noqa: E501
    fusion, prefetch, copy, gemm = 64 * 128 * 6, 16 * 128 * 4, 2 * 8 * 128 * 4, 3 * 8 * 128 * 4
    assert aot.hbm_traffic(hlo) == fusion + prefetch + copy + gemm


def test_collective_parse_counts_async_pairs_once():
    hlo = """
  %all-gather-start = (bf16[4,64]{1,0}, bf16[16,64]{1,0}) all-gather-start(%p), dimensions={0}
  %all-gather-done = bf16[16,64]{1,0} all-gather-done(%all-gather-start)
  %all-reduce.1 = (f32[64,128]{1,0:T(8,128)}, f32[7]{0}) all-reduce(%a, %b), to_apply=%add
  %rs = f32[32,128]{1,0} reduce-scatter(%g), dimensions={0}, to_apply=%add
  ROOT %cp-done = u8[10]{0} collective-permute-done(%cp-start)
"""
    totals = aot.collective_totals(aot.collective_ops(hlo))
    assert totals["all-gather"] == aot.CollectiveTotal(1, 16 * 64 * 2)
    assert totals["all-reduce"] == aot.CollectiveTotal(1, (64 * 128 + 7) * 4)
    assert totals["reduce-scatter"] == aot.CollectiveTotal(1, 32 * 128 * 4)
    assert totals["collective-permute"] == aot.CollectiveTotal(1, 10)
    assert totals["all-to-all"] == aot.CollectiveTotal(0, 0)


def test_collective_parse_counts_tpu_reduce_scatter_fusions():
    """TPU writes a reduce-scatter as a fusion calling an all-reduce and a slice: one
    reduce-scatter of the fusion's result, the all-reduce inside not counted."""
    hlo = """
%all-reduce-scatter.1 (input.1: f32[128,512]) -> f32[32,512] {
  %input.1 = f32[128,512]{1,0:T(8,128)S(3)} parameter(0)
  %all-reduce.181 = f32[128,512]{1,0:T(8,128)} all-reduce(%input.1), to_apply=%add
  ROOT %ds = f32[32,512]{1,0:T(8,128)S(3)} dynamic-slice(%all-reduce.181, %i, %j)
}

ENTRY %main (p: f32[128,512]) -> f32[32,512] {
  %p = f32[128,512]{1,0:T(8,128)} parameter(0)
  %ar = f32[7]{0:T(128)} all-reduce(%q), to_apply=%add
  ROOT %fusion.3 = f32[32,512]{1,0:T(8,128)S(3)} fusion(%p), kind=kCustom, calls=%all-reduce-scatter.1
}
"""  # noqa: E501
    totals = aot.collective_totals(aot.collective_ops(hlo))
    assert totals["reduce-scatter"] == aot.CollectiveTotal(1, 32 * 512 * 4)
    assert totals["all-reduce"] == aot.CollectiveTotal(1, 7 * 4)


def test_laid_out_bytes_pad_the_tiled_dimensions():
    """Layouts list dimensions minor to major; a tile pads the most minor ones in memory order.
    Without a layout, the plain size."""
    # {1,2,3,0}: memory order (major to minor) is dims 0, 3, 2, 1, [2, 3, 32, 32]; the last two
    # padded to (8, 128) multiples.
    assert aot.laid_out_bytes("f32", "2,32,32,3", "{1,2,3,0:T(8,128)}") == 2 * 3 * 32 * 128 * 4
    # Channels minor: [2, 32, 32, 3] -> (32 rows, 3 -> 128 lanes).
    assert aot.laid_out_bytes("f32", "2,32,32,3", "{3,2,1,0:T(8,128)}") == 2 * 32 * 32 * 128 * 4
    assert aot.laid_out_bytes("f32", "384", "{0:T(512)}") == 512 * 4
    assert aot.laid_out_bytes("bf16", "5,7", "{1,0:T(8,128)(2,1)}") == 8 * 128 * 2
    assert aot.laid_out_bytes("u8", "5,7", "") == 35


def test_unknown_target_names_the_choices():
    with pytest.raises(ValueError, match="Unknown target 'v9-8'; choose one of v4-8, v4-32"):
        targets.get_target("v9-8")


def test_targets_count_their_chips():
    """One device per chip: the topology's dimensions multiply to the chip count."""
    for target in targets.TARGETS.values():
        dims = target.topology.partition(":")[2] or target.topology
        assert math.prod(int(d) for d in dims.split("x")) == target.chips, target.name
