"""Every test sees 8 CPU devices, so sharding is exercised on any machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax

jax.config.update("jax_num_cpu_devices", 8)

import subprocess  # noqa: E402

import pytest  # noqa: E402

from dino_jax.core.config import base_config  # noqa: E402


def make_tiny_config(**overrides):
    """A ViT of depth 2 and width 64 with out_dim 256 on 32/16 px crops: behaviour, not size."""
    c = base_config()
    c.arch, c.patch_size, c.img_size = "vit_small", 8, 32
    c.embed_dim, c.depth, c.num_heads = 64, 2, 4
    c.out_dim, c.head_hidden_dim, c.head_bottleneck_dim = 256, 256, 64
    c.data.global_crop_size, c.data.local_crop_size = 32, 16
    c.local_crops_number = 2
    c.batch_size, c.epochs, c.steps_per_epoch, c.warmup_epochs = 8, 4, 3, 1
    c.freeze_last_layer = 0
    for key, value in overrides.items():
        c[key] = value
    return c


@pytest.fixture(autouse=True)
def slow_work_is_marked(request, monkeypatch):
    """A test that starts a subprocess or runs the training loop is marked `slow`, so that
    `pytest -m "not slow"` stays quick: unmarked, such a test fails where it starts one."""
    if request.node.get_closest_marker("slow"):
        return
    from dino_jax import train

    def refuse(what):
        def fail(*args, **kwargs):
            pytest.fail(f"{request.node.nodeid} {what}: mark it @pytest.mark.slow", pytrace=False)

        return fail

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a subprocess"))
    monkeypatch.setattr(train, "_loop", refuse("runs the training loop"))


@pytest.fixture
def tiny_config():
    return make_tiny_config


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """A freshly initialised tiny teacher (ViT depth 2, width 64, 4 heads, 8-px patches), exported
    as training leaves it (`checkpoint.export_teacher`)."""
    from dino_jax.checkpoint import export_teacher
    from dino_jax.core import parallel
    from dino_jax.core.step import init_state

    config = make_tiny_config()
    path = tmp_path_factory.mktemp("run") / "export"
    mesh = parallel.make_mesh(config.mesh)  # with a mesh, init is one jitted call
    export_teacher(path, init_state(config, jax.random.key(0), mesh), config)
    return path
