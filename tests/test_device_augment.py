"""On-device photometric augmentation: the host's laws, and pixels within a level of the host's."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax.core import augment_laws, device_augment
from dino_jax.data import augment
from dino_jax.data.pipeline import train_dataset
from dino_jax.tools.input_benchmark import synthetic_photo

CFG = augment_laws.MultiCropConfig(local_crops_number=8)


@pytest.fixture(scope="module")
def photo():
    return synthetic_photo(np.random.default_rng(2), 48, 64)


@pytest.fixture(scope="module")
def laws():
    """20,000 images' draws of 2 global + 8 local crops, on device."""
    drawn = jax.jit(device_augment.sample_laws, static_argnums=(1, 2, 3))(
        jax.random.key(0), 20000, 10, CFG
    )
    return jax.tree.map(np.asarray, drawn)


def assert_rate(events, p, what):
    """The frequency of boolean `events` is p within 5 standard errors (exactly, for p 0 or 1)."""
    events = np.asarray(events)
    tolerance = 5 * math.sqrt(p * (1 - p) / events.size)
    assert abs(events.mean() - p) <= tolerance, f"{what}: rate {events.mean():.4f}, expected {p}"


# ---------------------------------------------------------------------------------------------
# The laws, against the reference's numbers (main_dino.py: DataAugmentationDINO).


def test_event_rates(laws):
    assert_rate(laws["jitter"], 0.8, "colour jitter")
    assert_rate(laws["grayscale"], 0.2, "grayscale")
    assert_rate(laws["blur"][:, 0], 1.0, "blur, global crop 1")
    assert_rate(laws["blur"][:, 1], 0.1, "blur, global crop 2")
    assert_rate(laws["blur"][:, 2:], 0.5, "blur, local crops")
    assert_rate(laws["solarize"][:, 1], 0.2, "solarize, global crop 2")
    assert not laws["solarize"][:, [0, *range(2, 10)]].any()


def test_factor_and_sigma_ranges(laws):
    factors = laws["factors"].reshape(-1, 4)
    for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        values = factors[:, column]
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
        # Uniform: the mean and variance of U(low, high).
        assert abs(values.mean() - (low + high) / 2) < 5 * (high - low) / math.sqrt(12 * 2e5)
        np.testing.assert_allclose(values.var(), (high - low) ** 2 / 12, rtol=0.02)
    sigma = laws["blur_sigma"].ravel()
    assert 0.1 <= sigma.min() < 0.11 and 1.99 < sigma.max() <= 2.0


def test_jitter_order_is_a_uniform_permutation(laws):
    orders = laws["jitter_order"].reshape(-1, 4)
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in map(tuple, orders):
        counts[row] += 1
    expected = len(orders) / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 60, f"chi2 {chi2:.1f} over 23 degrees of freedom"  # p ~ 3e-5


def test_same_laws_as_the_host():
    """The host's sampler and the device's map the same uniforms to the same draws."""
    u = np.random.default_rng(3).random((10, augment_laws.UNIFORMS_PER_CROP))
    host = augment_laws.crop_laws(u, CFG.blur_sigma, np)
    device = augment_laws.crop_laws(jnp.asarray(u, jnp.float32), CFG.blur_sigma, jnp)
    for key, value in host.items():
        np.testing.assert_allclose(np.asarray(device[key]), value, rtol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Pixel ops against the host's (OpenCV on uint8, itself checked against PIL in test_augment).


def device_op(op, image, *args):
    out = op(jnp.asarray(image[None], jnp.float32), *(jnp.asarray([a]) for a in args))
    return np.asarray(out[0])


def level_errors(got, want):
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    return diff.max(), diff.mean()


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.4])
@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blends_match_the_host(photo, name, factor):
    want = getattr(augment, f"adjust_{name}")(photo, factor)
    got = device_op(getattr(device_augment, f"adjust_{name}"), photo, factor)
    worst, mean = level_errors(got, want)
    assert worst <= 1 and mean < 0.02, (worst, mean)


@pytest.mark.parametrize("factor", [-0.1, -0.03, 0.05, 0.1])
def test_hue_matches_the_host(photo, factor):
    want = augment.adjust_hue(photo, factor)
    got = device_op(device_augment.adjust_hue, photo, factor)
    worst, mean = level_errors(got, want)
    # The host's HSV is 8-bit (hue in 1/256 turns, saturation in 1/255); ours is continuous.
    assert worst <= 8 and mean < 1.0, (worst, mean)


def test_grayscale_matches_the_host(photo):
    got = device_op(device_augment.to_grayscale, photo)
    diff = np.abs(got - augment.to_grayscale(photo))
    # OpenCV's vectorised luma rounds a few pixels in 10,000 the other way.
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_solarize_matches_the_host_exactly(photo):
    np.testing.assert_array_equal(
        device_op(device_augment.solarize, photo), augment.solarize(photo)
    )


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_blur_matches_the_host(photo, sigma):
    want = augment.gaussian_blur(photo, sigma)
    got = device_op(lambda x, s: device_augment.gaussian_blur(x, s, 2.0), photo, sigma)
    worst, mean = level_errors(got, want)
    # OpenCV blurs uint8 with 8-bit fixed-point weights; ours are float32.
    assert worst <= 1 and mean < 0.2, (worst, mean)


def test_augment_batch_normalises_like_the_host():
    """Without any photometric event a crop is only normalised, by the host's table."""
    crops = np.random.default_rng(4).integers(0, 256, (3, 1, 8, 8, 3), dtype=np.uint8)
    none = {
        "jitter": np.zeros(3, bool),
        "grayscale": np.zeros(3, bool),
        "blur": np.zeros(3, bool),
        "solarize": np.zeros(3, bool),
        "factors": np.ones((3, 4)),
        "jitter_order": np.tile(np.arange(4), (3, 1)),
        "blur_sigma": np.ones(3),
    }
    got = device_augment.photometric(jnp.asarray(crops[:, 0]), none, CFG)
    table = augment.normalization_table(CFG.mean, CFG.std)[0]  # [256, 3]
    want = table[crops[:, 0], np.arange(3)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_augment_batch_shapes():
    rng = np.random.default_rng(5)
    batch = {
        "global": rng.integers(0, 256, (2, 2, 16, 16, 3), dtype=np.uint8),
        "local": rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8),
    }
    out = jax.jit(device_augment.augment_batch, static_argnums=2)(jax.random.key(1), batch, CFG)
    assert out["global"].shape == (2, 2, 16, 16, 3) and out["global"].dtype == jnp.float32
    assert out["local"].shape == (2, 3, 8, 8, 3)
    assert np.isfinite(np.asarray(out["local"])).all()


def test_host_half_crops_and_flips_in_uint8(photo):
    cfg = augment_laws.MultiCropConfig(global_size=32, local_size=16, local_crops_number=2)
    crops = augment.multicrop_uint8(photo, np.random.default_rng(6), cfg)
    assert crops["global"].shape == (2, 32, 32, 3) and crops["global"].dtype == np.uint8
    assert crops["local"].shape == (2, 16, 16, 3)
    # The same draws as the full host pipeline: its crops, before any colour op.
    params = augment.sample_multicrop_params(np.random.default_rng(6), *photo.shape[:2], cfg)
    first = augment.resized_crop(photo, params[0].box, 32)
    np.testing.assert_array_equal(crops["global"][0], first[:, ::-1] if params[0].flip else first)


def test_pipeline_sends_uint8_crops(tiny_config):
    config = tiny_config(batch_size=4)
    config.data.augment_on_device = True
    rng = np.random.default_rng(7)
    source = [
        {"image": rng.integers(0, 256, (48, 40, 3), np.uint8), "label": np.int32(i)}
        for i in range(8)
    ]
    batch = next(iter(train_dataset(config, source, process_index=0, process_count=1)))
    assert batch["global"].shape == (4, 2, 32, 32, 3) and batch["global"].dtype == np.uint8
    assert batch["local"].shape == (4, 2, 16, 16, 3) and batch["local"].dtype == np.uint8
