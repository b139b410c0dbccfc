"""What DINO's multi-crop draws: the reference's sizes and laws, with no pixels involved.

The host pipeline (data/augment.py, with NumPy) and the on-device augmentation
(device_augment.py, with jax.numpy) draw every crop's random events and factors from `crop_laws`,
so that both follow main_dino.py: DataAugmentationDINO by construction.
"""

from __future__ import annotations

import dataclasses

# The reference's constants (main_dino.py, DataAugmentationDINO; torchvision's defaults).
FLIP_P = 0.5
JITTER_P = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
# Blur and solarize probabilities of global crop 1, global crop 2 and every local crop.
GLOBAL_1_BLUR_P, GLOBAL_2_BLUR_P, LOCAL_BLUR_P = 1.0, 0.1, 0.5
GLOBAL_2_SOLARIZE_P = 0.2
SOLARIZE_THRESHOLD = 128
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


# torchvision's ImageNet normalisation, which the reference's transforms and models use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Sizes, scale ranges and normalisation of the multi-crop (the reference's defaults)."""

    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    # Gaussian blur sigma range, in output pixels (the reference's for 224/96 px crops).
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


UNIFORMS_PER_CROP = 14  # one draw for all of a crop's events, factors and orders


def crop_laws(u, blur_sigma: tuple[float, float], xp) -> dict:
    """The random events and factors of an image's crops from uniforms u [..., n, 14].

    The crop axis (-2) holds global crop 1, global crop 2, then the local crops. `xp` is numpy
    or jax.numpy: the host pipeline and the on-device augmentation draw by the same laws.
    Returns booleans `flip`, `jitter`, `grayscale`, `blur`, `solarize` [..., n], `blur_sigma`
    [..., n], `factors` [..., n, 4] (brightness, contrast, saturation, hue) and `jitter_order`
    [..., n, 4] (a permutation of indices into JITTER_OPS).
    """
    n = u.shape[-2]
    crop = xp.arange(n)
    blur_p = xp.where(
        crop == 0, GLOBAL_1_BLUR_P, xp.where(crop == 1, GLOBAL_2_BLUR_P, LOCAL_BLUR_P)
    )
    low_sigma, high_sigma = blur_sigma
    low = xp.asarray([1 - BRIGHTNESS, 1 - CONTRAST, 1 - SATURATION, -HUE])
    high = xp.asarray([1 + BRIGHTNESS, 1 + CONTRAST, 1 + SATURATION, HUE])
    return {
        "flip": u[..., 0] < FLIP_P,
        "jitter": u[..., 1] < JITTER_P,
        "grayscale": u[..., 2] < GRAYSCALE_P,
        "blur": u[..., 3] < blur_p,
        "solarize": (u[..., 4] < GLOBAL_2_SOLARIZE_P) & (crop == 1),
        "blur_sigma": low_sigma + (high_sigma - low_sigma) * u[..., 5],
        "factors": low + (high - low) * u[..., 6:10],
        # The ranks of 4 i.i.d. uniforms are a uniform permutation, like torch.randperm(4).
        "jitter_order": xp.argsort(u[..., 10:14], axis=-1),
    }
