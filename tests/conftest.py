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

# Sections whose leaf names `make_tiny_config` takes as keywords (each leaf is in one of them).
_KEYWORD_SECTIONS = ("student", "teacher", "dino", "optim", "crops", "train", "compute")


def make_tiny_config(**overrides):
    """A ViT of depth 2 and width 64 with 256 prototypes on 32/16 px crops: behaviour, not size.

    Keywords are the leaf names of the config's model and training sections (`lr=1e-3` sets
    optim.lr) or `method`."""
    c = base_config()
    s, d, crops = c.student, c.dino, c.crops
    s.arch, s.patch_size, s.img_size = "vit_small", 8, 32
    s.embed_dim, s.depth, s.num_heads = 64, 2, 4
    d.head_n_prototypes, d.head_hidden_dim, d.head_bottleneck_dim = 256, 256, 64
    crops.global_crops_size, crops.local_crops_size, crops.local_crops_number = 32, 16, 2
    c.train.batch_size, c.train.OFFICIAL_EPOCH_LENGTH = 8, 3
    c.optim.epochs, c.optim.warmup_epochs, c.optim.freeze_last_layer_epochs = 4, 1, 0
    for key, value in overrides.items():
        if key == "method":
            c.method = value
            continue
        sections = [name for name in _KEYWORD_SECTIONS if key in c[name]]
        assert len(sections) == 1, f"make_tiny_config: {key!r} is in sections {sections}"
        c[sections[0]][key] = value
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
    mesh = parallel.make_mesh(config.compute.mesh)  # with a mesh, init is one jitted call
    export_teacher(path, init_state(config, jax.random.key(0), mesh), config)
    return path
