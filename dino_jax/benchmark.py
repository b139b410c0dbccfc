"""Benchmarks of dino_jax, one sub-command each; figures go to BENCHMARKS.md.

    python -m dino_jax.benchmark data [--images 200] [--local-crops 10] [--seed 0] [--repeats 5]
    python -m dino_jax.benchmark data --config configs/custom.py \\
        --config.data.source=folder:/data/pets [--images 200] [--seed 0] [--repeats 5]
    python -m dino_jax.benchmark step --config configs/vit_small16.py --config.batch_size=8 \\
        [--config configs/other.py ...] [--steps 5] [--warmup 1] [--interleave]
    python -m dino_jax.benchmark compile --config configs/vit_small16.py --target v4-32 \\
        [--config.key=value ...] [--config configs/other.py ...]

`step`: the real jitted train step on random data, per config: compile time, median step time,
images/s, FLOPs per step from XLA's cost analysis, achieved FLOP/s, MFU against the device's
peak, and peak device memory. `--config.key=value` after a `--config` overrides that config.
`--interleave` runs one step of each config in turn, so that A/B figures share the same minutes.

`compile`: the real train step compiled on this host for a TPU slice or GPU node it does not
have (dino_jax.targets: v4-8, v4-32, v5e-16, v5p-32, v6e-16, h100x8), per device: memory against
the chip's HBM, XLA's FLOPs and bytes accessed, roofline bounds, collectives (dino_jax.aot).
Run TPU targets one process at a time (libtpu), e.g. under `flock /tmp/libtpu.lock`.

`data`: single-process images/s (= per core) of JPEG decode + multi-crop, ours
(`dino_jax.data.augment`) against the baseline, a plain PIL implementation of the reference's
torchvision transforms, on synthetic photo-like JPEGs of ImageNet's typical size; and the
host's share alone when `data.augment_on_device` moves the photometric ops into the step.
With `--config`, the training pipeline of that config instead (its source and split, crop sizes,
local crops and `augment_on_device`), on a seeded sample of --images of its source read into
memory: what one core decodes and crops per second of your data, to size `data.num_workers`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import io
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from tqdm import tqdm

from dino_jax import aot, parallel, targets
from dino_jax.config import load_config
from dino_jax.cpu import attention_kernel, host_memory
from dino_jax.data import augment
from dino_jax.data import pipeline as data_pipeline
from dino_jax.data.sources import DecodedSource
from dino_jax.step import init_state, make_train_step

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


def host_half_decode_multicrop(
    data: bytes, rng: np.random.Generator, cfg: augment.MultiCropConfig
) -> dict[str, np.ndarray]:
    """The host's share with `data.augment_on_device`: decode, then uint8 crops and flips."""
    return augment.multicrop_uint8(augment.decode_image(data), rng, cfg)


def ours_decode_multicrop(
    data: bytes, rng: np.random.Generator, cfg: augment.MultiCropConfig
) -> dict[str, np.ndarray]:
    """dino_jax's pipeline end to end: `decode_image` then `multicrop`."""
    return augment.multicrop(augment.decode_image(data), rng, cfg)


# ---------------------------------------------------------------------------------------------
# The `data` sub-command.


def _images_per_second(
    pipeline: Callable[..., dict[str, np.ndarray]],
    items: list,
    cfg: augment.MultiCropConfig,
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
    cfg: augment.MultiCropConfig,
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


def run_data(args: argparse.Namespace, config_args: list[str]) -> None:
    # One thread: the figure is per core, and a loader runs one such process per core.
    cv2.setNumThreads(1)
    if config_args:
        run_data_config(args, config_args)
        return
    cfg = augment.MultiCropConfig(
        local_crops_number=10 if args.local_crops is None else args.local_crops
    )
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


def run_data_config(args: argparse.Namespace, config_args: list[str]) -> None:
    """The training pipeline of one config (`data.pipeline.train_dataset`'s source, decode and
    multi-crop) on a sample of its own source; the PIL baseline on the same files."""
    if args.local_crops is not None:
        raise ValueError("--local-crops: with --config, set --config.local_crops_number instead")
    configs = parse_configs(config_args)
    if len(configs) > 1:
        raise ValueError("benchmark data measures one --config at a time")
    [(label, config)] = configs
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
    transform = data_pipeline.MultiCrop(cfg, on_device=data.augment_on_device)
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
        f"{kind}, median {width}x{height}), decode + {_crops(config)}, 1 process, median of "
        f"{args.repeats} repeats"
    )
    print(f"config: {label}\nsource: {train!r}\n")
    _print_rates(wall, cpu)
    if encoded:
        _print_speed_up(wall, cpu, ours)
    else:
        print(f"\nPIL baseline skipped: {data.source} gives decoded images, no files to decode.")


# ---------------------------------------------------------------------------------------------
# The `step` sub-command.

# Dense peak FLOP/s per chip by matmul input dtype (vendor data sheets; GPUs: SXM parts, without
# sparsity; float32 on GPUs is TF32 on the tensor cores, XLA's default precision there; TPUs do
# float32 matmuls as bfloat16 passes at the default precision).
PEAK_FLOPS = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p reports "TPU v5"
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},
    "H200": {"bfloat16": 989e12, "float32": 495e12},
}


def device_peak_flops(device: jax.Device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device for matmuls in `dtype`, where the figure comes from).

    Accelerators: the table above, matched on `device_kind`. CPUs: a measured matmul in `dtype`.
    """
    if device.platform == "cpu":
        return measured_matmul_peak(device, dtype), "measured matmul"
    kind = device.device_kind
    # The longest matching name wins ("TPU v5 lite" before "TPU v5").
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name][dtype], f"{name} data sheet"
    raise ValueError(f"No peak FLOP/s known for device_kind={kind!r}: add it to PEAK_FLOPS.")


def mesh_peak_flops(devices, dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of all `devices` together. CPU devices share the host's cores, so their
    peak is the host's measured one, however many devices the host is split into."""
    peak, source = device_peak_flops(devices[0], dtype)
    if devices[0].platform == "cpu":
        return peak, source
    return peak * len(devices), source


@functools.cache
def measured_matmul_peak(
    device: jax.Device, dtype: str = "float32", size: int = 2048, repeats: int = 7
) -> float:
    """The best FLOP/s of a [size, size] @ [size, size] matmul in `dtype` on `device` (all
    cores), accumulated in float32 as the step's are (for bfloat16, on the CPU's matrix units
    where it has them), measured once per process and dtype, so that the configs of one run
    share one peak."""
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def override_config(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Apply one `key.sub=value` (the part after `--config.`); values are Python literals or
    plain strings, like `--config.dtype=bfloat16` or `--config.local_crops_scale=(0.05,0.4)`."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--config.{assignment}: expected --config.key=value")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    node, _, leaf = key.rpartition(".")
    parent = config
    for part in filter(None, node.split(".")):
        parent = parent[part]
    if leaf not in parent:
        raise ValueError(f"--config.{key}: the config has no key {key!r}")
    parent[leaf] = value


def parse_configs(argv: list[str]) -> list[tuple[str, ml_collections.ConfigDict]]:
    """`--config spec [--config.key=value ...]` repeated -> [(label, config)]."""
    configs: list[tuple[str, ml_collections.ConfigDict]] = []
    args = iter(argv)
    for arg in args:
        if arg == "--config" or arg.startswith("--config="):
            spec = arg.partition("=")[2] or next(args, "")
            if not spec:
                raise ValueError("--config needs a recipe file, e.g. configs/vit_small16.py")
            configs.append((spec, load_config(spec)))
        elif arg.startswith("--config."):
            if not configs:
                raise ValueError(f"{arg} comes before any --config recipe")
            label, config = configs[-1]
            override_config(config, arg[len("--config.") :])
            configs[-1] = (f"{label} {arg[len('--config.') :]}", config)
        else:
            raise ValueError(f"Unknown argument {arg!r}")
    if not configs:
        raise ValueError("Give at least one --config recipe, e.g. --config configs/vit_small16.py")
    return configs


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """A global batch of noise with the crop shapes of `config` (uint8 levels when the step
    augments on device, else normal float32)."""
    rng = np.random.default_rng(seed)
    b, g, l = config.batch_size, config.data.global_crop_size, config.data.local_crop_size
    shapes = {"global": (b, 2, g, g, 3)}
    if config.local_crops_number:
        shapes["local"] = (b, config.local_crops_number, l, l, 3)
    if config.data.augment_on_device:  # uint8 crops, as the host sends them
        return {k: rng.integers(0, 256, s, dtype=np.uint8) for k, s in shapes.items()}
    return {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}


@dataclasses.dataclass
class StepReport:
    """What `benchmark step` measures for one config; FLOPs are for the whole (global) step."""

    compile_s: float
    step_s: float  # median
    cpu_s: float  # median process CPU time per step: the work done, whatever else runs
    images_per_s: float
    flops: float  # per step, all devices
    flops_per_s: float
    peak_flops: float  # all devices
    peak_source: str
    mfu: float
    peak_memory_bytes: float  # per device
    memory_source: str


def peak_memory(device: jax.Device, compiled) -> tuple[float, str]:
    """Peak bytes on one device: the allocator's high-water mark where the backend keeps one,
    else XLA's static estimate (arguments + outputs + temporaries - donated aliases)."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "memory_stats"
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return float(total), "memory_analysis"


def step_flops(compiled, num_devices: int) -> float:
    """FLOPs of one step from XLA's cost analysis (per device program) times the device count."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jaxlibs: one dict per program
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA's cost analysis gave no 'flops' for this backend")
    return float(cost["flops"]) * num_devices


def counted_program(config: ml_collections.ConfigDict, mesh, state, batch, compiled):
    """The compiled step whose cost analysis counts all of the step's FLOPs.

    XLA cannot see inside the CPU attention kernel's custom calls, so a step that has them is
    counted as compiled with the stock layers instead: the same maths, one compile more.
    """
    if attention_kernel.FORWARD not in compiled.as_text():
        return compiled
    with_xla = config.copy_and_resolve_references()
    with_xla.cpu_tuning = False
    return make_train_step(with_xla, mesh).lower(state, batch).compile()


@dataclasses.dataclass
class PreparedStep:
    """One config's compiled step, its state and its batch, ready to be timed."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    compiled: Any
    state: Any
    batch: dict[str, jax.Array]
    compile_s: float
    times: list[float] = dataclasses.field(default_factory=list)
    cpu_times: list[float] = dataclasses.field(default_factory=list)

    def run(self, timed: bool) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        if timed:
            self.times.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu_start)
        if not math.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"the step gave loss={float(metrics['loss'])}")


def prepare_step(config: ml_collections.ConfigDict) -> PreparedStep:
    """Compile the train step of `config` ahead of time, with its state and a random batch."""
    if config.steps_per_epoch <= 0:
        config.steps_per_epoch = 1000  # any value: the schedules only need one
    mesh = parallel.make_mesh(config.mesh)
    state = init_state(config, jax.random.key(config.seed), mesh)
    batch = parallel.to_global(random_batch(config), mesh)
    start = time.perf_counter()
    compiled = make_train_step(config, mesh).lower(state, batch).compile()
    return PreparedStep(config, mesh, compiled, state, batch, time.perf_counter() - start)


def report_step(step: PreparedStep) -> StepReport:
    """The figures of a prepared step's timed runs."""
    config, mesh = step.config, step.mesh
    device, n = mesh.devices.flat[0], mesh.size
    counted = counted_program(config, mesh, step.state, step.batch, step.compiled)
    flops = step_flops(counted, n)
    step_s = statistics.median(step.times)
    peak, peak_source = mesh_peak_flops(list(mesh.devices.flat), config.dtype)
    memory, memory_source = peak_memory(device, step.compiled)
    return StepReport(
        compile_s=step.compile_s,
        step_s=step_s,
        cpu_s=statistics.median(step.cpu_times),
        images_per_s=config.batch_size / step_s,
        flops=flops,
        flops_per_s=flops / step_s,
        peak_flops=peak,
        peak_source=peak_source,
        mfu=flops / step_s / peak,
        peak_memory_bytes=memory,
        memory_source=memory_source,
    )


def benchmark_steps(
    configs: list[ml_collections.ConfigDict], steps: int, warmup: int
) -> list[StepReport]:
    """Time the configs' steps in turn, one step of each per round, in one process: on a machine
    whose speed drifts, every config sees the same minutes (compare these, not separate runs)."""
    prepared = [prepare_step(config) for config in configs]
    for i in range(warmup + steps):
        for step in prepared:
            step.run(timed=i >= warmup)
    return [report_step(step) for step in prepared]


def benchmark_step(config: ml_collections.ConfigDict, steps: int, warmup: int) -> StepReport:
    """Compile the train step of `config` ahead of time and time `steps` runs on random data."""
    step = prepare_step(config)
    for i in range(warmup + steps):
        step.run(timed=i >= warmup)
    return report_step(step)


def _crops(config: ml_collections.ConfigDict) -> str:
    g, l, n = config.data.global_crop_size, config.data.local_crop_size, config.local_crops_number
    return f"2x{g}" + (f" + {n}x{l}" if n else "")


def run_step(args: argparse.Namespace, config_args: list[str]) -> None:
    configs = parse_configs(config_args)
    if all(c.cpu_tuning and host_memory.cpu_run(c.platform) for _, c in configs):
        host_memory.reuse_freed_memory()  # as the training job does, before JAX's threads start
    devices = jax.devices()
    order = "in turn, one step of each per round" if args.interleave else "one config after another"
    print(
        f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), JAX {jax.__version__}"
        f", median of {args.steps} steps after {args.warmup} warm-up, {order}\n"
    )
    print(
        "| config | model | batch, crops | dtype | compile s | step s | images/s | GFLOP/step "
        "| achieved TFLOP/s | peak TFLOP/s | MFU | peak memory GiB | CPU s/step |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if args.interleave:
        reports = benchmark_steps([c for _, c in configs], args.steps, args.warmup)
    else:
        reports = (benchmark_step(c, args.steps, args.warmup) for _, c in configs)
    rows = []
    for (label, config), r in zip(configs, reports, strict=True):
        model = f"{config.arch}/{config.patch_size}, K={config.out_dim}"
        print(
            f"| {label} | {model} | {config.batch_size}, {_crops(config)} | {config.dtype} "
            f"| {r.compile_s:.1f} | {r.step_s:.3f} | {r.images_per_s:.2f} | {r.flops / 1e9:.1f} "
            f"| {r.flops_per_s / 1e12:.3f} | {r.peak_flops / 1e12:.3f} ({r.peak_source}) "
            f"| {100 * r.mfu:.1f}% | {r.peak_memory_bytes / 2**30:.2f} ({r.memory_source}) "
            f"| {r.cpu_s:.2f} |",
            flush=True,
        )
        rows.append((label, r))
    if args.interleave and len(rows) > 1:
        first_label, first = rows[0]
        print(f"\nspeed against {first_label} (its median step time over each one's):")
        for label, r in rows[1:]:
            print(f"  {label}: {first.step_s / r.step_s:.3f}x")


# ---------------------------------------------------------------------------------------------
# The `compile` sub-command.


def run_compile(args: argparse.Namespace, config_args: list[str]) -> None:
    configs = parse_configs(config_args)
    target = targets.get_target(args.target)
    print(
        f"{target.chips} x {target.chip.name} ({target.name}, topology {target.topology}), "
        f"JAX {jax.__version__}, compiled on this host; figures per device\n"
    )
    print(aot.TABLE_HEADER, flush=True)
    reports = []
    for label, config in configs:
        reports.append(aot.compile_report(config, target, label))
        print(aot.table_row(reports[-1]), flush=True)
    for r in reports:
        print(
            f"\n{r.label}: peak {r.peak_bytes / 2**30:.2f} of {r.hbm_bytes / 2**30:.1f} GiB HBM "
            f"({100 * r.headroom:.0f}% free); {r.flops / 1e9:.4g} GFLOP per device "
            f"({r.cost_source}), {r.hbm_traffic / 1e9:.4g} GB of HBM traffic by our count "
            f"({r.bytes_accessed / 1e9:.4g} GB accessed by XLA's, which includes on-chip "
            f"memory): at least {1e3 * r.compute_s:.4g} ms compute, {1e3 * r.memory_s:.4g} ms "
            f"memory ({r.bound} bound)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dino_jax.benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser(
        "data",
        help="input pipeline: decode + multi-crop, images/s per core",
        description="Generated JPEGs, or with --config RECIPE [--config.key=value ...] that "
        "config's training pipeline on its own source.",
    )
    data.add_argument(
        "--images", type=int, default=200, help="generated JPEGs, or images of the --config source"
    )
    data.add_argument(
        "--local-crops", type=int, default=None, help="local crops per image (default 10)"
    )
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--repeats", type=int, default=5, help="passes per pipeline (median)")
    data.set_defaults(run=run_data)
    step = commands.add_parser(
        "step",
        help="the jitted train step on random data: time, FLOPs, MFU, memory",
        description="Repeat --config RECIPE [--config.key=value ...] for several configs.",
    )
    step.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    step.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    step.add_argument(
        "--interleave",
        action="store_true",
        help="compile every config first, then run one step of each in turn (A/B comparisons)",
    )
    step.set_defaults(run=run_step)
    compile_ = commands.add_parser(
        "compile",
        help="the train step compiled for a TPU slice or GPU node: memory, cost, collectives",
        description="Repeat --config RECIPE [--config.key=value ...] for several configs.",
    )
    compile_.add_argument("--target", required=True, choices=list(targets.TARGETS))
    compile_.set_defaults(run=run_compile)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("data", "step", "compile"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args, rest)


if __name__ == "__main__":
    main()
