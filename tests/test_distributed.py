"""Two processes x 4 CPU devices over loopback (jax.distributed, gloo) train and evaluate exactly
like 1 x 8."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dino_jax.checkpoint import load_exported
from dino_jax.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices):
    """This environment, with JAX on `devices` CPU devices."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def spawn(module, devices, *args):
    """`python -m module args` on `devices` CPU devices, its output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=cpu_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def cluster_flags(port, process_id):
    """One of two processes joining over loopback."""
    return (
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={process_id}",
    )


def start(workdir, devices, *flags):
    return spawn(
        "dino_jax.train", devices, "--config=configs/demo.py:smoke", f"--workdir={workdir}", *flags
    )


def finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def logged(workdir, key="loss"):
    """{step: value} of a metric in the run's metrics.jsonl."""
    return {m["step"]: m[key] for m in read_metrics(workdir) if key in m}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = free_port()
    procs = [start(tmp_path / "two", 4, *cluster_flags(port, i)) for i in range(2)]
    for proc in procs:
        finish(proc)
    finish(start(tmp_path / "one", 8))
    two, one = logged(tmp_path / "two"), logged(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-6)
    # The gradients' norm before clipping: Adam's updates would hide a gradient of the wrong size.
    norms_two = logged(tmp_path / "two", "grad_norm")
    norms_one = logged(tmp_path / "one", "grad_norm")
    assert sorted(norms_two) == sorted(norms_one) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [norms_two[s] for s in norms_one], list(norms_one.values()), rtol=1e-5
    )
    # Both processes wrote the checkpoints together; the exported teachers agree.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2", "4"]
    _, teacher_two, _ = load_exported(tmp_path / "two" / "export")
    _, teacher_one, _ = load_exported(tmp_path / "one" / "export")
    for a, b in zip(jax.tree.leaves(teacher_two), jax.tree.leaves(teacher_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def knn(export_dir, out, devices, *flags):
    """Start the k-NN command on `devices` CPU devices of this process."""
    return spawn(
        "dino_jax.eval.knn", devices, f"--checkpoint={export_dir}",
        "--train=synthetic:shapes", "--train_examples=72", "--val_examples=40", "--ks=1,5,20",
        "--resize=40", "--crop=32", "--batch_size=16", f"--out={out}", *flags,
    )  # fmt: skip


@pytest.mark.slow
def test_knn_on_two_processes_matches_one(export_dir, tmp_path):
    """Each process extracts its slice of every batch; all gather every feature and vote alike."""
    port = free_port()
    procs = [
        knn(export_dir, tmp_path / f"two_{i}.json", 4, *cluster_flags(port, i)) for i in range(2)
    ]
    outputs = [finish(proc) for proc in procs]
    finish(knn(export_dir, tmp_path / "one.json", 8))
    one = json.loads((tmp_path / "one.json").read_text())
    assert json.loads((tmp_path / "two_0.json").read_text()) == one
    assert not (tmp_path / "two_1.json").exists()  # process 0 writes the results
    assert "top-1" in outputs[0]


@pytest.mark.slow
def test_a_lost_process_stops_the_other_and_the_rerun_continues_exactly(tmp_path):
    """One of two processes killed mid-run (a lost host): the other stops within the heartbeat
    timeout with a message instead of waiting in a collective; rerunning both resumes from the
    last checkpoint with the losses of an uninterrupted run."""
    flags = (
        "--config.train.OFFICIAL_EPOCH_LENGTH=200",
        "--config.checkpoint.every_steps=10",
        "--config.log.every_steps=1",
        "--heartbeat_timeout_s=10",
    )
    two = tmp_path / "two"
    port = free_port()
    procs = [start(two, 4, *cluster_flags(port, i), *flags) for i in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and not (two / "checkpoints" / "10").exists():
        time.sleep(0.05)
    procs[1].kill()
    killed_at = time.time()
    out, _ = procs[0].communicate(timeout=300)
    waited = time.time() - killed_at
    procs[1].wait()
    assert procs[0].returncode != 0, out
    assert waited < 10 + 60, f"process 0 waited {waited:.0f} s on the lost process"
    assert "another task died" in out or "heartbeat" in out.lower(), out[-3000:]
    port = free_port()
    procs = [start(two, 4, *cluster_flags(port, i), *flags) for i in range(2)]
    outs = [finish(proc) for proc in procs]
    assert "Resuming from the checkpoint of step" in outs[0], outs[0]
    finish(start(tmp_path / "one", 8, *flags))
    resumed, straight = logged(two), logged(tmp_path / "one")
    assert sorted(resumed) == sorted(straight) == list(range(1, 201))
    np.testing.assert_allclose([resumed[s] for s in straight], list(straight.values()), rtol=1e-6)
