"""The training command end to end: files, recipes, resume after SIGKILL, SIGTERM, NaN."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dino_jax import train as train_lib
from dino_jax.core.config import load_config, validate
from dino_jax.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RECIPES = [
    "demo.py",
    "objects.py",
    "vit_small16.py",
    "vit_small16.py:boosted",
    "vit_small8.py",
    "vit_base16.py",
    "vit_base8.py",
    "resnet50.py",
    "custom.py",
    "dinov2_demo.py",
    "dinov2_vits14.py",
    "dinov2_vitl16_short.py",
    "dinov2_vitl14.py",
    "dinov2_vitg14.py",
    "continue.py",
    "continue.py:dinov2",
]


def cli(workdir, *overrides, config="configs/demo.py:smoke", wait=True, devices=8):
    cmd = [sys.executable, "-m", "dino_jax.train", f"--config={config}", f"--workdir={workdir}"]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.Popen(
        [*cmd, *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def losses_by_step(workdir):
    """The last logged loss of every step (a resumed run logs some steps twice)."""
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def checkpoint_steps(workdir):
    root = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


@pytest.mark.slow
def test_cli_writes_checkpoints_metrics_events_and_export(tmp_path):
    code, out = cli(tmp_path)
    assert code == 0, out
    assert checkpoint_steps(tmp_path) == [2, 4]
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    for key in (
        "loss",
        "lr",
        "weight_decay",
        "momentum",
        "teacher_temp",
        "grad_norm",
        "param_norm",
        "teacher_entropy",
        "teacher_kl_uniform",
        "step_time_s",
        "images_per_s",
    ):
        assert key in metrics[-1], key
    assert any("compile_time_s" in m for m in metrics)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "export").exists()
    assert "final:" in out


@pytest.mark.slow
def test_dinov2_logs_the_official_loss_terms(tmp_path):
    code, out = cli(tmp_path, config="configs/dinov2_demo.py:smoke")
    assert code == 0, out
    last = [m for m in read_metrics(tmp_path) if "loss" in m][-1]
    terms = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
    for key in (*terms, "dino_center_norm", "ibot_center_norm", "teacher_entropy"):
        assert np.isfinite(last[key]), key
    # The back-propagated loss: KoLeo and iBOT are logged halved, as the official shows them.
    want = last[terms[0]] + last[terms[1]] + 2 * last["koleo_loss"] + 2 * last["ibot_loss"]
    assert last["loss"] == pytest.approx(want, rel=1e-5)
    assert (tmp_path / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_in_smoke_form(tmp_path, recipe):
    sep = "," if ":" in recipe else ":"
    config = load_config(f"{REPO / 'configs' / recipe}{sep}smoke")
    config.optim.epochs, config.train.OFFICIAL_EPOCH_LENGTH = 1, 2
    final = train_lib.train(config, str(tmp_path))
    assert np.isfinite(final["loss"])


@pytest.mark.parametrize("variant", ["", ":1gpu"])
def test_custom_recipe_loads_without_its_folder(variant):
    """configs/custom.py names a placeholder folder, read only when training starts."""
    config = load_config(f"{REPO / 'configs' / 'custom.py'}{variant}")
    kind, _, folder = config.data.source.partition(":")
    assert kind == "folder" and not Path(folder).exists()
    assert (config.data.split, config.data.eval_split) == ("train", "val")
    validate(config, num_devices=8)


@pytest.mark.slow
def test_relative_workdir_and_signal_handlers_given_back(tmp_path, monkeypatch):
    """As from a notebook: a relative workdir (orbax needs absolute paths) and the kernel's
    SIGINT handler working again once train() returns."""
    monkeypatch.chdir(tmp_path)
    config = load_config(f"{REPO / 'configs' / 'demo.py'}:smoke")
    config.optim.epochs, config.train.OFFICIAL_EPOCH_LENGTH = 1, 2
    config.eval.knn_every_steps = None

    def kernel_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, kernel_handler)
    try:
        train_lib.train(config, "runs/relative")
        assert signal.getsignal(signal.SIGINT) is kernel_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert checkpoint_steps(tmp_path / "runs" / "relative") == [2]
    assert (tmp_path / "runs" / "relative" / "export" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/demo.py:smoke", "configs/dinov2_demo.py:smoke"])
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, config):
    """Every loss of a run killed and rerun is the uninterrupted run's: the data, DINOv2's masks
    and every random draw resume where the checkpoint left them."""
    overrides = ["--config.train.OFFICIAL_EPOCH_LENGTH=60", "--config.checkpoint.every_steps=10"]
    code, out = cli(tmp_path / "straight", *overrides, config=config)
    assert code == 0, out
    expected = losses_by_step(tmp_path / "straight")

    killed = tmp_path / "killed"
    proc = cli(killed, *overrides, config=config, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint_steps(killed):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint_steps(killed), "no checkpoint before the kill"
    code, out = cli(killed, *overrides, config=config)
    assert code == 0, out
    assert "Resuming from the checkpoint of step" in out
    got = losses_by_step(killed)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose(
        [got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-6
    )


@pytest.mark.slow
def test_rerun_loads_the_step_from_the_compilation_cache(tmp_path):
    """A rerun in the same workdir, as after a preemption, loads the compiled step from the
    workdir instead of compiling it again, although the CPU attention kernel's custom
    partitioning puts a Python object's address, new in every process, in the program."""
    code, out = cli(tmp_path, devices=2)
    assert code == 0, out
    assert "compiled in" in out and "loaded from the compilation cache" not in out
    entries = [p.name for p in (tmp_path / "compilation_cache").iterdir()]
    assert any(name.startswith("jit_train_step") for name in entries), entries
    code, out = cli(tmp_path, devices=2)
    assert code == 0, out
    assert "loaded from the compilation cache in" in out


def test_compilation_cache_is_the_runs_own_and_given_back(tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    with train_lib.compilation_cache(str(tmp_path), "cache"):
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_remove_custom_partitioning_ptr_from_cache_key
    assert jax.config.jax_compilation_cache_dir == previous
    assert not jax.config.jax_remove_custom_partitioning_ptr_from_cache_key
    with train_lib.compilation_cache(str(tmp_path), "/elsewhere/cache"):  # absolute: as given
        assert jax.config.jax_compilation_cache_dir == "/elsewhere/cache"
    with train_lib.compilation_cache(str(tmp_path), ""):  # "": no cache
        assert jax.config.jax_compilation_cache_dir == previous


@pytest.mark.slow
def test_sigterm_saves_the_current_step(tmp_path):
    proc = endless_run(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last_logged = max(losses_by_step(tmp_path))
    assert checkpoint_steps(tmp_path)[-1] == last_logged
    assert last_logged < 100000


def endless_run(workdir):
    """A training process of 100000 steps, returned once it has logged its first step."""
    proc = cli(workdir, "--config.train.OFFICIAL_EPOCH_LENGTH=100000", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not losses_by_step_safe(workdir):
        time.sleep(0.1)
    return proc


def losses_by_step_safe(workdir):
    try:
        return losses_by_step(workdir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_non_finite_loss_stops_with_message(tmp_path, monkeypatch):
    config = load_config(f"{REPO / 'configs' / 'demo.py'}:smoke")
    config.train.OFFICIAL_EPOCH_LENGTH = 6
    to_global = train_lib.parallel.to_global
    calls = []

    def poisoned(batch, mesh):
        calls.append(1)
        if len(calls) == 5:  # the batch of step 5
            batch = {k: np.full_like(v, np.nan) for k, v in batch.items()}
        return to_global(batch, mesh)

    monkeypatch.setattr(train_lib.parallel, "to_global", poisoned)
    with pytest.raises(train_lib.NonFiniteLoss, match="at step 5"):
        train_lib.train(config, str(tmp_path))
    assert checkpoint_steps(tmp_path) == [2, 4]  # the last good one kept, nothing after


@pytest.mark.slow
def test_bad_config_keys_and_types_are_named(tmp_path):
    code, out = cli(tmp_path, "--config.no_such_key=1")
    assert code != 0 and "no_such_key" in out
    code, out = cli(tmp_path, "--config.train.batch_size=abc")
    assert code != 0 and "batch_size" in out
    code, out = cli(tmp_path, "--config.train.batch_size=12")
    assert code != 0 and "batch_size=12 is not divisible by 8 devices" in out
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_workdir_of_another_model_is_refused(tmp_path):
    code, out = cli(tmp_path)
    assert code == 0, out
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    code, out = cli(tmp_path, "--config.dino.head_n_prototypes=512")
    assert code != 0 and "dino.head_n_prototypes: saved 256, requested 512" in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_knn_monitor_during_training_with_head_batchnorm(tmp_path):
    config = load_config(f"{REPO / 'configs' / 'demo.py'}:smoke")
    config.dino.use_bn_in_head = True  # batch statistics in the head only, none in the backbone
    config.eval.knn_every_steps = 2
    final = train_lib.train(config, str(tmp_path))
    knn = [m["knn_top1"] for m in read_metrics(tmp_path) if "knn_top1" in m]
    assert len(knn) == 3  # at the start, at step 2, and after training (step 4)
    assert 0.0 <= final["knn_top1"] <= 100.0


@pytest.mark.slow
def test_unknown_config_key_is_one_line_with_the_nearest_keys(tmp_path):
    code, out = cli(tmp_path, "--config.data.sourc=folder:x", "--config.epoch=3", "--config.zzzz=1")
    assert code == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert lines == [
        "error: Unknown config key 'data.sourc' in '--config.data.sourc=folder:x': "
        "did you mean data.source or data.eval_source or data.split?",
        "error: Unknown config key 'epoch' in '--config.epoch=3': "
        "did you mean optim.epochs or student.depth?",
        "error: Unknown config key 'zzzz' in '--config.zzzz=1': see dino_jax/core/config.py",
    ], out
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_unprepared_tfds_dataset_names_tfds_build(tmp_path):
    """An empty data_dir: tfds finds no prepared splits. One line naming the command and the key."""
    code, out = cli(
        tmp_path / "run", "--config.data.source=tfds:mnist", f"--config.data.data_dir={tmp_path}"
    )
    assert code == 1, out
    assert "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if " ERROR " in line]
    assert "tfds:mnist split 'train' is not prepared as ArrayRecord" in line
    assert "`tfds build mnist --file_format=array_record`" in line and "data.data_dir" in line


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(tmp_path):
    """The newest checkpoint's array file cut in half (a full disk, a killed copy): the rerun
    names it in one line, sets it aside and repeats the steps after the one before, with the
    losses of the first run."""
    code, out = cli(tmp_path)
    assert code == 0, out
    first = losses_by_step(tmp_path)
    state = tmp_path / "checkpoints" / "4" / "state"
    array = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(array, array.stat().st_size // 2)
    code, out = cli(tmp_path)
    assert code == 0, out
    assert "The checkpoint of step 4 cannot be read (" in out
    assert "Resuming from the checkpoint of step 2" in out
    frames = [line for line in out.splitlines() if line.strip().startswith("File ")]
    assert not [frame for frame in frames if "dino_jax/" in frame], out
    assert checkpoint_steps(tmp_path) == [2, 4]  # step 4 saved again
    assert [p.name.split("-")[0] for p in (tmp_path / "damaged").iterdir()] == ["4"]
    assert losses_by_step(tmp_path) == first


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_keeps_the_saved_checkpoint(tmp_path):
    """The workdir on a 6 MiB file system of its own (a mount namespace): the checkpoint of step
    2 fits, step 4's does not. One line, exit 1, and step 2 still restores."""
    workdir = tmp_path / "disk" / "run"
    (tmp_path / "disk").mkdir()
    train = (
        f"{sys.executable} -m dino_jax.train --config=configs/demo.py:smoke "
        f"--workdir={workdir} --config.compute.compilation_cache_dir="
    )
    check = (
        f"{sys.executable} -c 'from dino_jax.checkpoint import Checkpointer; "
        f'print("latest", Checkpointer("{workdir}", save_every=1, keep=1).latest_step())\''
    )
    mount = f"mount -t tmpfs -o size=6m tmpfs {tmp_path / 'disk'}"
    script = f"{mount} && {train}; echo exit=$?; {check}"
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-rm"]
    result = subprocess.run(
        [*unshare, "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    out = result.stdout + result.stderr
    assert "exit=1" in out, out
    # The failure reaches the user as one line; tensorstore's callbacks into asyncio may still
    # print the library's own tracebacks as its loop shuts down, but none from dino_jax.
    frames = [line for line in out.splitlines() if line.strip().startswith("File ")]
    assert not [frame for frame in frames if "dino_jax/" in frame], out
    (line,) = [line for line in out.splitlines() if " ERROR " in line]
    assert f"Saving a checkpoint to {workdir / 'checkpoints'} failed (" in line, line
    assert "the checkpoints saved before are intact (latest step 2)" in line, line
    assert "latest 2" in out, out


@pytest.mark.slow
def test_one_run_per_workdir_and_a_dead_holder_is_taken_over(tmp_path):
    first = endless_run(tmp_path)
    code, out = cli(tmp_path)  # a relaunch while the first run lives
    first.send_signal(signal.SIGKILL)  # it dies holding the workdir
    first.wait()
    assert code == 1, out
    assert "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if " ERROR " in line]
    host = socket.gethostname()
    assert f"{tmp_path} is held by a run on {host} (process {first.pid}, started " in line
    assert "stop that run first, or give this one another --workdir." in line
    assert not [s for s in losses_by_step(tmp_path) if s > 100000]  # the second wrote no step
    # The next run takes the workdir over (and, re-planned to the smoke's 4 steps, ends).
    code, out = cli(tmp_path, "--config.checkpoint.replan_schedules=true")
    assert code == 0, out
    assert f"Taking over {tmp_path} from the run on {host} (process {first.pid}" in out, out
    assert "its process is gone." in out, out
