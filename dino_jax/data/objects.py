"""The built-in `synthetic:objects` dataset: one recognisable object per cluttered scene, with its
mask, for watching DINO's attention find objects (Caron et al. 2021, Sec. 4.2 and Fig. 1).

DINO learns what stays the same across the views of an image and, through the shared prototypes,
across images (Caron et al. 2021, Sec. 3.1). So the OBJECT must be that invariant, and nothing
else may be. Here each class is one object: its own silhouette AND its own colours and pattern
(`OBJECTS`: a red circle with black dots, a blue and white checked square...), with small
within-class variations (colour +-`COLOUR_JITTER`, pattern period +-`PERIOD_JITTER`, shape
details, rotation, squash). Everything else is drawn independently of the class from pools that
every class shares, and varies within an image as much as across images:
- the background is a collage of `BACKGROUND_CELLS` regions (a Voronoi partition), each its own
  random gradient, smooth colour noise or muted random-coloured stripes, checks, dots or grid, so
  that two crops of one image seldom see the same background;
  its colours are muted (`BACKGROUND_SATURATION`), since a salient object is what DINO's views
  must share;
- clutter: small ellipses, boxes and lines of random vivid colours, never a class shape, smaller
  than any object;
- lighting: a random gain and a linear illumination gradient over the whole scene;
- the object's size (`OBJECT_SIZE` of the image side: big enough that DINO's global crops, 40% to
  100% of the image, nearly always hold most of it) and position.
The object's pattern scales with the object, so its look does not depend on its size.

A background pixel's colour is therefore no clue to the class (the tests check it), the object
is what recurs, and a teacher that has learnt the classes attends to the object. Examples are
seeded like the other built-in datasets (`SyntheticSource`): the same bytes in every call and
process, no download. The mask marks the pixels the object covers (at least half of each pixel,
on a 4x supersampled canvas), as for `synthetic:shapes`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from dino_jax.data.synthetic import (
    SHAPES,
    Scene,
    SyntheticSource,
    _rasterise,
    direction_frame,
    scene_to_example,
    smooth_noise,
)

# Diameter of the object's bounding circle, as a fraction of the image side.
OBJECT_SIZE = (0.6, 0.9)
# Per-channel jitter of a class's colours (0..255) and relative jitter of its pattern's period.
COLOUR_JITTER = 18
PERIOD_JITTER = 0.15
# Background regions per scene, and clutter items drawn over them.
BACKGROUND_CELLS = (3, 7)
CLUTTER_ITEMS = (2, 7)
# The background's colours keep this fraction of their saturation (grey + s (colour - grey)):
# objects stand out, as in photos, so the object, not the background, dominates what two views
# share.
BACKGROUND_SATURATION = (0.2, 0.4)
# Background patterns' ink is mixed this far from their ground colour: muted, behind the objects.
BACKGROUND_CONTRAST = (0.15, 0.45)
# Clutter stays smaller than the smallest object (radius 0.3 of the side).
MAX_CLUTTER_RADIUS = 0.08
MAX_LINE_LENGTH = 0.3
# Lighting: a gain on the whole scene, and a linear gradient of +- this fraction across it.
GAIN = (0.65, 1.15)
LIGHT_GRADIENT = 0.25


class ObjectClass(NamedTuple):
    """A class's look: silhouette (a `SHAPES` name), pattern, its period as a fraction of the
    object's radius, and two colours (RGB 0..255): the pattern's ground and its ink."""

    shape: str
    pattern: str
    period: float
    ground: tuple[int, int, int]
    ink: tuple[int, int, int]


OBJECTS: dict[str, ObjectClass] = {
    "red_dotted_circle": ObjectClass("circle", "dots", 0.5, (215, 30, 30), (20, 20, 20)),
    "blue_checked_square": ObjectClass("square", "checks", 0.5, (30, 70, 210), (245, 245, 245)),
    "yellow_striped_triangle": ObjectClass(
        "triangle", "stripes", 0.35, (250, 210, 20), (20, 20, 20)
    ),
    "green_hexagon": ObjectClass("hexagon", "solid", 1.0, (40, 170, 60), (40, 170, 60)),
    "orange_star": ObjectClass("star", "radial", 1.0, (255, 140, 0), (255, 230, 80)),
    "white_red_cross": ObjectClass("cross", "stripes", 0.6, (245, 245, 245), (220, 20, 40)),
    "purple_yellow_ring": ObjectClass("ring", "checks", 0.35, (120, 40, 170), (250, 220, 40)),
    "cyan_crescent": ObjectClass("crescent", "grid", 0.45, (20, 200, 220), (10, 60, 120)),
    "pink_dotted_heart": ObjectClass("heart", "dots", 0.35, (250, 120, 180), (255, 255, 255)),
    "navy_orange_arrow": ObjectClass("arrow", "stripes", 0.5, (20, 30, 110), (255, 150, 30)),
}
CLASS_NAMES = tuple(OBJECTS)


def _pattern(name: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Where the ink is, bool [S, S], for pattern `name` of `period` px along the frame (u, v)."""
    u, v = u / period, v / period
    if name == "solid":
        return np.zeros(u.shape, bool)
    if name == "stripes":
        return u % 1 < 0.5
    if name == "checks":
        return (np.floor(u) + np.floor(v)) % 2 == 1
    if name == "dots":
        return np.hypot(u - np.round(u), v - np.round(v)) < 0.3
    if name == "grid":
        return (u % 1 < 0.25) | (v % 1 < 0.25)
    if name == "radial":  # concentric bands around the frame's origin (the object's centre)
        return np.hypot(u, v) % 1 < 0.5
    raise ValueError(f"Unknown pattern {name!r}.")


def _paint(ink: np.ndarray, ground, colour) -> Image.Image:
    """RGB image: `colour` where `ink`, `ground` elsewhere (colours [3], 0..255)."""
    out = np.where(ink[..., None], np.asarray(colour, np.uint8), np.asarray(ground, np.uint8))
    return Image.fromarray(out.astype(np.uint8))


def _frame(rng: np.random.Generator, size: int, origin: np.ndarray):
    """Pixel-centre coordinates (u, v) [S, S] along a random orthonormal frame at `origin`."""
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    y, x = np.mgrid[:size, :size].astype(np.float32) + 0.5
    x, y = x - origin[0], y - origin[1]
    return (x * c + y * s).astype(np.float32), (y * c - x * s).astype(np.float32)


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3))


def _background_cell(rng: np.random.Generator, size: int) -> Image.Image:
    """One region's fill, independent of the class: a gradient, smooth noise or a pattern."""
    kind = rng.integers(3)
    if kind == 0:
        u, _ = direction_frame(rng, size)
        t = ((u - u.min()) / max(np.ptp(u), 1e-6))[..., None]
        start, end = _random_colours(rng, 2)
        return Image.fromarray((start + t * (end - start)).astype(np.uint8))
    if kind == 1:
        return smooth_noise(rng, size, "RGB")
    ground, other = _random_colours(rng, 2)
    ink = ground + rng.uniform(*BACKGROUND_CONTRAST) * (other - ground)
    name = ("stripes", "checks", "dots", "grid")[rng.integers(4)]
    u, v = _frame(rng, size, rng.uniform(0, size, 2))
    return _paint(_pattern(name, u, v, rng.uniform(0.06, 0.25) * size), ground, ink)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [S, S, 3]: a Voronoi collage of independent cells, muted, then clutter."""
    cells = int(rng.integers(BACKGROUND_CELLS[0], BACKGROUND_CELLS[1] + 1))
    seeds = rng.uniform(0, size, (cells, 2))
    y, x = np.mgrid[:size, :size] + 0.5
    owner = np.argmin(np.hypot(x[..., None] - seeds[:, 0], y[..., None] - seeds[:, 1]), axis=-1)
    image = np.zeros((size, size, 3), np.uint8)
    for cell in range(cells):
        fill = np.asarray(_background_cell(rng, size))
        image[owner == cell] = fill[owner == cell]
    grey = image.mean(-1, keepdims=True)
    muted = grey + rng.uniform(*BACKGROUND_SATURATION) * (image - grey)
    canvas = Image.fromarray(muted.astype(np.uint8))
    _draw_clutter(rng, canvas)
    return np.asarray(canvas, np.float32)


def _draw_clutter(rng: np.random.Generator, image: Image.Image) -> None:
    """Small ellipses, boxes and lines of random colours: clutter, never a class object."""
    size = image.width
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(CLUTTER_ITEMS[0], CLUTTER_ITEMS[1] + 1)):
        colour = tuple(int(c) for c in _random_colours(rng, 1)[0])
        x, y = rng.uniform(0, size, 2)
        kind = rng.integers(3)
        if kind < 2:
            rx, ry = rng.uniform(0.02, MAX_CLUTTER_RADIUS, 2) * size
            box = [x - rx, y - ry, x + rx, y + ry]
            (draw.ellipse if kind == 0 else draw.rectangle)(box, fill=colour)
        else:
            length, angle = rng.uniform(0.1, MAX_LINE_LENGTH) * size, rng.uniform(0, 2 * np.pi)
            end = (x + length * np.cos(angle), y + length * np.sin(angle))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 4)))


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [S, S, 1]: the scene's gain times a linear gradient along a random direction."""
    u, _ = direction_frame(rng, size)
    t = (u - u.min()) / max(np.ptp(u), 1e-6) * 2 - 1  # -1..1 across the image
    gain = rng.uniform(*GAIN) * (1 + LIGHT_GRADIENT * rng.uniform(0, 1) * t)
    return gain[..., None].astype(np.float32)


def _jitter(rng: np.random.Generator, colour) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)


def _lit(pixels: np.ndarray, light: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels * light, 0, 255).astype(np.uint8))


def render_object_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw one scene: the label first (so that `labels()` is cheap), then the background, the
    object of that class with its small variations, and the lighting of both."""
    label = int(rng.integers(len(CLASS_NAMES)))
    spec = OBJECTS[CLASS_NAMES[label]]
    background = _background(rng, size)
    outline = SHAPES[spec.shape](rng)
    radius = rng.uniform(*OBJECT_SIZE) * size / 2
    # Up to 10% of the radius may cross the border: objects are mostly, not always, whole.
    centre = rng.uniform(0.9 * radius, size - 0.9 * radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    alpha = _rasterise(outline, centre, radius, angle, rng.uniform(0.85, 1.0), size)
    period = spec.period * radius * rng.uniform(1 - PERIOD_JITTER, 1 + PERIOD_JITTER)
    u, v = _frame(rng, size, centre)
    ink = _pattern(spec.pattern, u, v, period)
    foreground = np.asarray(
        _paint(ink, _jitter(rng, spec.ground), _jitter(rng, spec.ink)), np.float32
    )
    light = _lighting(rng, size)
    # Lighting is per pixel and linear, so lighting both layers lights their composite.
    return Scene(_lit(background, light), _lit(foreground, light), alpha, label)


class ObjectsSource(SyntheticSource):
    """`synthetic:objects`: `s[i]` is {"image": uint8 [S, S, 3], "label": int32 scalar,
    "mask": uint8 [S, S] in {0, 1}}."""

    name = "synthetic:objects"
    class_names = CLASS_NAMES

    def scene(self, index: int) -> Scene:
        """The uncomposited layers of example `index` (for tests and visualisation)."""
        return render_object_scene(self._rng(index), self.image_size)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return scene_to_example(self.scene(index))

    def labels(self) -> np.ndarray:
        """Every example's label without drawing its image: the scene draws it first."""
        return np.array(
            [self._rng(i).integers(len(CLASS_NAMES)) for i in range(len(self))], np.int64
        )
