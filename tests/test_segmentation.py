"""The patch features' segmentation probe (eval/maths/segmentation.py) on hand-made cases: a
ridge equal to an independent least-squares formulation, perfect features that give a Jaccard of
1, and uninformative ones that give what predicting all background gives."""

import numpy as np
import pytest

from dino_jax.eval.maths import segmentation


def test_ridge_equals_least_squares_on_the_augmented_system():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=200)
    ridge = 0.1
    penalty = ridge * np.trace(x.T @ x) / 6
    # min ||[x 1] w - y||^2 + penalty ||w[:6]||^2 as one least-squares problem.
    a = np.block([[x, np.ones((200, 1))], [np.sqrt(penalty) * np.eye(6), np.zeros((6, 1))]])
    want = np.linalg.lstsq(a, np.concatenate([y, np.zeros(6)]), rcond=None)[0]
    np.testing.assert_allclose(segmentation.fit_ridge(x, y, ridge), want, rtol=1e-8)


def scenes(n, grid=4, patch=2, seed=0):
    """Masks of patch-aligned rectangles, [n, grid * patch, grid * patch]."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, grid, grid), bool)
    for m in masks:
        top, left = rng.integers(0, grid - 1, 2)
        m[top : top + 2, left : left + 2] = True
    return masks.repeat(patch, 1).repeat(patch, 2), masks


def test_features_that_hold_the_layout_segment_perfectly():
    masks, patches = scenes(20)
    rng = np.random.default_rng(1)
    features = np.stack([patches, ~patches], -1).astype(np.float64)
    features = np.concatenate([features, 0.01 * rng.normal(size=(*patches.shape, 3))], -1)
    assert segmentation.linear_probe_jaccard(features, masks, 2) == pytest.approx(1.0)


def test_uninformative_features_predict_the_background():
    masks, patches = scenes(20)
    features = np.ones((*patches.shape, 4))  # the same for every patch: the mean fraction 0.25
    assert segmentation.linear_probe_jaccard(features, masks, 2) == 0.0


def test_patch_foreground_is_the_fraction_of_each_patch():
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, :3] = True
    np.testing.assert_allclose(segmentation.patch_foreground(mask, 2)[0], [[0.5, 0.25], [0.0, 0.0]])


def test_one_scene_is_refused():
    with pytest.raises(ValueError, match="2 or more scenes"):
        segmentation.linear_probe_jaccard(np.zeros((1, 2, 2, 3)), np.zeros((1, 4, 4), bool), 2)
