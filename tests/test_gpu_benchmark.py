"""launch/gpu/benchmark.sh, run for real with DEVICE=cpu (both sides tiny): each side's figures
and the closing markdown table; one side failing still leaves the other's row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu" / "benchmark.sh"
HEADER = (
    "| date | commit | GPU | implementation | precision | batch, crops | images/s | GFLOP/step "
    "| MFU | peak memory GiB | ours / reference |"
)


def run(tmp_path, **env):
    full_env = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path), **env}
    # The suite's 8 forced CPU devices (conftest.py) would split the batch of 2 eight ways.
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run(
        ["bash", str(SCRIPT)],
        env=full_env,
        cwd=tmp_path,  # the script finds the repository from its own path
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


def table(stdout):
    """The closing table's two rows, {column: cell}; the table must end the output."""
    lines = stdout.rstrip("\n").splitlines()
    assert lines[-4] == HEADER, stdout
    assert lines[-3].startswith("|---|")
    return [dict(zip(cells(HEADER), cells(line), strict=True)) for line in lines[-2:]]


@pytest.mark.slow
def test_cpu_run_prints_both_sides_and_the_table(tmp_path):
    result = run(tmp_path, DEVICE="cpu", COMMIT="abc1234")
    assert result.returncode == 0, result.stdout + result.stderr
    ours, reference = table(result.stdout)
    for row in (ours, reference):
        assert row["commit"] == "abc1234" and row["GPU"].startswith("cpu")
        assert row["batch, crops"] == "2, 2x32 + 2x16"  # the same work on both sides
        assert float(row["images/s"]) > 0
    assert ours["implementation"].startswith("dino_jax (JAX ")
    assert ours["precision"] == "bfloat16"
    assert ours["MFU"].endswith("%") and float(ours["peak memory GiB"]) >= 0
    assert reference["implementation"].startswith("main_dino.py --use_fp16")
    assert reference["precision"] == "float16 autocast + GradScaler"
    assert reference["MFU"].endswith("%")  # against our side's measured peak
    assert reference["peak memory GiB"] == "n/a"  # CUDA's allocator only
    figures = json.loads((tmp_path / "reference.json").read_text())
    assert figures["flops"] > 0 and figures["steps"] == 1
    expected = float(ours["images/s"]) / figures["images_per_s"]  # the table's are rounded
    ratio = float(ours["ours / reference"].rstrip("x"))
    assert abs(ratio - expected) <= 0.01 * expected + 0.01
    assert "dino_jax: " in result.stdout and "images/s, MFU" in result.stdout


@pytest.mark.slow
def test_a_side_that_times_out_leaves_the_others_figures(tmp_path):
    result = run(tmp_path, DEVICE="cpu", JAX_TIMEOUT="1")
    assert result.returncode == 1, result.stdout + result.stderr
    ours, reference = table(result.stdout)
    assert ours["implementation"] == "dino_jax"
    assert ours["images/s"] == "failed: timed out after 1 s"
    assert reference["implementation"].startswith("main_dino.py")
    assert float(reference["images/s"]) > 0


@pytest.mark.slow
def test_dry_run_prints_the_gpu_commands_and_runs_nothing(tmp_path):
    result = run(tmp_path, DRY_RUN="1", WHEELS="wheels", PYTHON="python3")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    install, ours, reference = commands
    assert install.startswith("+ python3 -m pip install -q --no-index")
    assert ours.startswith("+ timeout --kill-after=10 270 python3 -m dino_jax.benchmark step ")
    assert (
        "--config configs/vit_small16.py --config.train.batch_size=64 "
        "--config.crops.local_crops_number=10 --config.compute.dtype=bfloat16 "
        "--steps 20 --warmup 3" in ours
    )
    assert reference.startswith("+ timeout --kill-after=10 150 python3 tests/torch_reference.py ")
    sizes = "--batch-size 64 --local-crops 10 --steps 20 --warmup 3"
    assert f"--device cuda --fp16 {sizes}" in reference
    assert "| date |" not in result.stdout and not (tmp_path / "reference.json").exists()
