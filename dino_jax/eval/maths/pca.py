"""The DINOv2 picture of patch features (Oquab et al. 2023, Fig. 1 and Sec. 7.3): a principal
component analysis of the patches of a set of images, the first component thresholded to part
foreground from background, then the first three components of a second analysis of the
foreground patches alone shown as RGB.

The sign of a principal component is arbitrary; the first is oriented so that the patches on the
images' borders, mostly background in object-centric photos, fall below the threshold.
"""

from __future__ import annotations

import numpy as np


def principal_components(x: np.ndarray, k: int) -> np.ndarray:
    """The projections [N, k] of rows x [N, D] (centred) on their first k principal axes."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:k].T


def border(height: int, width: int) -> np.ndarray:
    """bool [height, width]: the patches on a grid's edge."""
    edge = np.zeros((height, width), bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    return edge


def foreground(features: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """features [B, h, w, D] -> bool [B, h, w]: the patches whose first principal component
    (over all B·h·w patches, oriented away from the border) exceeds `threshold`."""
    batch, height, width, dim = features.shape
    first = principal_components(features.reshape(-1, dim).astype(np.float64), 1)[:, 0]
    first = first.reshape(batch, height, width)
    if first[:, border(height, width)].mean() > 0:
        first = -first
    return first > threshold


def pca_rgb(features: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """features [B, h, w, D] -> (rgb float [B, h, w, 3] in [0, 1], foreground bool [B, h, w]):
    the first three principal components of the foreground patches, each scaled to [0, 1] over
    them; background patches black. With fewer than three foreground patches, all is black."""
    batch, height, width, _ = features.shape
    mask = foreground(features, threshold)
    rgb = np.zeros((batch, height, width, 3))
    patches = features[mask].astype(np.float64)
    if len(patches) < 3:
        return rgb, mask
    components = principal_components(patches, 3)
    low, high = components.min(axis=0), components.max(axis=0)
    rgb[mask] = (components - low) / np.where(high > low, high - low, 1.0)
    return rgb, mask
