"""Multi-crop augmentation: torchvision's laws for the random parameters, PIL for the pixels."""

import io
import itertools
import math
import random
import time

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from scipy import stats

from dino_jax.core.augment_laws import MultiCropConfig
from dino_jax.data import augment
from dino_jax.tools.input_benchmark import baseline_render_crop, synthetic_photo

P_MIN = 1e-3  # seeds are fixed, so statistical tests are deterministic; this is their margin


def torchvision_get_params(rnd, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, transcribed, on Python's `random`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rnd.uniform(*scale)
        aspect_ratio = math.exp(rnd.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            return rnd.randint(0, height - h), rnd.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def assert_rate(events, p, what):
    """The frequency of boolean `events` is p within 5 standard errors."""
    events = np.asarray(events)
    tolerance = 5 * math.sqrt(p * (1 - p) / events.size) if 0 < p < 1 else 0.0
    assert abs(events.mean() - p) <= tolerance, f"{what}: rate {events.mean():.4f}, expected {p}"


@pytest.fixture(scope="module")
def photo():
    return synthetic_photo(np.random.default_rng(1), 150, 200)


# ---------------------------------------------------------------------------------------------
# Sampling.


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (64, 640), (30, 40), (224, 224)])
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4), (0.14, 1.0)])
def test_crop_boxes_follow_torchvision(shape, scale):
    height, width = shape
    n = 4000
    ours = augment.sample_crop_boxes(np.random.default_rng(0), height, width, scale, n)
    rnd = random.Random(0)
    theirs = np.array([torchvision_get_params(rnd, height, width, scale) for _ in range(n)])
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()

    def features(boxes):
        t, l, hh, ww = boxes.T.astype(float)
        return {
            "area fraction": hh * ww / (height * width),
            "aspect ratio": ww / hh,
            "centre x": (l + ww / 2) / width,
            "centre y": (t + hh / 2) / height,
        }

    for (name, a), b in zip(features(ours).items(), features(theirs).values(), strict=True):
        assert stats.ks_2samp(a, b).pvalue > P_MIN, f"{name} differs from torchvision's"
        assert abs(a.mean() - b.mean()) < 0.02 * max(abs(b.mean()), 0.1), name


@pytest.fixture(scope="module")
def many_params():
    """3000 images' worth of crop parameters: 2 global + 8 local each."""
    cfg = MultiCropConfig(local_crops_number=8)
    rng = np.random.default_rng(0)
    return [augment.sample_multicrop_params(rng, 375, 500, cfg) for _ in range(3000)]


def test_multicrop_params_layout(many_params):
    for params in many_params[:10]:
        assert [p.size for p in params] == [224, 224] + [96] * 8
    cfg = MultiCropConfig(local_crops_number=0)
    assert len(augment.sample_multicrop_params(np.random.default_rng(0), 40, 50, cfg)) == 2


def test_crop_scales_and_ratios_in_range(many_params):
    height, width = 375, 500
    for position, (lo, hi) in (("global", (0.4, 1.0)), ("local", (0.05, 0.4))):
        crops = [
            p
            for params in many_params
            for p in (params[:2] if position == "global" else params[2:])
        ]
        h = np.array([p.box[2] for p in crops])
        w = np.array([p.box[3] for p in crops])
        fraction = h * w / (height * width)
        # w and h are rounded to whole pixels: ~1% of slack on the smallest crops.
        assert fraction.min() >= lo * 0.98 and fraction.max() <= hi * 1.02, position
        assert (w / h).min() >= 0.75 * 0.97 and (w / h).max() <= 4 / 3 * 1.03, position


def test_event_rates(many_params):
    g1 = [params[0] for params in many_params]
    g2 = [params[1] for params in many_params]
    local = [p for params in many_params for p in params[2:]]
    every = g1 + g2 + local
    assert_rate([p.flip for p in every], 0.5, "flip")
    assert_rate([p.jitter for p in every], 0.8, "jitter")
    assert_rate([p.grayscale for p in every], 0.2, "grayscale")
    assert_rate([p.blur for p in g1], 1.0, "blur, global 1")
    assert_rate([p.blur for p in g2], 0.1, "blur, global 2")
    assert_rate([p.blur for p in local], 0.5, "blur, local")
    assert_rate([p.solarize for p in g2], 0.2, "solarize, global 2")
    assert not any(p.solarize for p in g1 + local)


def test_factor_and_sigma_laws(many_params):
    every = [p for params in many_params for p in params]
    laws = {
        "brightness": (0.6, 1.4),
        "contrast": (0.6, 1.4),
        "saturation": (0.8, 1.2),
        "hue": (-0.1, 0.1),
        "blur_sigma": (0.1, 2.0),
    }
    for name, (lo, hi) in laws.items():
        values = np.array([getattr(p, name) for p in every])
        assert values.min() >= lo and values.max() <= hi, name
        assert stats.kstest(values, "uniform", args=(lo, hi - lo)).pvalue > P_MIN, name


def test_jitter_order_uniform_over_permutations(many_params):
    orders = [p.jitter_order for params in many_params for p in params]
    permutations = list(itertools.permutations(range(4)))
    counts = [orders.count(perm) for perm in permutations]
    assert sum(counts) == len(orders)  # every order is a permutation of the 4 ops
    assert stats.chisquare(counts).pvalue > P_MIN


# ---------------------------------------------------------------------------------------------
# Pixel ops against PIL (the reference's torchvision ops are PIL calls on PIL images).


def diff(a, b):
    return np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))


@pytest.mark.parametrize("factor", [0.6, 0.87, 1.13, 1.4])
def test_blends_match_image_enhance(photo, factor):
    pil = Image.fromarray(photo)
    # Contrast and saturation are checked on brightened images too, so that clamping happens.
    bright = augment.adjust_brightness(photo, factor)
    assert diff(bright, ImageEnhance.Brightness(pil).enhance(factor)).max() <= 1
    for source in (photo, bright):
        pil_source = Image.fromarray(source)
        ours = augment.adjust_contrast(source, factor)
        assert diff(ours, ImageEnhance.Contrast(pil_source).enhance(factor)).max() <= 1
        ours = augment.adjust_saturation(source, factor)
        theirs = np.asarray(ImageEnhance.Color(pil_source).enhance(factor))
        assert diff(ours, theirs).max() <= 1
        assert (ours != theirs).mean() < 0.01  # rounding like PIL's, so no bias either


def test_grayscale_matches_pil_luma(photo):
    ours = augment.to_grayscale(photo)
    theirs = np.asarray(Image.fromarray(photo).convert("L"))
    assert (ours == ours[..., :1]).all()
    assert diff(ours[..., 0], theirs).max() <= 1
    assert (ours[..., 0] != theirs).mean() < 0.01


def test_solarize_matches_pil_exactly(photo):
    ours = augment.solarize(photo)
    np.testing.assert_array_equal(ours, np.asarray(ImageOps.solarize(Image.fromarray(photo), 128)))


def pil_hue(image, factor):
    """torchvision's adjust_hue on PIL images: shift PIL's 8-bit HSV hue, wrapping."""
    h, s, v = Image.fromarray(image).convert("HSV").split()
    shifted = (np.asarray(h, np.int32) + int(factor * 255)) % 256
    merged = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v))
    return np.asarray(merged.convert("RGB"))


@pytest.mark.parametrize("factor", [-0.1, -0.03, 0.0, 0.05, 0.1])
def test_hue_matches_pil_hsv_shift(photo, factor):
    # Both HSV round trips quantise hue to 8 bits (OpenCV in 1/256 turns, PIL in 1/255), which
    # moves a saturated pixel by up to a few levels: tolerance 1 level on average, 4 at the 99th
    # percentile.
    d = diff(augment.adjust_hue(photo, factor), pil_hue(photo, factor))
    assert d.mean() < 1.0 and np.percentile(d, 99) <= 4


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_blur_matches_pil_gaussian_blur(photo, sigma):
    # PIL approximates the Gaussian by three box blurs of the same variance, and the two differ
    # most at the image's edges: tolerance 1 level on average, 4 at most inside a 6 px border,
    # 6 at the 99.9th percentile.
    theirs = Image.fromarray(photo).filter(ImageFilter.GaussianBlur(radius=sigma))
    d = diff(augment.gaussian_blur(photo, sigma), theirs)
    assert d.mean() < 1.0 and d[6:-6, 6:-6].max() <= 4 and np.percentile(d, 99.9) <= 6


def laplacian_std(image):
    return cv2.Laplacian(np.asarray(image, np.float32), cv2.CV_32F).std()


@pytest.mark.parametrize(
    ("box", "size"),
    [
        ((0, 0, 150, 200), 96),  # shrink 1.6 x 2.1, the aspect ratio changes
        ((10, 20, 120, 120), 96),  # shrink 1.25
        ((5, 7, 140, 100), 40),  # shrink 3.5 x 2.5
        ((30, 40, 60, 80), 96),  # enlarge
        ((50, 60, 3, 5), 96),  # smaller than the crop size
    ],
)
def test_resized_crop_matches_pil_bicubic(photo, box, size):
    top, left, h, w = box
    theirs = Image.fromarray(photo).crop((left, top, left + w, top + h))
    theirs = np.asarray(theirs.resize((size, size), Image.BICUBIC))
    ours = augment.resized_crop(photo, box, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    # Different bicubic (a = -0.75 after an a = -0.5 prefilter, vs PIL's a = -0.5): tolerance
    # 2 levels on average. Antialiasing keeps the fine detail's energy within 10% of PIL's.
    assert diff(ours, theirs).mean() < 2.0
    assert laplacian_std(ours) == pytest.approx(laplacian_std(theirs), rel=0.1)


def test_render_crop_matches_pil_pipeline(photo):
    """Every op together, in the sampled order, against the baseline's PIL transcription."""
    cfg = MultiCropConfig(global_size=96, local_size=48, local_crops_number=4)
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(10):
        for p in augment.sample_multicrop_params(rng, *photo.shape[:2], cfg):
            ours = augment.render_crop(photo, p, cfg.mean, cfg.std)
            theirs = baseline_render_crop(Image.fromarray(photo), p, mean, std)
            levels = np.abs(ours - theirs) * std * 255
            assert levels.mean() < 2.5, p


# ---------------------------------------------------------------------------------------------
# multicrop: shapes and normalisation.


@pytest.mark.parametrize("n_local", [0, 2])
def test_multicrop_shapes(photo, n_local):
    cfg = MultiCropConfig(local_crops_number=n_local)
    for image in (photo, Image.fromarray(photo)):
        crops = augment.multicrop(image, np.random.default_rng(0), cfg)
        assert crops["global"].shape == (2, 224, 224, 3) and crops["global"].dtype == np.float32
        assert crops["local"].shape == (n_local, 96, 96, 3) and crops["local"].dtype == np.float32
        assert np.isfinite(crops["global"]).all() and np.isfinite(crops["local"]).all()


def test_multicrop_is_deterministic_given_the_rng(photo):
    cfg = MultiCropConfig(local_crops_number=2)
    a = augment.multicrop(photo, np.random.default_rng(7), cfg)
    b = augment.multicrop(photo, np.random.default_rng(7), cfg)
    np.testing.assert_array_equal(a["local"], b["local"])


@pytest.mark.parametrize("value", [0, 37, 128, 255])
def test_normalisation_of_a_constant_image(value):
    cfg = MultiCropConfig()
    image = np.full((50, 60, 3), value, np.uint8)
    expected = (value / 255 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
    params = augment.CropParams(size=32, box=(5, 5, 40, 50))  # no jitter, blur, solarize
    out = augment.render_crop(image, params, cfg.mean, cfg.std)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-6, atol=1e-6)
    solarized = augment.render_crop(
        image, augment.CropParams(size=32, box=(5, 5, 40, 50), solarize=True), cfg.mean, cfg.std
    )
    flipped_value = 255 - value if value >= 128 else value
    expected = (flipped_value / 255 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
    np.testing.assert_allclose(solarized[0, 0], expected, rtol=1e-6, atol=1e-6)


def test_image_smaller_than_the_crops():
    image = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    crops = augment.multicrop(image, np.random.default_rng(0), MultiCropConfig())
    assert crops["global"].shape == (2, 224, 224, 3) and crops["local"].shape == (8, 96, 96, 3)
    assert np.isfinite(crops["global"]).all()


def test_multicrop_rejects_non_rgb_arrays():
    with pytest.raises(ValueError, match="uint8"):
        augment.multicrop(np.zeros((8, 8), np.uint8), np.random.default_rng(0), MultiCropConfig())


# ---------------------------------------------------------------------------------------------
# decode_image.


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def check_rgb(decoded, shape):
    assert decoded.dtype == np.uint8 and decoded.shape == (*shape, 3)


def test_decode_jpeg_and_draft(photo):
    big = cv2.resize(photo, (800, 600))
    data = encode(Image.fromarray(big), "JPEG", quality=95)
    full = augment.decode_image(data)
    check_rgb(full, (600, 800))
    assert diff(full, big).mean() < 3
    # 600 // 200 = 3: the largest of 1/2, 1/4, 1/8 keeping >= 200 px is 1/2.
    half = augment.decode_image(data, min_side=200)
    check_rgb(half, (300, 400))
    assert diff(half, cv2.resize(big, (400, 300), interpolation=cv2.INTER_AREA)).mean() < 4
    check_rgb(augment.decode_image(data, min_side=700), (600, 800))  # no reduction possible
    png = encode(Image.fromarray(big), "PNG")
    check_rgb(augment.decode_image(png, min_side=100), (600, 800))  # draft is JPEG only


def test_decode_grayscale(photo):
    gray = Image.fromarray(photo).convert("L")
    for fmt in ("PNG", "JPEG"):
        decoded = augment.decode_image(
            encode(gray, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        )
        check_rgb(decoded, photo.shape[:2])
        assert (decoded == decoded[..., :1]).all()
        assert diff(decoded[..., 0], gray).mean() < (0.01 if fmt == "PNG" else 3)


def test_decode_cmyk_jpeg(photo):
    cmyk = Image.fromarray(photo).convert("CMYK")
    decoded = augment.decode_image(encode(cmyk, "JPEG", quality=95))
    check_rgb(decoded, photo.shape[:2])
    assert diff(decoded, photo).mean() < 4


def test_decode_palette_with_transparency():
    indices = np.zeros((10, 12), np.uint8)
    indices[:, 6:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    decoded = augment.decode_image(encode(image, "PNG", transparency=0))
    check_rgb(decoded, (10, 12))
    assert (decoded[:, :6] == augment.ALPHA_BACKGROUND).all()  # transparent: the background
    assert (decoded[:, 6:] == (200, 30, 40)).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_decode_alpha_composited(mode):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (10, 100, 30) if mode == "RGBA" else 100
    rgba[:, :2, 3] = 0
    rgba[:, 2:4, 3] = 255
    rgba[:, 4:, 3] = 128
    image = Image.fromarray(rgba).convert(mode)
    decoded = augment.decode_image(encode(image, "PNG")).astype(float)
    colour = np.asarray(image.convert("RGBA"))[0, 2, :3].astype(float)
    background = np.asarray(augment.ALPHA_BACKGROUND, float)
    np.testing.assert_allclose(decoded[:, :2], np.broadcast_to(background, (4, 2, 3)))
    np.testing.assert_allclose(decoded[:, 2:4], np.broadcast_to(colour, (4, 2, 3)))
    half = colour * 128 / 255 + background * 127 / 255
    np.testing.assert_allclose(decoded[:, 4:], np.broadcast_to(half, (4, 2, 3)), atol=1)


def test_decode_sixteen_bit():
    levels = np.array([[0, 257 * 100, 65535, 32768]], np.uint16)
    decoded = augment.decode_image(encode(Image.fromarray(levels), "PNG"))  # mode I;16
    check_rgb(decoded, (1, 4))
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 100, 255, 128])
    assert (decoded == decoded[..., :1]).all()
    # 16-bit RGB (written by OpenCV, which takes BGR): PIL reads it as 8-bit RGB.
    ok, rgb16 = cv2.imencode(".png", np.array([[[65535, 0, 257 * 50]]], np.uint16))
    assert ok
    np.testing.assert_array_equal(augment.decode_image(rgb16.tobytes())[0, 0], [50, 0, 255])


@pytest.mark.parametrize(
    ("fmt", "kwargs"), [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})]
)
def test_decode_other_formats_exactly(photo, fmt, kwargs):
    decoded = augment.decode_image(encode(Image.fromarray(photo), fmt, **kwargs))
    np.testing.assert_array_equal(decoded, photo)


GARBAGE = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
UNDECODABLE = {  # name -> (jpeg, png) -> bytes
    "truncated JPEG": lambda jpeg, png: jpeg[: len(jpeg) // 2],
    "JPEG with a corrupt body": lambda jpeg, png: jpeg[:400] + GARBAGE,
    "truncated PNG": lambda jpeg, png: png[:300],
    "random bytes": lambda jpeg, png: GARBAGE,
    "text": lambda jpeg, png: b"name,label\ncat.jpg,3\n",
    "empty": lambda jpeg, png: b"",
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_decode_rejects_undecodable_bytes_quickly(photo, case):
    image = Image.fromarray(photo)
    data = UNDECODABLE[case](encode(image, "JPEG"), encode(image, "PNG"))
    start = time.perf_counter()
    with pytest.raises(augment.ImageDecodeError, match="cannot decode"):
        augment.decode_image(data)
    assert time.perf_counter() - start < 1.0
    assert issubclass(augment.ImageDecodeError, ValueError)  # what loaders catch


def test_blur_sigma_range_follows_the_config():
    """Smaller crops take a proportionally smaller blur: sigma is drawn from cfg.blur_sigma."""
    cfg = MultiCropConfig(global_size=64, local_size=32, blur_sigma=(0.1, 0.6))
    rng = np.random.default_rng(0)
    sigmas = [
        p.blur_sigma for _ in range(300) for p in augment.sample_multicrop_params(rng, 80, 90, cfg)
    ]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 0.6
    assert stats.kstest(np.array(sigmas), stats.uniform(0.1, 0.5).cdf).pvalue > 1e-3
