"""DINO's multi-crop augmentation (main_dino.py: DataAugmentationDINO): random parameters apart
from the pixels they move.

Two halves:
- `sample_multicrop_params` draws everything random about an image's 2 global + N local crops from
  a `np.random.Generator`, without touching pixels: its statistics are testable exactly, and an
  on-device path can reuse it.
- `render_crop` applies one crop's `CropParams` to a uint8 RGB image with OpenCV on uint8 (SIMD,
  no PIL object per op), ending in one look-up table that does solarize, ToTensor and Normalize.

The reference is torchvision on PIL images. Statistically the same; per pixel it differs by:
- Resize: PIL's bicubic (a = -0.5) widens its kernel by the downscaling factor (antialias). We
  prefilter the crop with that widened kernel sampled at source pixels, then let OpenCV's bicubic
  (a = -0.75) interpolate: a mean absolute difference the tests keep under 2 uint8 levels, where
  plain `cv2.resize` aliases (BENCHMARKS.md, 'Input pipeline beside PIL', has both measured).
- Blur: a true Gaussian (truncated at 3 sigma) where PIL uses 3 box blurs of the same variance.
- Hue: OpenCV's 8-bit HSV (hue in 1/256 turns) where PIL's is in 1/255 turns.
- Grayscale rounds like PIL's except for rare pixels (1 level; BENCHMARKS.md), which contrast and
  saturation inherit; saturation's blend is otherwise PIL's up to float rounding (1 level, rare).
Brightness, contrast and solarize are the reference's arithmetic exactly (float32, truncated).

OpenCV starts a thread pool per process; data-loading workers should call `cv2.setNumThreads(1)`
so that several workers do not oversubscribe the cores.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import cv2
import numpy as np
from PIL import Image

from dino_jax.core.augment_laws import (
    JITTER_OPS,
    SOLARIZE_THRESHOLD,
    UNIFORMS_PER_CROP,
    MultiCropConfig,
    crop_laws,
)

# torchvision's RandomResizedCrop defaults (main_dino.py: DataAugmentationDINO keeps them).
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
# Transparent pixels are composited onto white, what an image viewer shows. The reference's
# `convert("RGB")` keeps whatever colour the encoder left under alpha 0 (often black, or noise).
ALPHA_BACKGROUND = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class CropParams:
    """Everything random about one crop: `render_crop(image, params, ...)` is deterministic.

    `box` is (top, left, height, width) in source pixels. The jitter factors are drawn whether or
    not `jitter` is on (as torchvision does), `blur_sigma` whether or not `blur` is; `jitter_order`
    is a permutation of indices into `JITTER_OPS` (the names of the factor fields), applied left to
    right.
    """

    size: int
    box: tuple[int, int, int, int]
    flip: bool = False
    jitter: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    jitter_order: tuple[int, ...] = (0, 1, 2, 3)
    grayscale: bool = False
    blur: bool = False
    blur_sigma: float = 0.0
    solarize: bool = False


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image (corrupt, truncated, unknown format)."""


# ---------------------------------------------------------------------------------------------
# Sampling.


def sample_crop_boxes(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] | np.ndarray,
    n: int,
    ratio: tuple[float, float] = CROP_RATIO,
) -> np.ndarray:
    """n draws of torchvision's `RandomResizedCrop.get_params` -> int64 [n, 4] (top, left, h, w).

    Each crop takes the first of 10 tries (area U(scale)·H·W, log aspect ratio uniform) that fits
    in the image, else the centre crop with the image's aspect ratio clamped to `ratio`. `scale`
    is one (min, max) or one per crop, [n, 2]. All 10 tries come from one draw: only the stream
    of random numbers differs from torchvision's, not their law.
    """
    scale = np.broadcast_to(np.asarray(scale, np.float64), (n, 2))
    u = rng.random((n, 2 * CROP_TRIES + 2))
    u_area, u_ratio, u_position = u[:, :CROP_TRIES], u[:, CROP_TRIES:-2], u[:, -2:]
    target_area = height * width * (scale[:, :1] + (scale[:, 1:] - scale[:, :1]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # np.round rounds half to even, like the reference's Python round().
    w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]

    found = fits.any(axis=1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = np.where(found, w, fallback_w)
    h = np.where(found, h, fallback_h)
    # floor(u · count) is uniform over the count positions, like torch.randint.
    top = np.where(found, (u_position[:, 0] * (height - h + 1)).astype(np.int64), (height - h) // 2)
    left = np.where(found, (u_position[:, 1] * (width - w + 1)).astype(np.int64), (width - w) // 2)
    return np.stack([top, left, h, w], axis=1)


def sample_multicrop_params(
    rng: np.random.Generator, height: int, width: int, cfg: MultiCropConfig
) -> list[CropParams]:
    """Parameters of an H×W image's 2 global crops, then its `cfg.local_crops_number` local ones."""
    if height < 1 or width < 1:
        raise ValueError(f"image of {height}x{width} pixels has nothing to crop.")
    n_local = cfg.local_crops_number
    if n_local < 0:
        raise ValueError(f"local_crops_number={n_local} must be >= 0.")
    n = 2 + n_local
    is_global = np.arange(n) < 2
    scales = np.where(is_global[:, None], cfg.global_scale, cfg.local_scale)
    boxes = sample_crop_boxes(rng, height, width, scales, n).tolist()

    laws = crop_laws(rng.random((n, UNIFORMS_PER_CROP)), cfg.blur_sigma, np)
    flip, jitter, grayscale = (laws[k].tolist() for k in ("flip", "jitter", "grayscale"))
    blur, solarize, sigma = (laws[k].tolist() for k in ("blur", "solarize", "blur_sigma"))
    factors, order = laws["factors"].tolist(), laws["jitter_order"].tolist()
    sizes = np.where(is_global, cfg.global_size, cfg.local_size).tolist()
    return [
        CropParams(
            size=sizes[i],
            box=tuple(boxes[i]),
            flip=flip[i],
            jitter=jitter[i],
            brightness=factors[i][0],
            contrast=factors[i][1],
            saturation=factors[i][2],
            hue=factors[i][3],
            jitter_order=tuple(order[i]),
            grayscale=grayscale[i],
            blur=blur[i],
            blur_sigma=sigma[i],
            solarize=solarize[i],
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# Pixel ops: uint8 [H, W, 3] RGB in, uint8 [H, W, 3] RGB out.


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The bicubic convolution kernel PIL uses (Keys, a = -0.5), support [-2, 2]."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=4096)
def _antialias_kernel(length: int, size: int) -> np.ndarray:
    """PIL's bicubic kernel widened by the factor length / size, at integer offsets -> float32 [K].

    Resizing `length` pixels to `size` needs no prefilter when it does not shrink ([1]).
    """
    factor = length / size
    if factor <= 1:
        return np.ones(1, np.float32)
    radius = math.ceil(2 * factor) - 1
    taps = _keys_cubic(np.arange(-radius, radius + 1) / factor)
    return (taps / taps.sum()).astype(np.float32)


def resized_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop `box` = (top, left, h, w) of `image` [H, W, 3] and resize it to [size, size, 3].

    Antialiased bicubic like PIL's: when an axis shrinks, the crop is first filtered with PIL's
    kernel widened by that axis's factor (borders replicated, as the reference crops before
    resizing), then OpenCV's bicubic interpolates at the output pixel centres.
    """
    top, left, h, w = box
    crop = image[top : top + h, left : left + w]
    if w > size or h > size:
        crop = cv2.sepFilter2D(
            crop,
            -1,
            _antialias_kernel(w, size),
            _antialias_kernel(h, size),
            borderType=cv2.BORDER_REPLICATE,
        )
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)


_LEVELS = np.arange(256, dtype=np.float32)
_IDENTITY_RGB_LUT = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)


def _blend_lut(degenerate: float, factor: float) -> np.ndarray:
    """PIL's `Image.blend(degenerate, image, factor)` per level: float32, clamped, truncated."""
    d = np.float32(degenerate)
    blended = d + np.float32(factor) * (_LEVELS - d)
    return np.clip(blended, 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black (PIL ImageEnhance.Brightness)."""
    return cv2.LUT(image, _blend_lut(0.0, factor))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the rounded mean of the grayscale image (PIL ImageEnhance.Contrast)."""
    mean = int(cv2.mean(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))[0] + 0.5)
    return cv2.LUT(image, _blend_lut(mean, factor))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the per-pixel grayscale image (PIL ImageEnhance.Color)."""
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    # addWeighted rounds; subtracting just under half a level turns that into PIL's truncation
    # (exactly half would send every integer result, e.g. any gray pixel, one level down).
    return cv2.addWeighted(image, factor, gray, 1.0 - factor, -0.499)


def adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """Rotate the 8-bit HSV hue by int(factor·255) steps, wrapping (torchvision's adjust_hue)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
    lut = _IDENTITY_RGB_LUT.copy()
    lut[0, :, 0] += np.uint8(int(factor * 255) % 256)  # uint8 arithmetic wraps
    return cv2.cvtColor(cv2.LUT(hsv, lut), cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma replicated to 3 channels (PIL convert("L"), then RGB)."""
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of std `sigma` px (PIL GaussianBlur's `radius`), edges replicated."""
    return cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)


_JITTER_FNS = {
    "brightness": adjust_brightness,
    "contrast": adjust_contrast,
    "saturation": adjust_saturation,
    "hue": adjust_hue,
}
_SOLARIZE_LUT = np.where(
    np.arange(256) >= SOLARIZE_THRESHOLD, 255 - np.arange(256), np.arange(256)
).astype(np.uint8)


def solarize(image: np.ndarray) -> np.ndarray:
    """Invert the levels >= 128 (PIL ImageOps.solarize)."""
    return cv2.LUT(image, _SOLARIZE_LUT)


@functools.lru_cache(maxsize=8)
def normalization_table(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """(level / 255 - mean) / std for every level and channel -> float32 [1, 256, 3]."""
    levels = np.arange(256, dtype=np.float64)[:, None] / 255.0
    table = (levels - np.asarray(mean)) / np.asarray(std)
    return table.astype(np.float32)[None]


def render_crop(
    image: np.ndarray,
    params: CropParams,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One crop of `image` (uint8 [H, W, 3] RGB) -> normalised float32 [S, S, 3], S = params.size.

    The reference's order: resized crop, flip, colour jitter (in `params.jitter_order`), grayscale,
    blur, solarize, normalise. Writes into `out` (float32 [S, S, 3], C-contiguous) when given.
    """
    x = resized_crop(image, params.box, params.size)
    if params.flip:
        x = cv2.flip(x, 1)
    if params.jitter:
        for index in params.jitter_order:
            name = JITTER_OPS[index]
            x = _JITTER_FNS[name](x, getattr(params, name))
    if params.grayscale:
        x = to_grayscale(x)
    if params.blur:
        x = gaussian_blur(x, params.blur_sigma)
    table = normalization_table(tuple(mean), tuple(std))
    if params.solarize:
        # Solarize then normalise is one table: normalise's entries re-indexed by solarize's.
        table = table[:, _SOLARIZE_LUT]
    return cv2.LUT(x, table, dst=out)


def multicrop(
    image: np.ndarray | Image.Image, rng: np.random.Generator, cfg: MultiCropConfig
) -> dict[str, np.ndarray]:
    """DINO's crops of one image -> {"global": float32 [2, G, G, 3], "local": float32 [N, L, L, 3]}.

    `image` is uint8 [H, W, 3] RGB or a PIL image (converted like `decode_image`). Crops are
    normalised NHWC; "local" is [0, L, L, 3] when cfg.local_crops_number == 0.
    """
    if isinstance(image, Image.Image):
        image = pil_to_rgb(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image of dtype {image.dtype} and shape {image.shape} is not uint8 [H, W, 3] RGB; "
            "decode it with decode_image."
        )
    params = sample_multicrop_params(rng, image.shape[0], image.shape[1], cfg)
    g, l = cfg.global_size, cfg.local_size
    crops = {
        "global": np.empty((2, g, g, 3), np.float32),
        "local": np.empty((cfg.local_crops_number, l, l, 3), np.float32),
    }
    for i, p in enumerate(params):
        out = crops["global"][i] if i < 2 else crops["local"][i - 2]
        render_crop(image, p, cfg.mean, cfg.std, out=out)
    return crops


def multicrop_uint8(
    image: np.ndarray, rng: np.random.Generator, cfg: MultiCropConfig
) -> dict[str, np.ndarray]:
    """The host's half of on-device augmentation: resized crops and flips only, uint8.

    -> {"global": uint8 [2, G, G, 3], "local": uint8 [N, L, L, 3]}; `device_augment` does the
    colours, blur, solarize and normalisation inside the train step.
    """
    params = sample_multicrop_params(rng, image.shape[0], image.shape[1], cfg)
    crops = []
    for p in params:
        x = resized_crop(image, p.box, p.size)
        crops.append(cv2.flip(x, 1) if p.flip else x)
    local = crops[2:] or np.empty((0, cfg.local_size, cfg.local_size, 3), np.uint8)
    return {"global": np.stack(crops[:2]), "local": np.stack(local)}


# ---------------------------------------------------------------------------------------------
# Decoding.


def _sixteen_bit_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit levels of an "I;16*" or "I" image (how PIL opens 16-bit gray) -> uint8 [H, W]."""
    levels = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return ((levels * 255 + 32767) // 65535).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 [H, W, 3] RGB.

    16-bit levels are scaled to 8 bits (PIL's own conversion would clip them at 255); alpha, and
    palette or colour-key transparency, is composited onto `ALPHA_BACKGROUND`; other modes (L, 1,
    P, CMYK, YCbCr...) go through PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.asarray(image)
    if mode == "I" or mode.startswith("I;16"):
        return np.repeat(_sixteen_bit_to_uint8(image)[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def decode_image(data: bytes, min_side: int | None = None) -> np.ndarray:
    """Image file bytes (any format PIL reads) -> uint8 [H, W, 3] RGB.

    With `min_side`, a JPEG is decoded at the smallest scale of 1/8, 1/4, 1/2, 1 that keeps its
    shorter side >= min_side (libjpeg's DCT scaling: less work, antialiased). Raises
    `ImageDecodeError` (a ValueError) naming the reason for bytes that are not a whole image.
    EXIF orientation is ignored, as in the reference.
    """
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side={min_side} must be >= 1 (or None for full resolution).")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if min_side is not None and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image.load()
            return pil_to_rgb(image)
    except Exception as e:  # PIL's plugins raise many types on malformed input; all mean "skip".
        raise ImageDecodeError(
            f"cannot decode {len(data)} bytes as an image: {type(e).__name__}: {e}"
        ) from e
