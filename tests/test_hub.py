"""The public API: load_pretrained on an official .pth, an export and a workdir; features,
attention maps and intermediate layers against the PyTorch reference ViT."""

import jax
import numpy as np
import pytest
import torch
from torch_reference import save_release_vit

import dino_jax
from dino_jax.checkpoint import Checkpointer, export_teacher
from dino_jax.core.step import init_state
from dino_jax.interop import hub

RTOL = 1e-5


def assert_close(got, want):
    """1e-5 relative per entry, or 1e-5 of the tensor's RMS for entries near 0."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.sqrt(np.mean(want**2)))


@pytest.fixture(scope="module")
def release_vit(tmp_path_factory):
    """(path, float64 torch twin) of a ViT-S/16-shaped release file of depth 2."""
    path = tmp_path_factory.mktemp("release") / "dino_deitsmall16_pretrain.pth"
    return path, save_release_vit(path)


@pytest.mark.parametrize("size", [224, 96, pytest.param(480, marks=pytest.mark.slow)])
def test_official_vit_features_attention_and_layers(release_vit, size):
    path, twin = release_vit
    model, variables = dino_jax.load_pretrained(path)
    assert (model.embed_dim, model.depth, model.patch_size) == (384, 2, 16)
    images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)).double()
    with torch.no_grad():
        want_cls = twin(x).numpy()
        want_attn = twin.get_last_selfattention(x).numpy()
        want_layers = [h.numpy() for h in twin.get_intermediate_layers(x, 2)]

    assert_close(hub.extract_features(model, variables, images), want_cls)
    grid = size // 16
    maps = hub.attention_maps(model, variables, images)
    assert maps.shape == (2, 6, grid, grid)
    assert_close(maps, want_attn[:, :, 0, 1:].reshape(2, 6, grid, grid))
    layers = hub.intermediate_layers(model, variables, images, n=2)
    assert len(layers) == 2
    for got, want in zip(layers, want_layers, strict=True):
        assert_close(got, want)


def test_uint8_images_are_normalised(release_vit):
    model, variables = hub.load_pretrained(release_vit[0])
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    normalised = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(
        hub.extract_features(model, variables, pixels),
        hub.extract_features(model, variables, normalised.astype(np.float32)),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match=r"NHWC RGB images \[B, H, W, 3\]"):
        hub.extract_features(model, variables, pixels.transpose(0, 3, 1, 2))


@pytest.mark.slow
def test_export_and_workdir(tiny_config, tmp_path):
    config = tiny_config()
    state = init_state(config, jax.random.key(0))
    # A student that differs from the teacher, to see which one is loaded.
    state = state.replace(student=jax.tree.map(lambda p: p + 1.0, state.student))
    with Checkpointer(tmp_path / "run", save_every=1, keep=1) as checkpointer:
        checkpointer.save(3, state, None, config, force=True)
    teacher = state.teacher["backbone"]

    def params_of(path, **kwargs):
        model, variables = hub.load_pretrained(path, **kwargs)
        assert model.patch_size == 8 and model.embed_dim == 64 and model.depth == 2
        return variables["params"]

    # A workdir without export/: the newest checkpoint, teacher by default.
    for got, want in [
        (params_of(tmp_path / "run"), teacher),
        (params_of(tmp_path / "run", which="student"), state.student["backbone"]),
    ]:
        jax.tree.map(np.testing.assert_array_equal, got, want)
    export_teacher(tmp_path / "run" / "export", state, config)
    for path in (tmp_path / "run", tmp_path / "run" / "export"):
        jax.tree.map(np.testing.assert_array_equal, params_of(path, arch="vit_small"), teacher)
    with pytest.raises(ValueError, match="holds only the teacher"):
        hub.load_pretrained(tmp_path / "run" / "export", which="student")
    with pytest.raises(ValueError, match="patch_size=8, not the requested patch_size=16"):
        hub.load_pretrained(tmp_path / "run", patch_size=16)
    with pytest.raises(ValueError, match="neither a dino_jax export"):
        hub.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        hub.load_pretrained(tmp_path / "nowhere")


def test_attention_needs_a_vit():
    from dino_jax.models import resnet50

    with pytest.raises(ValueError, match="attention_maps needs a Vision Transformer"):
        hub.attention_maps(resnet50(), {}, np.zeros((1, 32, 32, 3), np.float32))
