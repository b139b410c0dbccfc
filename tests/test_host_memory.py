"""Freed host memory is reused: the train step's temporaries stop page-faulting on CPU."""

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

# The demo recipe's step at batch 16: XLA:CPU's temporaries for it are one block of ~190 MB per
# execution, far above glibc's largest mmap threshold (32 MiB).
PROGRAM = """
import json, resource, sys
from dino_jax.cpu import host_memory
applied = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else None
import jax
from dino_jax.core import parallel
from dino_jax.tools.step_benchmark import random_batch
from dino_jax.core.config import load_config
from dino_jax.core.step import init_state, make_train_step
config = load_config(sys.argv[2])
config.train.OFFICIAL_EPOCH_LENGTH, config.train.batch_size = 100, 16
mesh = parallel.make_mesh(config.compute.mesh)
state = init_state(config, jax.random.key(0), mesh)
batch = parallel.to_global(random_batch(config), mesh)
step = make_train_step(config, mesh).lower(state, batch).compile()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
pages = step.memory_analysis().temp_size_in_bytes // 4096
print(json.dumps({"applied": applied, "faults": faults, "pages": pages}))
"""
DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")


def step_faults(mode: str) -> dict:
    # One CPU device, as `python -m dino_jax.train` runs here (the suite's 8 are a test setting).
    env = {**os.environ, "XLA_FLAGS": ""}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode, DEMO],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc is what is tuned")
def test_reused_memory_does_not_page_fault():
    default, reused = step_faults("default"), step_faults("reuse")
    pages = default["pages"]
    assert pages > 4 * 8192, default  # glibc's largest mmap threshold is 8192 pages
    # By default every step touches its temporaries' pages afresh: the problem being solved.
    assert min(default["faults"][1:]) > pages // 2, default
    assert reused["applied"] is True
    # Reused: the same pages serve most later steps. Not every one: a small allocation may take
    # the start of the freed block, and the heap then grows by a block before it settles.
    later = reused["faults"][1:]
    assert statistics.median(later) < pages // 100, reused
    assert sum(later) < sum(default["faults"][1:]) / 2, (default, reused)
