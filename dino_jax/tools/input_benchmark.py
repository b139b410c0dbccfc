"""`benchmark data`: single-process images/s (= per core) of JPEG decode + multi-crop, ours
(`dino_jax.data.augment`) beside a plain PIL implementation of the reference's torchvision
transforms (`main_dino.py: DataAugmentationDINO`), on generated photo-like JPEGs or on a sample of
a config's own source."""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import cv2
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from tqdm import tqdm

from dino_jax.core.augment_laws import SOLARIZE_THRESHOLD, MultiCropConfig
from dino_jax.core.config import crops_summary
from dino_jax.data import augment
from dino_jax.data import pipeline as data_pipeline
from dino_jax.data.sources import DecodedSource

PHOTO_SHAPES = ((375, 500), (500, 375), (333, 500), (500, 333))


def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 [H, W, 3] RGB image: a 1/f colour field under "dead leaves", plus grain.

    Dead leaves (opaque discs with radii of density r^-3, a classic model of natural-image
    statistics) give edges at every scale; the luminance texture and sensor grain give the fine
    detail that makes JPEG decoding cost what it costs on photos (~90 KB at quality 90).
    """
    field = np.zeros((height, width, 3), np.float32)
    for cells in (2, 4, 8, 16, 32):
        coarse = rng.normal(size=(cells, cells * width // height + 1, 3)).astype(np.float32)
        mix = rng.normal(0.6, 0.25, size=(3, 3)).astype(np.float32)  # correlated channels
        up = cv2.resize(coarse @ mix, (width, height), interpolation=cv2.INTER_CUBIC)
        field += 70.0 / cells**0.6 * up
    canvas = np.clip(field + 120, 0, 255).astype(np.uint8)
    n, r_min, r_max = 2500, 1.5, 150.0
    radii = np.sort((r_min**-2 - rng.random(n) * (r_min**-2 - r_max**-2)) ** -0.5)[::-1]
    x, y = rng.integers(0, width, n), rng.integers(0, height, n)
    shade = rng.normal(0, 35, (n, 1)) + rng.normal(0, 12, (n, 3))
    colours = np.clip(canvas[y, x] + shade, 0, 255)
    for i in range(n):  # largest first, so small leaves lie on top
        centre, colour = (int(x[i]), int(y[i])), tuple(colours[i].tolist())
        cv2.circle(canvas, centre, int(radii[i]), colour, -1, cv2.LINE_AA)
    pixels = cv2.GaussianBlur(canvas.astype(np.float32), (0, 0), 0.5)
    texture = cv2.GaussianBlur(rng.normal(0, 35, (height, width)).astype(np.float32), (0, 0), 0.6)
    pixels += texture[..., None] + rng.normal(0, 3, pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def synthetic_jpegs(n: int, seed: int, quality: int = 90) -> list[bytes]:
    """n photo-like JPEG files (quality 90, 4:2:0) of ImageNet's common shapes, in memory."""
    rng = np.random.default_rng(seed)
    files = []
    for _ in tqdm(range(n), desc="generating JPEGs", leave=False):
        height, width = PHOTO_SHAPES[int(rng.integers(len(PHOTO_SHAPES)))]
        buffer = io.BytesIO()
        Image.fromarray(synthetic_photo(rng, height, width)).save(buffer, "JPEG", quality=quality)
        files.append(buffer.getvalue())
    return files


# The baseline: what the reference does (torchvision's functional ops on PIL images).


def baseline_hue(image: Image.Image, factor: float) -> Image.Image:
    """torchvision's adjust_hue on a PIL image: shift H of PIL's 8-bit HSV, wrapping."""
    h, s, v = image.convert("HSV").split()
    shifted = np.array(h, np.uint8) + np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")


def baseline_render_crop(
    image: Image.Image, p: augment.CropParams, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """One crop the reference's way: PIL crop/resize/enhance/filter, ToTensor + Normalize."""
    top, left, h, w = p.box
    x = image.crop((left, top, left + w, top + h)).resize((p.size, p.size), Image.BICUBIC)
    if p.flip:
        x = x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if p.jitter:
        ops = (
            lambda im: ImageEnhance.Brightness(im).enhance(p.brightness),
            lambda im: ImageEnhance.Contrast(im).enhance(p.contrast),
            lambda im: ImageEnhance.Color(im).enhance(p.saturation),
            lambda im: baseline_hue(im, p.hue),
        )
        for index in p.jitter_order:
            x = ops[index](x)
    if p.grayscale:
        x = x.convert("L").convert("RGB")
    if p.blur:
        x = x.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.solarize:
        x = ImageOps.solarize(x, SOLARIZE_THRESHOLD)
    return (np.asarray(x, np.float32) / 255.0 - mean) / std


def baseline_decode_multicrop(
    data: bytes, rng: np.random.Generator, cfg: MultiCropConfig
) -> dict[str, np.ndarray]:
    """The baseline end to end: `pil_loader` decode, then every crop with `baseline_render_crop`.

    Crop parameters come from our sampler (microseconds) so both sides do the same pixel work.
    """
    image = Image.open(io.BytesIO(data)).convert("RGB")
    params = augment.sample_multicrop_params(rng, image.height, image.width, cfg)
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    crops = [baseline_render_crop(image, p, mean, std) for p in params]
    local = crops[2:] or np.empty((0, cfg.local_size, cfg.local_size, 3), np.float32)
    return {"global": np.stack(crops[:2]), "local": np.stack(local)}


def host_half_decode_multicrop(
    data: bytes, rng: np.random.Generator, cfg: MultiCropConfig
) -> dict[str, np.ndarray]:
    """The host's share with `data.augment_on_device`: decode, then uint8 crops and flips."""
    return augment.multicrop_uint8(augment.decode_image(data), rng, cfg)


def ours_decode_multicrop(
    data: bytes, rng: np.random.Generator, cfg: MultiCropConfig
) -> dict[str, np.ndarray]:
    """dino_jax's pipeline end to end: `decode_image` then `multicrop`."""
    return augment.multicrop(augment.decode_image(data), rng, cfg)


def _images_per_second(
    pipeline: Callable[..., dict[str, np.ndarray]],
    items: list,
    cfg: MultiCropConfig,
    seed: int,
    label: str,
) -> tuple[float, float]:
    """One pass over `items` -> (images per wall-clock second, images per CPU second)."""
    rng = np.random.default_rng(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for item in tqdm(items, desc=label, leave=False):
        pipeline(item, rng, cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(items) / wall, len(items) / cpu


def _time_pipelines(
    pipelines: dict[str, Callable[..., dict[str, np.ndarray]]],
    items: list,
    cfg: MultiCropConfig,
    args: argparse.Namespace,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median (wall, CPU) images/s of each pipeline over `args.repeats` passes, interleaved."""
    for pipeline in pipelines.values():  # warm-up: imports, caches, page faults
        pipeline(items[0], np.random.default_rng(0), cfg)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    for repeat in tqdm(range(args.repeats), desc="repeats"):
        for name, pipeline in pipelines.items():  # interleaved, so load from others hits both
            rates[name].append(
                _images_per_second(pipeline, items, cfg, args.seed + repeat, f"{name} #{repeat}")
            )
    wall = {name: statistics.median(r[0] for r in runs) for name, runs in rates.items()}
    cpu = {name: statistics.median(r[1] for r in runs) for name, runs in rates.items()}
    return wall, cpu


def _print_rates(wall: dict[str, float], cpu: dict[str, float]) -> None:
    print("| pipeline | images/s (wall) | images/s per CPU-second | ms/image |")
    print("|---|---:|---:|---:|")
    for name in wall:
        print(f"| {name} | {wall[name]:.1f} | {cpu[name]:.1f} | {1000 / wall[name]:.2f} |")


def _print_speed_up(wall: dict[str, float], cpu: dict[str, float], ours: str) -> None:
    ratio = wall[ours] / wall["PIL baseline"]
    cpu_ratio = cpu[ours] / cpu["PIL baseline"]
    print(f"\nspeed-up {ours} / PIL baseline: {ratio:.2f}x (wall), {cpu_ratio:.2f}x (CPU time)")


def run_generated(args: argparse.Namespace) -> None:
    """Ours beside the PIL baseline on `args.images` generated photo-like JPEGs."""
    # One thread: the figure is per core, and a loader runs one such process per core.
    cv2.setNumThreads(1)
    cfg = MultiCropConfig(local_crops_number=10 if args.local_crops is None else args.local_crops)
    files = synthetic_jpegs(args.images, args.seed)
    kb = statistics.mean(len(f) for f in files) / 1024
    pipelines = {
        "PIL baseline": baseline_decode_multicrop,
        "dino_jax": ours_decode_multicrop,
        "dino_jax, augment_on_device (host half)": host_half_decode_multicrop,
    }
    wall, cpu = _time_pipelines(pipelines, files, cfg, args)
    crops = f"2x{cfg.global_size} + {cfg.local_crops_number}x{cfg.local_size}"
    print(
        f"\n{args.images} JPEGs (mean {kb:.0f} KB, ~500x375, quality 90), decode + {crops}, "
        f"1 process, median of {args.repeats} repeats\n"
    )
    _print_rates(wall, cpu)
    _print_speed_up(wall, cpu, "dino_jax")


def sample_records(source, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` records of `source` at seeded random indices (all of them when it has no more), read
    into memory so that the timing is of decoding and cropping, not of the disk."""
    count = len(source)
    if count == 0:
        raise ValueError(f"{source!r} holds no images")
    rng = np.random.default_rng(seed)
    indices = np.arange(count) if count <= n else rng.choice(count, n, replace=False)
    return [source[int(i)] for i in sorted(indices)]


def _decodes(image) -> bool:
    try:
        augment.decode_image(bytes(image))
    except augment.ImageDecodeError:
        return False
    return True


def _image_size(image) -> tuple[int, int]:
    """(width, height) of encoded bytes (from the header) or of a decoded [H, W, 3] array."""
    if isinstance(image, bytes | np.bytes_):
        with Image.open(io.BytesIO(bytes(image))) as opened:
            return opened.size
    return int(image.shape[1]), int(image.shape[0])


def run_config(args: argparse.Namespace, label: str, config: ml_collections.ConfigDict) -> None:
    """The training pipeline of one config (`data.pipeline.train_dataset`'s source, decode and
    multi-crop) on a sample of its own source; the PIL baseline on the same files."""
    cv2.setNumThreads(1)
    data = config.data
    cfg = data_pipeline.multicrop_config(config)
    train = data_pipeline.train_source(config)
    records = sample_records(train.source, args.images, args.seed)
    encoded = all(isinstance(r["image"], bytes | np.bytes_) for r in records)
    unreadable = 0
    if encoded:
        # Training skips unreadable files; the baseline would stop at them.
        readable = [r for r in records if _decodes(r["image"])]
        if not readable:
            raise ValueError(f"none of the {len(records)} sampled files of {train!r} decodes")
        unreadable, records = len(records) - len(readable), readable
    # The training decode (JPEGs at reduced scale down to the global crop), on records in memory.
    decoded = DecodedSource(records, min_side=train.min_side)
    transform = data_pipeline.MultiCropTransform(cfg, on_device=data.augment_on_device)
    ours = "dino_jax, augment_on_device (host half)" if data.augment_on_device else "dino_jax"
    pipelines = {ours: lambda index, rng, cfg: transform.random_map(decoded[index], rng)}
    if encoded:

        def baseline(index, rng, cfg):
            return baseline_decode_multicrop(bytes(records[index]["image"]), rng, cfg)

        pipelines = {"PIL baseline": baseline, **pipelines}
    items = list(range(len(records)))
    wall, cpu = _time_pipelines(pipelines, items, cfg, args)
    sizes = sorted((_image_size(r["image"]) for r in records), key=lambda wh: wh[0] * wh[1])
    width, height = sizes[len(sizes) // 2]
    kind = (
        f"mean {statistics.mean(len(r['image']) for r in records) / 1024:.0f} KB"
        + (f", {unreadable} unreadable left out" if unreadable else "")
        if encoded
        else "decoded arrays"
    )
    print(
        f"\n{len(records)} images of {data.source} (split {data.split!r}: {len(train)} images; "
        f"{kind}, median {width}x{height}), decode + {crops_summary(config)}, 1 process, median of "
        f"{args.repeats} repeats"
    )
    print(f"config: {label}\nsource: {train!r}\n")
    _print_rates(wall, cpu)
    if encoded:
        _print_speed_up(wall, cpu, ours)
    else:
        print(f"\nPIL baseline skipped: {data.source} gives decoded images, no files to decode.")
