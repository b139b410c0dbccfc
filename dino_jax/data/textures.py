"""The built-in `synthetic:textures` dataset: black-and-white texture fields in 10 classes.

The demo trains on it. DINO learns what the views of one image share; here the pattern covers
the whole image, so every crop, global or local, shows the class (the kind of pattern at its
class's scale), while orientation, phase and a +-15% scale jitter are drawn per image and there
is no colour to tell images apart. A small ViT learns these classes by DINO in minutes on a CPU;
the silhouettes of `synthetic:shapes` need far longer. Examples are seeded like the shapes'
(`SyntheticSource`): the same bytes in every call and process, no download.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dino_jax.data.synthetic import SyntheticSource, direction_frame, smooth_noise

# The relative scale jitter of each image's pattern around its class's period.
SCALE_JITTER = 0.15
# A dot's radius and a grid line's width, as fractions of the period.
DOT_RADIUS = 0.3
LINE_WIDTH = 0.25

# A pattern maps (rng, u, v) -> where the ink is, bool [S, S]: u, v are the pixel coordinates
# along the image's random orthonormal frame, shifted by a random phase.
Pattern = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _period(rng: np.random.Generator, period: float) -> float:
    return period * rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)


def _stripes(period: float) -> Pattern:
    return lambda rng, u, v: (u / _period(rng, period)) % 1 < 0.5


def _checks(period: float) -> Pattern:
    def draw(rng, u, v):
        p = _period(rng, period)
        return (np.floor(u / p) + np.floor(v / p)) % 2 == 1

    return draw


def _dots(period: float) -> Pattern:
    def draw(rng, u, v):
        p = _period(rng, period)
        u, v = u / p, v / p
        return np.hypot(u - np.round(u), v - np.round(v)) < DOT_RADIUS

    return draw


def _rings(period: float) -> Pattern:
    def draw(rng, u, v):
        p, centre = _period(rng, period), rng.uniform(0, u.shape[0], 2)
        y, x = np.ogrid[: u.shape[0], : u.shape[1]]
        return (np.hypot(x - centre[0], y - centre[1]) / p) % 1 < 0.5

    return draw


def _waves(period: float) -> Pattern:
    def draw(rng, u, v):
        p = _period(rng, period)
        return ((u + 0.25 * p * np.sin(2 * np.pi * v / p)) / p) % 1 < 0.5

    return draw


def _grid(period: float) -> Pattern:
    def draw(rng, u, v):
        p = _period(rng, period)
        return ((u / p) % 1 < LINE_WIDTH) | ((v / p) % 1 < LINE_WIDTH)

    return draw


def _blobs(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    noise = np.asarray(smooth_noise(rng, u.shape[0], "L"))
    return noise > np.median(noise)  # half ink, in a few large smooth blobs


# Periods in pixels of the 128-px image: from 9 px, which survives the demo's 2x downscaling of
# a full-image global crop, to 22 px, which still repeats inside a small local crop.
PATTERNS: dict[str, Pattern] = {
    "fine_stripes": _stripes(9),
    "wide_stripes": _stripes(20),
    "fine_checks": _checks(9),
    "wide_checks": _checks(20),
    "small_dots": _dots(10),
    "large_dots": _dots(22),
    "rings": _rings(14),
    "waves": _waves(14),
    "grid": _grid(16),
    "blobs": _blobs,
}
CLASS_NAMES = tuple(PATTERNS)


def render_texture(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One example: {"image": uint8 [S, S, 3] (white ink on black), "label": int32 scalar}."""
    label = int(rng.integers(len(CLASS_NAMES)))
    u, v = direction_frame(rng, size)
    phase = rng.uniform(0, 100, 2).astype(np.float32)
    ink = PATTERNS[CLASS_NAMES[label]](rng, u + phase[0], v + phase[1])
    image = np.repeat(np.where(ink, np.uint8(255), np.uint8(0))[..., None], 3, axis=-1)
    return {"image": image, "label": np.int32(label)}


class TexturesSource(SyntheticSource):
    """`synthetic:textures`: `s[i]` is {"image": uint8 [S, S, 3], "label": int32 scalar}."""

    name = "synthetic:textures"
    class_names = CLASS_NAMES

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return render_texture(self._rng(index), self.image_size)

    def labels(self) -> np.ndarray:
        """Every example's label without drawing its image: `render_texture` draws it first."""
        return np.array(
            [self._rng(i).integers(len(CLASS_NAMES)) for i in range(len(self))], np.int64
        )
