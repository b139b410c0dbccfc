"""A second method, defined in tests/mse_method.py and registered by name, goes through the same
trainer untouched: its loss against NumPy, training through the command's loop with its own
state, checkpoints, a resume with identical losses, and a step compiled for a TPU slice."""

import fcntl
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mse_method import register
from test_compile_targets import AOT_PYTHON, LIBTPU_LOCK, REPO
from test_train import checkpoint_steps, losses_by_step

from dino_jax import train as train_lib
from dino_jax.core import parallel
from dino_jax.core.config import load_config
from dino_jax.core.step import init_state, make_train_step
from dino_jax.methods import METHODS
from dino_jax.models import build_dino


@pytest.fixture(autouse=True)
def mse_method():
    register()
    yield
    METHODS.pop("mse")


def smoke_config(epoch_length: int):
    config = load_config(f"{REPO / 'configs' / 'demo.py'}:smoke")
    config.method = "mse"
    config.train.OFFICIAL_EPOCH_LENGTH = epoch_length
    return config


def test_its_loss_and_state_in_the_generic_step(tiny_config):
    config = tiny_config(method="mse", drop_path_rate=0.0)
    mesh = parallel.make_mesh((("data", 8),))
    state = init_state(config, jax.random.key(0), mesh)
    params = jax.device_get(state.teacher)
    images = np.random.default_rng(0).normal(size=(8, 2, 32, 32, 3)).astype(np.float32)
    state, metrics = make_train_step(config, mesh)(
        state, parallel.to_global({"global": images}, mesh)
    )
    out = np.asarray(build_dino(config).apply({"params": params}, jnp.asarray(images)), np.float64)
    unit = out / np.linalg.norm(out, axis=-1, keepdims=True)
    # Student and teacher are one network at step 0 without drop path.
    want = np.mean(np.sum((unit - unit[::-1]) ** 2, axis=-1))
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    norm = np.mean(np.linalg.norm(out, axis=-1))
    np.testing.assert_allclose(state.method_state["teacher_norm"], 0.9 + 0.1 * norm, rtol=1e-5)
    assert "center" not in metrics and "teacher_temp" not in metrics


@pytest.mark.slow
def test_trains_checkpoints_and_resumes_with_the_same_losses(tmp_path):
    config = smoke_config(epoch_length=6)
    config.checkpoint.every_steps = 3
    train_lib.train(config, str(tmp_path / "whole"))
    whole = losses_by_step(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    assert checkpoint_steps(tmp_path / "whole") == [3, 6]
    # The same run stopped after step 3 (its later checkpoint gone), then resumed.
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    train_lib.train(smoke_config(epoch_length=6), str(tmp_path / "resumed"))
    resumed = losses_by_step(tmp_path / "resumed")
    np.testing.assert_array_equal([resumed[s] for s in whole], list(whole.values()))


@pytest.mark.slow
def test_compiles_for_a_tpu_slice():
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from mse_method import register; register()\n"
        "from dino_jax.tools import aot\n"
        "from dino_jax.core.config import load_config\n"
        "config = load_config('configs/vit_small16.py:smoke'); config.method = 'mse'\n"
        "compiled, _, mesh = aot.compile_step(config, 'v4-8')\n"
        "print('compiled for', mesh.devices.size, mesh.devices.flat[0].platform)\n"
    )
    with open(LIBTPU_LOCK, "a") as libtpu:
        fcntl.flock(libtpu, fcntl.LOCK_EX)
        result = subprocess.run(
            [AOT_PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled for 4 tpu" in result.stdout
