"""The built-in `synthetic:shapes` dataset: one textured shape per cluttered scene, with its mask;
and `SyntheticSource`, the seeded random access that the built-in datasets share.

Each example is drawn on the fly from its own generator, seeded by (seed, split, index), so it is
the same bytes in every call and every worker process and needs no download. The class is the
SHAPE of the main object (`CLASS_NAMES`); its colours, texture, size, rotation and position and the
background clutter are drawn independently of the class, so only the silhouette tells the label
(the tests check that colour histograms do not). The mask marks the pixels the object covers, at
least half of each pixel as measured on a 4x supersampled canvas; the image's edges are antialiased.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageStat

# Examples per split when `num_examples` is not given.
DEFAULT_SIZES = {"train": 20_000, "val": 2_000}
# Part of each example's seed, so that the splits are disjoint streams of examples.
_SPLIT_IDS = {"train": 0, "val": 1}
# Edges are rendered on a canvas this many times finer, then averaged into coverage.
SUPERSAMPLE = 4
# Diameter of the main object's bounding circle, as a fraction of the image side.
OBJECT_SIZE = (0.3, 0.7)
# Distractors (fractions of the image side) stay smaller than the smallest main object (0.3),
# so that the label is never ambiguous.
MAX_DISTRACTOR_RADIUS = 0.06
MAX_LINE_LENGTH = 0.25
# Object colours are redrawn until this far (RGB, 0..255) from the background they sit on,
# so that the shape is always visible; the check uses no class information.
MIN_CONTRAST = 110.0
_COLOUR_TRIES = 16

# A shape is a list of (polygon [N, 2] in x-right, y-down units around the origin, fill): filled
# polygons add area and unfilled ones cut holes, in order. Renderers get a generator for the
# small within-class variations (ring thickness, star depth...) that keep the task non-trivial.
Outline = list[tuple[np.ndarray, bool]]


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    """Vertices [n, 2] of a regular n-gon (n large: a circle) of circumradius `radius`."""
    angle = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def _circle(rng: np.random.Generator) -> Outline:
    return [(_regular(64), True)]


def _square(rng: np.random.Generator) -> Outline:
    return [(_regular(4, phase=np.pi / 4), True)]


def _triangle(rng: np.random.Generator) -> Outline:
    return [(_regular(3, phase=-np.pi / 2), True)]


def _hexagon(rng: np.random.Generator) -> Outline:
    return [(_regular(6), True)]


def _star(rng: np.random.Generator) -> Outline:
    outer = _regular(5, phase=-np.pi / 2)
    inner = _regular(5, rng.uniform(0.38, 0.5), phase=-np.pi / 2 + np.pi / 5)
    return [(np.stack([outer, inner], axis=1).reshape(-1, 2), True)]


def _cross(rng: np.random.Generator) -> Outline:
    w = rng.uniform(0.25, 0.4)  # half-width of an arm
    quarter = np.array([[w, 1], [w, w], [1, w]])
    turn = np.array([[0, 1], [-1, 0]])  # a clockwise quarter turn: one arm's corner to the next
    return [(np.concatenate([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)]), True)]


def _ring(rng: np.random.Generator) -> Outline:
    return [(_regular(64), True), (_regular(64, rng.uniform(0.5, 0.7)), False)]


def _crescent(rng: np.random.Generator) -> Outline:
    bite = _regular(64, rng.uniform(0.85, 1.0)) + np.array([rng.uniform(0.4, 0.65), 0.0])
    return [(_regular(64), True), (bite, False)]


def _heart(rng: np.random.Generator) -> Outline:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) + 3
    return [(np.stack([x, y], axis=-1) / 17, True)]


def _arrow(rng: np.random.Generator) -> Outline:
    shaft, head, base = rng.uniform(0.14, 0.24), rng.uniform(0.5, 0.7), rng.uniform(0.1, 0.35)
    xy = [[-1, -shaft], [base, -shaft], [base, -head], [1, 0], [base, head], [base, shaft]]
    return [(np.array([*xy, [-1, shaft]]), True)]


SHAPES: dict[str, Callable[[np.random.Generator], Outline]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "hexagon": _hexagon,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "crescent": _crescent,
    "heart": _heart,
    "arrow": _arrow,
}
CLASS_NAMES = tuple(SHAPES)


def direction_frame(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v), [S, S] each, along a random orthonormal frame."""
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    y, x = np.ogrid[:size, :size]
    x, y = x.astype(np.float32), y.astype(np.float32)
    return x * c + y * s, y * c - x * s


def smooth_noise(rng: np.random.Generator, size: int, mode: str) -> Image.Image:
    """Low-frequency noise, an L or RGB [S, S] image: a coarse random grid upsampled bilinearly."""
    cells = int(rng.integers(2, 7))
    shape = (cells, cells) if mode == "L" else (cells, cells, 3)
    grid = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    return grid.resize((size, size), Image.Resampling.BILINEAR)


def _ramp(u: np.ndarray) -> np.ndarray:
    """u rescaled to span 0..255 over the image, uint8 [S, S]."""
    return ((u - u.min()) * (255 / np.ptp(u))).astype(np.uint8)


# Textures give the mixing weight, uint8 [S, S] (0: first colour, 255: second), between the
# object's two colours; PIL does the per-pixel blend, much faster than float NumPy.
def _solid(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.zeros((size, size), np.uint8)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    u, _ = direction_frame(rng, size)
    return np.where(u / rng.uniform(4, 14) % 1 < 0.5, np.uint8(255), np.uint8(0))


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    u, v = direction_frame(rng, size)
    period = rng.uniform(5, 14)
    odd = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    return np.where(odd, np.uint8(255), np.uint8(0))


def _dots(rng: np.random.Generator, size: int) -> np.ndarray:
    u, v = direction_frame(rng, size)
    u, v = u / rng.uniform(6, 14), v / rng.uniform(6, 14)
    inside = np.hypot(u - np.round(u), v - np.round(v)) < rng.uniform(0.2, 0.35)
    return np.where(inside, np.uint8(255), np.uint8(0))


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    return _ramp(direction_frame(rng, size)[0])


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.asarray(smooth_noise(rng, size, "L"))


TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "solid": _solid,
    "stripes": _stripes,
    "checker": _checker,
    "dots": _dots,
    "gradient": _gradient,
    "noise": _noise,
}


def _blend(first: np.ndarray, second: np.ndarray, weight: np.ndarray) -> Image.Image:
    """RGB image mixing two colours [3] (0..255) by a uint8 weight [S, S] (255: all `second`)."""
    size = weight.shape[::-1]
    return Image.composite(
        Image.new("RGB", size, tuple(int(c) for c in second)),
        Image.new("RGB", size, tuple(int(c) for c in first)),
        Image.fromarray(weight),
    )


class Scene(NamedTuple):
    """One example before compositing: the object is `foreground` where `alpha` says it is."""

    background: Image.Image  # RGB [S, S]: gradient, noise and distractors
    foreground: Image.Image  # RGB [S, S]: the object's texture, defined everywhere
    alpha: Image.Image  # L [S, S]: the object's coverage of each pixel, 0..255
    label: int


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random colour gradient blended with smooth colour noise, then small distractors."""
    start, end = rng.integers(0, 256, (2, 3))
    gradient = _blend(start, end, _ramp(direction_frame(rng, size)[0]))
    image = Image.blend(gradient, smooth_noise(rng, size, "RGB"), rng.uniform(0.2, 0.6))
    _draw_distractors(rng, image)
    return image


def _draw_distractors(rng: np.random.Generator, image: Image.Image) -> None:
    """A few small ellipses and thin lines of random colours: clutter, never a class shape."""
    size = image.width
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 9)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            rx, ry = rng.uniform(0.015, MAX_DISTRACTOR_RADIUS, 2) * size
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=colour)
        else:
            length, angle = rng.uniform(0.1, MAX_LINE_LENGTH) * size, rng.uniform(0, 2 * np.pi)
            end = (x + length * np.cos(angle), y + length * np.sin(angle))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 4)))


def _rasterise(
    outline: Outline, centre: np.ndarray, radius: float, angle: float, aspect: float, size: int
) -> Image.Image:
    """Coverage (L, 0..255) of the outline scaled to `radius`, squashed, rotated and placed."""
    scale = radius / max(np.linalg.norm(pts, axis=1).max() for pts, fill in outline if fill)
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in outline:
        xy = (pts * [1.0, aspect]) @ rotation.T * scale + centre
        # PIL floors vertices to canvas pixels and fills inclusively: edges land within a quarter
        # image pixel of the exact outline, centred on it. Image and mask share this alpha.
        draw.polygon((xy * SUPERSAMPLE).ravel().tolist(), fill=255 if fill else 0)
    return canvas.reduce(SUPERSAMPLE)


def _object_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A uniform random RGB colour [3], redrawn (a few times) while too close to `behind`."""
    for _ in range(_COLOUR_TRIES):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if np.linalg.norm(colour - behind) >= MIN_CONTRAST:
            break
    return colour


def render_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw one scene: background, then a uniformly chosen class shape with a random look."""
    background = _background(rng, size)
    label = int(rng.integers(len(CLASS_NAMES)))
    outline = SHAPES[CLASS_NAMES[label]](rng)
    radius = rng.uniform(*OBJECT_SIZE) * size / 2
    # Up to 10% of the radius may cross the border: objects are mostly, not always, whole.
    centre = rng.uniform(0.9 * radius, size - 0.9 * radius, 2)
    alpha = _rasterise(
        outline, centre, radius, rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.0), size
    )
    behind = np.array(ImageStat.Stat(background, mask=alpha).mean)  # under the object
    first, second = _object_colour(rng, behind), _object_colour(rng, behind)
    texture = list(TEXTURES.values())[rng.integers(len(TEXTURES))]
    foreground = _blend(first, second, texture(rng, size))
    return Scene(background, foreground, alpha, label)


def scene_to_example(scene: Scene) -> dict[str, np.ndarray]:
    """Composite the object over the background: {"image" uint8 [S, S, 3], "label", "mask"}."""
    image = Image.composite(scene.foreground, scene.background, scene.alpha)
    return {
        "image": np.asarray(image),
        "label": np.int32(scene.label),
        "mask": (np.asarray(scene.alpha) >= 128).astype(np.uint8),
    }


class SyntheticSource:
    """Random-access source of generated examples (grain-compatible): `len(s)`, `s[i]` -> dict.

    Example `i` is drawn from its own generator, seeded by (seed, split, i). Negative indices
    count from the end, as for a list; indices outside [-len, len) raise IndexError. `seed` must
    be >= 0. Subclasses name themselves, list their classes and draw from `self._rng(i)`.
    """

    name = "synthetic"
    class_names: tuple[str, ...] = ()

    def __init__(
        self,
        split: str = "train",
        num_examples: int | None = None,
        image_size: int = 128,
        seed: int = 0,
    ):
        if split not in DEFAULT_SIZES:
            raise ValueError(
                f"Unknown split={split!r} for {self.name}; use one of {sorted(DEFAULT_SIZES)}."
            )
        num_examples = DEFAULT_SIZES[split] if num_examples is None else num_examples
        if num_examples < 1:
            raise ValueError(f"num_examples={num_examples} must be at least 1.")
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small to draw a shape; use >= 16.")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (it seeds np.random.SeedSequence).")
        self.split = split
        self.num_examples = num_examples
        self.image_size = image_size
        self.seed = seed
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.num_examples

    def _rng(self, index: int) -> np.random.Generator:
        """The generator of example `index`, after checking the index."""
        index = operator.index(index)
        if not -self.num_examples <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self!r} of {len(self)} examples.")
        index %= self.num_examples
        return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed})"
        )


class ShapesSource(SyntheticSource):
    """`synthetic:shapes`: `s[i]` is {"image": uint8 [S, S, 3], "label": int32 scalar,
    "mask": uint8 [S, S] in {0, 1}}."""

    name = "synthetic:shapes"
    class_names = CLASS_NAMES

    def scene(self, index: int) -> Scene:
        """The uncomposited layers of example `index` (for tests and visualisation)."""
        return render_scene(self._rng(index), self.image_size)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return scene_to_example(self.scene(index))
