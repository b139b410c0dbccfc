"""DINO's photometric augmentation inside the jitted step (`config.data.augment_on_device`).

The host decodes, crops, resizes and flips in uint8 (`data.augment.multicrop_uint8`); the step
then draws, from its own RNG and by the host's laws (`augment_laws.crop_laws`): colour jitter
with p 0.8 (brightness, contrast, saturation, hue in a random order), grayscale p 0.2, Gaussian
blur (p 1, 0.1, 0.5 for global crop 1, global crop 2, local crops), solarize (p 0.2, global
crop 2), and normalises. Pixels stay integer levels in float32, rounded after each op as the
host's uint8 ops round, so the two paths agree to about a level (tests/test_device_augment.py
states the bounds).
Every op is computed for every crop and selected per crop: branch-free, one program for any draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dino_jax.core.augment_laws import (
    SOLARIZE_THRESHOLD,
    UNIFORMS_PER_CROP,
    MultiCropConfig,
    crop_laws,
)


def gray(x: jax.Array) -> jax.Array:
    """ITU-R 601-2 luma of levels [..., 3] -> [...], OpenCV's 14-bit fixed point rounding."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return jnp.floor((r * 4899 + g * 9617 + b * 1868 + 8192) / 16384)


def _blend(degenerate: jax.Array, x: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's blend, truncated to a level: d + f (x - d), clamped to [0, 255]."""
    return jnp.floor(jnp.clip(degenerate + factor * (x - degenerate), 0, 255))


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
    """x [M, H, W, 3] levels, factor [M]: blend with black."""
    return _blend(jnp.zeros_like(x), x, factor[:, None, None, None])


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with the rounded mean gray level of each image."""
    mean = jnp.floor(jnp.mean(gray(x), axis=(1, 2)) + 0.5)[:, None, None, None]
    return _blend(mean, x, factor[:, None, None, None])


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with each pixel's gray level."""
    return _blend(gray(x)[..., None], x, factor[:, None, None, None])


def _rgb_to_hsv(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Levels [..., 3] -> hue in turns [0, 1), saturation [0, 1], value (levels)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    value = jnp.max(x, axis=-1)
    chroma = value - jnp.min(x, axis=-1)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    hue = jnp.where(
        value == r,
        (g - b) / safe,
        jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = jnp.where(chroma > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    return hue, saturation, value


def _hsv_to_rgb(hue: jax.Array, saturation: jax.Array, value: jax.Array) -> jax.Array:
    """The inverse of `_rgb_to_hsv`, as the continuous formula k = (n + 6h) mod 6."""
    channels = []
    for n in (5.0, 3.0, 1.0):  # r, g, b
        k = jnp.mod(n + 6.0 * hue, 6.0)
        channels.append(value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0, 1))
    return jnp.stack(channels, axis=-1)


def adjust_hue(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Rotate the hue by int(factor * 255) / 256 turns (the host's 8-bit HSV step)."""
    steps = jnp.mod(jnp.trunc(factor * 255.0), 256.0)[:, None, None]
    hue, saturation, value = _rgb_to_hsv(x)
    rotated = _hsv_to_rgb(jnp.mod(hue + steps / 256.0, 1.0), saturation, value)
    return jnp.clip(jnp.round(rotated), 0, 255)


def to_grayscale(x: jax.Array) -> jax.Array:
    return jnp.broadcast_to(gray(x)[..., None], x.shape)


def blur_radius(sigma: float) -> int:
    """OpenCV's kernel radius for a uint8 image: ksize = round(6 sigma + 1) | 1."""
    return (round(sigma * 6 + 1) | 1) // 2


def gaussian_blur(x: jax.Array, sigma: jax.Array, max_sigma: float) -> jax.Array:
    """Separable Gaussian of per-image std `sigma` [M] (px), OpenCV's kernel size, edges
    replicated. Taps out to the radius of `max_sigma`; each image's beyond its own are 0."""
    reach = blur_radius(max_sigma)
    offsets = jnp.arange(-reach, reach + 1, dtype=jnp.float32)
    radius = (jnp.round(sigma * 6 + 1).astype(jnp.int32) | 1) // 2  # [M]
    weights = jnp.exp(-(offsets**2) / (2 * sigma[:, None] ** 2))
    weights = jnp.where(jnp.abs(offsets) <= radius[:, None], weights, 0.0)
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)  # [M, taps]
    for axis in (1, 2):
        size = x.shape[axis]
        pad = [(0, 0)] * 4
        pad[axis] = (reach, reach)
        padded = jnp.pad(x, pad, mode="edge")
        taps = [jax.lax.slice_in_dim(padded, t, t + size, axis=axis) for t in range(2 * reach + 1)]
        x = sum(w[:, None, None, None] * tap for w, tap in zip(weights.T, taps, strict=True))
    return jnp.clip(jnp.round(x), 0, 255)


def solarize(x: jax.Array) -> jax.Array:
    return jnp.where(x >= SOLARIZE_THRESHOLD, 255.0 - x, x)


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # JITTER_OPS order


def photometric(x: jax.Array, laws: dict, cfg: MultiCropConfig) -> jax.Array:
    """uint8 crops [M, S, S, 3] and their laws (each [M, ...]) -> normalised float32."""

    def where(flag: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(flag[:, None, None, None], new, old)

    x = x.astype(jnp.float32)
    for position in range(len(_JITTER)):
        for index, op in enumerate(_JITTER):
            chosen = laws["jitter"] & (laws["jitter_order"][:, position] == index)
            x = where(chosen, op(x, laws["factors"][:, index]), x)
    x = where(laws["grayscale"], to_grayscale(x), x)
    x = where(laws["blur"], gaussian_blur(x, laws["blur_sigma"], max(cfg.blur_sigma)), x)
    x = where(laws["solarize"], solarize(x), x)
    mean, std = jnp.asarray(cfg.mean), jnp.asarray(cfg.std)
    return (x / 255.0 - mean) / std


def sample_laws(key: jax.Array, batch: int, n_crops: int, cfg: MultiCropConfig) -> dict:
    """The host's laws drawn on device: each entry [batch, n_crops, ...]."""
    u = jax.random.uniform(key, (batch, n_crops, UNIFORMS_PER_CROP))
    return crop_laws(u, cfg.blur_sigma, jnp)


def augment_batch(key: jax.Array, batch: dict, cfg: MultiCropConfig) -> dict:
    """{"global": uint8 [B, 2, G, G, 3], "local": uint8 [B, n, L, L, 3] (optional)} -> the same
    crops photometrically augmented and normalised, float32."""
    groups = {name: batch[name] for name in ("global", "local") if name in batch}
    n_crops = sum(crops.shape[1] for crops in groups.values())
    b = batch["global"].shape[0]
    laws = sample_laws(key, b, n_crops, cfg)
    out, start = {}, 0
    for name, crops in groups.items():
        n = crops.shape[1]
        group_laws = {
            k: v[:, start : start + n].reshape(b * n, *v.shape[2:]) for k, v in laws.items()
        }
        flat = photometric(crops.reshape(b * n, *crops.shape[2:]), group_laws, cfg)
        out[name] = flat.reshape(crops.shape)
        start += n
    return out
