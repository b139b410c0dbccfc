"""The built-in textures dataset: determinism, format, balance, and a class that every crop shows
(measured by an independent spectral probe), while no colour tells images apart."""

import numpy as np
import pytest
from ridge import ridge_accuracy

from dino_jax.data.textures import CLASS_NAMES, TexturesSource

CROP = 40  # px of the 128-px image: about a tenth of its area, like DINO's local crops


def _crops_and_labels(source, n, rng):
    """One random CROP x CROP gray crop [n, CROP, CROP] per example, and the labels [n]."""
    crops, labels = [], []
    for i in range(n):
        example = source[i]
        y, x = rng.integers(0, source.image_size - CROP + 1, 2)
        crops.append(example["image"][y : y + CROP, x : x + CROP, 0].astype(np.float64) / 255)
        labels.append(example["label"])
    return np.stack(crops), np.array(labels)


def _spectral_features(crops, bins=10):
    """Orientation-free texture features: the radial power spectrum of each crop (mean removed,
    normalised to sum 1, in `bins` rings up to the Nyquist frequency) and its ink fraction."""
    power = np.abs(np.fft.fft2(crops - crops.mean((1, 2), keepdims=True))) ** 2
    f = np.fft.fftfreq(CROP)
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    ring = np.minimum((radius / 0.5 * bins).astype(int), bins - 1)
    radial = np.stack([np.bincount(ring.ravel(), p.ravel(), bins) for p in power])
    radial /= radial.sum(1, keepdims=True) + 1e-12
    return np.concatenate([radial, crops.mean((1, 2))[:, None]], axis=1)


def test_images_are_black_and_white():
    image = TexturesSource("val", image_size=64)[3]["image"]
    assert (image == image[..., :1]).all() and set(np.unique(image)) == {0, 255}


def test_labels_cover_every_class_about_equally():
    source = TexturesSource()
    counts = np.bincount([source[i]["label"] for i in range(400)], minlength=len(CLASS_NAMES))
    assert counts.min() > 20 and counts.max() < 60, counts


def test_errors_name_the_dataset_and_the_fix():
    with pytest.raises(ValueError, match=r"'test' for synthetic:textures.*\['train', 'val'\]"):
        TexturesSource("test")
    with pytest.raises(IndexError, match="3"):
        TexturesSource(num_examples=3)[3]


def test_every_crop_shows_its_class():
    """A ridge probe on small crops' spectra recovers the class, while the ink fraction alone
    (the only 'colour' statistic of a black-and-white image) leaves most classes confused."""
    rng = np.random.default_rng(0)
    train_x, train_y = _crops_and_labels(TexturesSource("train"), 600, rng)
    val_x, val_y = _crops_and_labels(TexturesSource("val"), 300, rng)
    train_f, val_f = _spectral_features(train_x), _spectral_features(val_x)
    spectral = ridge_accuracy(train_f, train_y, val_f, val_y, len(CLASS_NAMES))
    ink = ridge_accuracy(train_f[:, -1:], train_y, val_f[:, -1:], val_y, len(CLASS_NAMES))
    assert spectral > 0.6 and ink < 0.35, (spectral, ink)  # chance is 0.1
