"""The built-in shapes dataset: determinism, format, masks that match the pixels, and a class
that shows in the silhouette but not in the colours."""

import numpy as np
import pytest
from PIL import Image
from ridge import ridge_accuracy

from dino_jax.data.synthetic import (
    CLASS_NAMES,
    SHAPES,
    ShapesSource,
    _rasterise,
    scene_to_example,
)

N_TRAIN, N_VAL = 400, 200


def _stack(source, n):
    examples = [source[i] for i in range(n)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@pytest.fixture(scope="module")
def train():
    return _stack(ShapesSource("train"), N_TRAIN)


@pytest.fixture(scope="module")
def val():
    return _stack(ShapesSource("val"), N_VAL)


def test_labels_cover_every_class_about_equally(train):
    counts = np.bincount(train["label"], minlength=len(CLASS_NAMES))
    expected = N_TRAIN / len(CLASS_NAMES)
    assert counts.min() > 0.5 * expected and counts.max() < 1.5 * expected, counts


def test_length_and_index_errors():
    assert len(ShapesSource("train")) == 20_000 and len(ShapesSource("val")) == 2_000
    source = ShapesSource(num_examples=3)
    assert len(source) == 3
    assert len(list(source)) == 3  # Python's iteration stops at the IndexError
    np.testing.assert_array_equal(source[-1]["image"], source[2]["image"])
    for bad in (3, -4):
        with pytest.raises(IndexError, match=str(bad)):
            source[bad]
    np.testing.assert_array_equal(source[np.int64(1)]["image"], source[1]["image"])


def test_unknown_split_names_itself_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"split='test'.*\['train', 'val'\]"):
        ShapesSource("test")


def test_mask_is_a_visible_part_of_the_image(train):
    masks, images = train["mask"].astype(bool), train["image"].astype(np.float32)
    fraction = masks.mean(axis=(1, 2))
    assert fraction.min() > 0.005 and fraction.max() < 0.6
    inside = (images * masks[..., None]).sum((1, 2)) / masks.sum((1, 2))[:, None]
    outside = (images * ~masks[..., None]).sum((1, 2)) / (~masks).sum((1, 2))[:, None]
    distance = np.linalg.norm(inside - outside, axis=-1)
    assert np.median(distance) > 50 and np.mean(distance > 15) > 0.95


def _near_boundary(mask, pixels, reach=2):
    """Whether each True pixel of `pixels` has mask and non-mask pixels within `reach` (in the
    Chebyshev distance); beyond the image border, the object may or may not be."""
    size = mask.shape[0]

    def windows(outside):
        pad = np.pad(mask, reach, constant_values=outside)
        shifts = range(2 * reach + 1)
        return np.stack([pad[dy : dy + size, dx : dx + size] for dy in shifts for dx in shifts])

    return (windows(True).any(0) & ~windows(False).all(0))[pixels]


@pytest.mark.parametrize("index", range(30))
def test_mask_is_exactly_where_the_object_covers_the_background(index):
    """Redraw the object over black and over white: pixels that ignore the background are the
    object, pixels equal to it are not; only antialiased pixels along the outline differ."""
    source = ShapesSource()
    scene, example = source.scene(index), source[index]
    size = (source.image_size, source.image_size)
    black, white = (
        scene_to_example(scene._replace(background=Image.new("RGB", size, colour)))["image"]
        for colour in ((0, 0, 0), (255, 255, 255))
    )
    mask = example["mask"].astype(bool)
    covered = (black == white).all(-1)
    bare = (black == 0).all(-1) & (white == 255).all(-1)
    edge = ~covered & ~bare
    assert (mask >= covered).all() and not (mask & bare).any()
    assert _near_boundary(mask, edge).all()
    perimeter = _near_boundary(mask, mask, reach=1).sum()
    assert edge.sum() < 1.5 * perimeter  # a band about one pixel wide
    # The object is drawn over the clutter, never under it; the clutter is kept elsewhere.
    np.testing.assert_array_equal(example["image"][covered], black[covered])
    np.testing.assert_array_equal(example["image"][bare], np.asarray(scene.background)[bare])


def test_rasterised_circle_matches_its_geometry():
    """An independent check of the pixel convention: pixel (y, x) spans [x, x + 1) x [y, y + 1)."""
    centre, radius = np.array([27.3, 35.8]), 20.0
    mask = (
        np.asarray(
            _rasterise(SHAPES["circle"](np.random.default_rng(0)), centre, radius, 0.0, 1.0, 64)
        )
        >= 128
    )
    y, x = np.mgrid[:64, :64] + 0.5
    distance = np.hypot(x - centre[0], y - centre[1])
    assert mask[distance < radius - 0.5].all() and not mask[distance > radius + 0.5].any()
    np.testing.assert_allclose([x[mask].mean(), y[mask].mean()], centre, atol=0.15)
    np.testing.assert_allclose(mask.sum(), np.pi * radius**2, rtol=0.03)


def _colour_histograms(images, bins=4):
    """Joint RGB histograms [B, bins**3], normalised: the colours, with no spatial layout."""
    q = images.astype(np.int64) * bins // 256
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    return np.stack([np.bincount(c.ravel(), minlength=bins**3) for c in codes]) / codes[0].size


def _silhouette_features(masks, bins=12):
    """Scale- and rotation-invariant shape features of masks [B, S, S]: the histogram of the
    pixels' distances to the centroid (in units of sqrt(area)), and area / perimeter**2."""
    y, x = np.mgrid[: masks.shape[1], : masks.shape[2]]
    features = []
    for mask in masks.astype(bool):
        area = mask.sum()
        r = np.hypot(x[mask] - x[mask].mean(), y[mask] - y[mask].mean()) / np.sqrt(area)
        radial = np.histogram(r, bins=bins, range=(0, 1.2))[0] / area
        perimeter = _near_boundary(mask, mask, reach=1).sum()
        features.append([*radial, area / perimeter**2])
    return np.array(features)


def test_colour_histograms_do_not_reveal_the_class(train, val):
    accuracy = ridge_accuracy(
        _colour_histograms(train["image"]),
        train["label"],
        _colour_histograms(val["image"]),
        val["label"],
        len(CLASS_NAMES),
    )
    assert accuracy < 0.2, accuracy  # chance is 0.1


def test_silhouettes_reveal_the_class(train, val):
    accuracy = ridge_accuracy(
        _silhouette_features(train["mask"]),
        train["label"],
        _silhouette_features(val["mask"]),
        val["label"],
        len(CLASS_NAMES),
    )
    assert accuracy > 0.5, accuracy  # chance is 0.1
