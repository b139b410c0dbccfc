"""DINOv2's PCA picture of patch features: foreground from the first component, RGB from the
foreground's first three, against planted structure and an eigendecomposition in NumPy."""

import numpy as np
import pytest

from dino_jax import visualize_attention
from dino_jax.eval.maths import pca


def planted(seed=0, batch=3, side=6, dim=16):
    """Patch features whose foreground (a 2 x 3 block inside each image) differs from the
    background along one axis and varies along three others."""
    rng = np.random.default_rng(seed)
    features = 0.05 * rng.normal(size=(batch, side, side, dim))
    truth = np.zeros((batch, side, side), bool)
    truth[:, 2:4, 1:4] = True
    features[truth, 0] += 3.0
    features[truth, 1:4] += rng.normal(size=(truth.sum(), 3)) * [1.0, 0.6, 0.3]
    return features.astype(np.float32), truth


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_first_component_finds_the_planted_foreground(sign, monkeypatch):
    """Whichever sign the decomposition gives the first axis, the border is background."""
    features, truth = planted()
    components = pca.principal_components
    monkeypatch.setattr(pca, "principal_components", lambda x, k: sign * components(x, k))
    np.testing.assert_array_equal(pca.foreground(features), truth)


def test_rgb_are_the_foregrounds_first_three_components():
    features, truth = planted(seed=1)
    rgb, mask = pca.pca_rgb(features)
    np.testing.assert_array_equal(mask, truth)
    assert not rgb[~truth].any()
    # The same components from the covariance's eigenvectors, each scaled to [0, 1].
    x = features[truth].astype(np.float64)
    x -= x.mean(axis=0)
    values, vectors = np.linalg.eigh(x.T @ x)
    projections = x @ vectors[:, np.argsort(values)[::-1][:3]]
    want = (projections - projections.min(0)) / np.ptp(projections, axis=0)
    for channel in range(3):  # an axis's sign is arbitrary: flipped, the scale is 1 - x
        got = rgb[truth][:, channel]
        assert (
            min(np.abs(got - want[:, channel]).max(), np.abs(got - 1 + want[:, channel]).max())
            < 1e-6
        )


def test_the_command_writes_the_picture(export_dir, tmp_path):
    args = visualize_attention.parse_args(
        ["--pca", f"--checkpoint={export_dir}", f"--out={tmp_path}", "--image_size=40"]
    )
    result = visualize_attention.pca_picture(args)
    assert result["images"].shape == (4, 40, 40, 3)  # four synthetic scenes, 8-px patches
    assert result["rgb"].shape == (4, 5, 5, 3) and result["foreground"].shape == (4, 5, 5)
    assert 0.0 <= result["rgb"].min() and result["rgb"].max() <= 1.0
    for name in ("pca.png", "pca_0.png", "pca_3.png"):
        assert (tmp_path / name).stat().st_size > 0
    with pytest.raises(SystemExit):  # the attention maps take one image
        visualize_attention.parse_args(
            [f"--checkpoint={export_dir}", f"--out={tmp_path}", "--image", "a.png", "b.png"]
        )
