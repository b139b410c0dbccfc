"""Foreground segmentation by a linear probe of patch features: how much of an image's layout the
patch tokens hold (DINOv2's dense objective, iBOT, shapes exactly these), scored by the Jaccard
index against true masks.

A ridge regression with a bias, fitted in closed form on the patch tokens of some scenes to the
fraction of each patch that is foreground, predicts the other scenes' patches; a patch above 0.5
is foreground, upsampled to pixels as the attention masks are (`attention.upsample`).
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-3  # relative to the mean eigenvalue of the features' covariance


def patch_foreground(masks: np.ndarray, patch_size: int) -> np.ndarray:
    """bool [B, H, W] -> float [B, H/p, W/p]: the foreground fraction of each patch."""
    b, h, w = masks.shape
    grid = masks.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size)
    return grid.mean(axis=(2, 4), dtype=np.float64)


def fit_ridge(features: np.ndarray, targets: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """features [n, D], targets [n] -> weights [D + 1] (the bias last) minimising
    ||X w - y||^2 + ridge * trace(X'X) / D * ||w without bias||^2, in float64."""
    x = np.concatenate([features.astype(np.float64), np.ones((len(features), 1))], axis=1)
    gram = x.T @ x
    penalty = ridge * np.trace(gram[:-1, :-1]) / (x.shape[1] - 1)
    gram[np.arange(x.shape[1] - 1), np.arange(x.shape[1] - 1)] += penalty
    return np.linalg.solve(gram, x.T @ targets.astype(np.float64))


def predict(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """features [..., D] -> the probe's values [...]."""
    return features.astype(np.float64) @ weights[:-1] + weights[-1]


def linear_probe_jaccard(
    features: np.ndarray, masks: np.ndarray, patch_size: int, fit_fraction: float = 0.5
) -> float:
    """features [B, h, w, D] of B scenes, their true masks bool [B, h p, w p] -> the mean
    Jaccard index, over the scenes after the first `fit_fraction` of them, of the foreground
    the probe fitted on those first scenes predicts."""
    b, d = features.shape[0], features.shape[-1]
    if b < 2:
        raise ValueError(f"a segmentation probe needs 2 or more scenes, got {b}")
    fit = max(1, min(b - 1, int(b * fit_fraction)))
    fractions = patch_foreground(masks, patch_size)
    weights = fit_ridge(features[:fit].reshape(-1, d), fractions[:fit].reshape(-1))
    predicted = predict(features[fit:], weights) > 0.5  # [b - fit, h, w]
    pixels = np.repeat(np.repeat(predicted, patch_size, axis=1), patch_size, axis=2)
    truth = masks[fit:].astype(bool)
    inter = np.sum(pixels & truth, axis=(1, 2))
    union = np.sum(pixels | truth, axis=(1, 2))
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))
