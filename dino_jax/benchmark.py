"""Benchmarks of dino_jax, one sub-command each; figures go to BENCHMARKS.md.

    python -m dino_jax.benchmark data [--images 200] [--local-crops 10] [--seed 0] [--repeats 5]

`data`: single-process images/s (= per core) of JPEG decode + multi-crop, ours
(`dino_jax.data.augment`) against the baseline, a plain PIL implementation of the reference's
torchvision transforms, on synthetic photo-like JPEGs of ImageNet's typical size.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from tqdm import tqdm

from dino_jax.data import augment

# ImageNet's most common shapes (H, W).
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


# ---------------------------------------------------------------------------------------------
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
        x = ImageOps.solarize(x, augment.SOLARIZE_THRESHOLD)
    return (np.asarray(x, np.float32) / 255.0 - mean) / std


def baseline_decode_multicrop(
    data: bytes, rng: np.random.Generator, cfg: augment.MultiCropConfig
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


def ours_decode_multicrop(
    data: bytes, rng: np.random.Generator, cfg: augment.MultiCropConfig
) -> dict[str, np.ndarray]:
    """dino_jax's pipeline end to end: `decode_image` then `multicrop`."""
    return augment.multicrop(augment.decode_image(data), rng, cfg)


# ---------------------------------------------------------------------------------------------
# The `data` sub-command.


def _images_per_second(
    pipeline: Callable[..., dict[str, np.ndarray]],
    files: list[bytes],
    cfg: augment.MultiCropConfig,
    seed: int,
    label: str,
) -> tuple[float, float]:
    """One pass over `files` -> (images per wall-clock second, images per CPU second)."""
    rng = np.random.default_rng(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for data in tqdm(files, desc=label, leave=False):
        pipeline(data, rng, cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(files) / wall, len(files) / cpu


def run_data(args: argparse.Namespace) -> None:
    # One thread: the figure is per core, and a loader runs one such process per core.
    cv2.setNumThreads(1)
    cfg = augment.MultiCropConfig(local_crops_number=args.local_crops)
    files = synthetic_jpegs(args.images, args.seed)
    kb = statistics.mean(len(f) for f in files) / 1024
    pipelines = {"PIL baseline": baseline_decode_multicrop, "dino_jax": ours_decode_multicrop}
    for pipeline in pipelines.values():  # warm-up: imports, caches, page faults
        pipeline(files[0], np.random.default_rng(0), cfg)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    for repeat in tqdm(range(args.repeats), desc="repeats"):
        for name, pipeline in pipelines.items():  # interleaved, so load from others hits both
            rates[name].append(
                _images_per_second(pipeline, files, cfg, args.seed + repeat, f"{name} #{repeat}")
            )
    wall = {name: statistics.median(r[0] for r in runs) for name, runs in rates.items()}
    cpu = {name: statistics.median(r[1] for r in runs) for name, runs in rates.items()}
    crops = f"2x{cfg.global_size} + {cfg.local_crops_number}x{cfg.local_size}"
    print(
        f"\n{args.images} JPEGs (mean {kb:.0f} KB, ~500x375, quality 90), decode + {crops}, "
        f"1 process, median of {args.repeats} repeats\n"
    )
    print("| pipeline | images/s (wall) | images/s per CPU-second | ms/image |")
    print("|---|---:|---:|---:|")
    for name in pipelines:
        print(f"| {name} | {wall[name]:.1f} | {cpu[name]:.1f} | {1000 / wall[name]:.2f} |")
    ratio = wall["dino_jax"] / wall["PIL baseline"]
    cpu_ratio = cpu["dino_jax"] / cpu["PIL baseline"]
    print(f"\nspeed-up dino_jax / PIL baseline: {ratio:.2f}x (wall), {cpu_ratio:.2f}x (CPU time)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dino_jax.benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser(
        "data", help="input pipeline: decode + multi-crop, images/s per core"
    )
    data.add_argument("--images", type=int, default=200, help="synthetic JPEGs per pass")
    data.add_argument("--local-crops", type=int, default=10, help="local crops per image")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--repeats", type=int, default=5, help="passes per pipeline (median)")
    data.set_defaults(run=run_data)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
