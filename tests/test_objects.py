"""The built-in objects dataset: determinism, format, masks that match the pixels, a class that
shows in the object but not in the background, and an object that recurs within its class."""

import numpy as np
import pytest
from PIL import Image
from ridge import ridge_accuracy

from dino_jax.data.objects import CLASS_NAMES, OBJECTS, ObjectsSource
from dino_jax.data.sources import make_source, shared_examples
from dino_jax.data.synthetic import scene_to_example

N_TRAIN, N_VAL = 400, 200


def _stack(source, n):
    examples = [source[i] for i in range(n)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@pytest.fixture(scope="module")
def train():
    return _stack(ObjectsSource("train"), N_TRAIN)


@pytest.fixture(scope="module")
def val():
    return _stack(ObjectsSource("val"), N_VAL)


def test_by_name_and_never_shared_with_other_datasets():
    source = make_source("synthetic:objects", "val")
    assert isinstance(source, ObjectsSource) and source.split == "val"
    assert shared_examples(source, make_source("synthetic:shapes", "val")) is None
    assert shared_examples(make_source("synthetic:objects", "train"), source) is None


def test_labels_match_the_examples_and_cover_every_class(train):
    source = ObjectsSource(num_examples=N_TRAIN)
    np.testing.assert_array_equal(source.labels(), train["label"])
    counts = np.bincount(train["label"], minlength=len(CLASS_NAMES))
    expected = N_TRAIN / len(CLASS_NAMES)
    assert counts.min() > 0.5 * expected and counts.max() < 1.5 * expected, counts


def test_every_class_has_its_own_shape_pattern_and_colours():
    looks = list(OBJECTS.values())
    assert len({o.shape for o in looks}) == len(looks)
    assert len({(o.pattern, o.ground, o.ink) for o in looks}) == len(looks)


@pytest.mark.parametrize("index", range(20))
def test_mask_is_exactly_where_the_object_covers_the_background(index):
    """Redraw the object over black and over white: pixels that ignore the background are the
    object, pixels equal to it are not; only antialiased pixels along the outline differ."""
    source = ObjectsSource()
    scene, example = source.scene(index), source[index]
    size = (source.image_size, source.image_size)
    black, white = (
        scene_to_example(scene._replace(background=Image.new("RGB", size, colour)))["image"]
        for colour in ((0, 0, 0), (255, 255, 255))
    )
    mask = example["mask"].astype(bool)
    covered = (black == white).all(-1)
    bare = (black == 0).all(-1) & (white == 255).all(-1)
    assert (mask >= covered).all() and not (mask & bare).any()
    assert covered.sum() > 0.8 * mask.sum()  # only the outline is partly covered
    np.testing.assert_array_equal(example["image"][covered], black[covered])
    np.testing.assert_array_equal(example["image"][bare], np.asarray(scene.background)[bare])


def test_mask_of_a_hand_made_scene_is_the_drawn_polygon():
    """A scene assembled by hand: an exact axis-aligned square of alpha 255 over a flat
    background gives exactly that square as the mask, and the image shows it there only."""
    size = 32
    alpha = np.zeros((size, size), np.uint8)
    alpha[8:20, 5:17] = 255
    scene = (
        ObjectsSource()
        .scene(0)
        ._replace(
            background=Image.new("RGB", (size, size), (0, 0, 255)),
            foreground=Image.new("RGB", (size, size), (255, 0, 0)),
            alpha=Image.fromarray(alpha),
        )
    )
    example = scene_to_example(scene)
    np.testing.assert_array_equal(example["mask"], alpha // 255)
    red = (example["image"] == [255, 0, 0]).all(-1)
    np.testing.assert_array_equal(red, alpha == 255)


def test_mask_covers_a_sizeable_visible_object(train):
    fraction = train["mask"].mean(axis=(1, 2))
    # The largest bounding circle, 0.9 of the side across, covers pi / 4 * 0.81 = 0.64 at most.
    assert fraction.min() > 0.03 and 0.1 < fraction.mean() < 0.3 and fraction.max() < 0.64


def _colour_histograms(images, masks, bins=4):
    """Joint RGB histograms [B, bins**3] of the pixels where `masks` is true, normalised."""
    q = images.astype(np.int64) * bins // 256
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    return np.stack(
        [
            np.bincount(c[m], minlength=bins**3) / max(m.sum(), 1)
            for c, m in zip(codes, masks, strict=True)
        ]
    )


def _probe(train, val, region):
    return ridge_accuracy(
        _colour_histograms(train["image"], region(train["mask"])),
        train["label"],
        _colour_histograms(val["image"], region(val["mask"])),
        val["label"],
        len(CLASS_NAMES),
    )


def test_background_colours_do_not_reveal_the_class(train, val):
    accuracy = _probe(train, val, lambda m: m == 0)
    assert accuracy < 0.2, accuracy  # chance is 0.1


def test_object_colours_reveal_the_class(train, val):
    """The object's look recurs within its class: its colours alone nearly tell the label."""
    accuracy = _probe(train, val, lambda m: m == 1)
    assert accuracy > 0.8, accuracy
