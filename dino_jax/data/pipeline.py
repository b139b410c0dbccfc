"""grain pipelines: the multi-crop training stream and the ordered evaluation stream.

Both are defined over the GLOBAL sequence of examples: global batch k holds examples
[k B, (k + 1) B) of that sequence, and process p builds only its slice [p B/P, (p + 1) B/P) of
each batch. So every host reads only its share, and the global batch is the same whatever the
number of processes or workers. Every random draw comes from grain's per-element RNG (seed, index),
which makes batches independent of the worker count and lets an iterator resume exactly.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from dino_jax.core.augment_laws import FLIP_P, IMAGENET_MEAN, IMAGENET_STD, MultiCropConfig
from dino_jax.data.augment import (
    CropParams,
    multicrop,
    multicrop_uint8,
    render_crop,
    sample_crop_boxes,
)
from dino_jax.data.masking import BatchMasks
from dino_jax.data.sources import DecodedSource, make_source

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


def multicrop_config(config: ml_collections.ConfigDict) -> MultiCropConfig:
    """The augmentation settings of a run config (main_dino.py: DataAugmentationDINO)."""
    return MultiCropConfig(
        global_size=config.crops.global_crops_size,
        local_size=config.crops.local_crops_size,
        global_scale=tuple(config.crops.global_crops_scale),
        local_scale=tuple(config.crops.local_crops_scale),
        local_crops_number=config.crops.local_crops_number,
        blur_sigma=tuple(config.data.blur_sigma),
    )


class MultiCropTransform(grain.transforms.RandomMap):
    """Record -> {"global": f32 [2, G, G, 3], "local": f32 [n, L, L, 3], "label": i32} using the
    element's own RNG; with `on_device`, uint8 crops that the train step augments further."""

    def __init__(self, crops: MultiCropConfig, on_device: bool = False):
        self.crops = crops
        self.render = multicrop_uint8 if on_device else multicrop

    def random_map(
        self, element: dict[str, Any], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        return {**self.render(element["image"], rng, self.crops), "label": element["label"]}


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    return process_index, process_count


def _local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by {process_count} processes: use a "
            f"multiple of {process_count}."
        )
    return batch_size // process_count


def train_source(config: ml_collections.ConfigDict) -> DecodedSource:
    """The decoded training source of `config.data`."""
    source = make_source(config.data.source, config.data.split, config.data.data_dir)
    # JPEGs may decode at a reduced scale as long as a global crop keeps its resolution.
    return DecodedSource(source, min_side=config.crops.global_crops_size)


def batches_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """Full global batches in one pass over the data (the reference drops the remainder)."""
    steps = num_examples // config.train.batch_size
    if steps == 0:
        raise ValueError(
            f"{config.data.source} has {num_examples} images, fewer than one batch of "
            f"batch_size={config.train.batch_size}: lower batch_size or add data."
        )
    return steps


def train_dataset(
    config: ml_collections.ConfigDict,
    source=None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The endless multi-crop stream of this process's slices of the global batches.

    Each epoch is a fresh shuffle of the data truncated to whole batches, as the reference's
    drop_last. Elements: {"global": f32 [b, 2, G, G, 3], "local": f32 [b, n, L, L, 3],
    "label": i32 [b]} with b = B / P (labels are -1 where the source has none), and DINOv2's
    "masks": bool [b, 2, N] (`masking.BatchMasks`).
    """
    process_index, process_count = _process_slice(process_index, process_count)
    local_batch = _local_batch_size(config.train.batch_size, process_count)
    source = train_source(config) if source is None else source
    epoch_size = batches_per_epoch(config, len(source)) * config.train.batch_size
    ds = (
        grain.MapDataset.source(source)
        .seed(config.train.seed)
        .shuffle()[:epoch_size]
        .repeat()  # reseeds, hence reshuffles, every epoch
        .random_map(MultiCropTransform(multicrop_config(config), config.data.augment_on_device))
        .batch(local_batch, drop_remainder=True)[process_index::process_count]
    )
    if config.method == "dinov2":
        ds = ds.map_with_index(BatchMasks(config, process_index, process_count))
    return _to_iter(ds, config)


class RandomCropFlip(grain.transforms.RandomMap):
    """Record -> {"image": f32 [S, S, 3], "label": i32}: RandomResizedCrop (area `scale`, bicubic),
    horizontal flip p 0.5, normalisation; the linear probe's training augmentation."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0)):
        self.size, self.scale = size, scale

    def random_map(
        self, element: dict[str, Any], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        image = element["image"]
        box = sample_crop_boxes(rng, image.shape[0], image.shape[1], self.scale, 1)[0]
        crop = CropParams(self.size, tuple(int(v) for v in box), flip=bool(rng.random() < FLIP_P))
        return {"image": render_crop(image, crop, MEAN, STD), "label": np.int32(element["label"])}


def labelled_train_dataset(
    config: ml_collections.ConfigDict,
    source,
    batch_size: int,
    crop_size: int,
    *,
    limit: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The endless stream of randomly cropped and flipped labelled images for a supervised probe:
    the source (or its first `limit` images) shuffled afresh every epoch and truncated to whole
    batches of `batch_size` (global), as the reference's drop_last.

    Elements: {"image": f32 [b, S, S, 3], "label": i32 [b]}, this process's slice b = B / P.
    """
    process_index, process_count = _process_slice(process_index, process_count)
    local_batch = _local_batch_size(batch_size, process_count)
    size = len(source) if limit is None else min(limit, len(source))
    epoch_size = size // batch_size * batch_size
    if epoch_size == 0:
        raise ValueError(
            f"{size} training images are fewer than one batch of batch_size={batch_size}: "
            "lower batch_size or add data."
        )
    ds = (
        grain.MapDataset.source(source)[:size]
        .seed(config.train.seed)
        .shuffle()[:epoch_size]
        .repeat()
        .random_map(RandomCropFlip(crop_size))
        .batch(local_batch, drop_remainder=True)[process_index::process_count]
    )
    return _to_iter(ds, config)


def _to_iter(ds: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
    # Elements are whole batches: a few in flight per process keep the device fed without
    # holding gigabytes of decoded crops.
    read = grain.ReadOptions(
        num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch_batches
    )
    it = ds.to_iter_dataset(read)
    if config.data.num_workers > 0:
        options = grain.MultiprocessingOptions(num_workers=config.data.num_workers)
        it = it.mp_prefetch(options, worker_init_fn=_single_threaded_opencv)
    return it


def _single_threaded_opencv(worker_index: int, worker_count: int) -> None:
    """One OpenCV thread per worker process: the workers already use every core."""
    del worker_index, worker_count
    cv2.setNumThreads(1)


def resize_center_crop(image: np.ndarray, resize: int, crop: int, resample: int) -> np.ndarray:
    """torchvision Resize(resize) (shorter side) + CenterCrop(crop) on a [H, W, C] uint8 array."""
    img = Image.fromarray(image)
    w, h = img.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    img = img.resize(size, resample)
    w, h = img.size
    top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)
    return np.asarray(img.crop((left, top, left + crop, top + crop)))


class EvalTransform(grain.transforms.Map):
    """Resize 256 (bicubic) + centre crop 224 + normalise; a foreground mask follows (nearest)."""

    def __init__(self, source, size: int, resize: int, crop: int):
        self.source, self.size, self.resize, self.crop = source, size, resize, crop
        self.has_mask = "mask" in source[0]
        self.mean = np.asarray(MEAN, np.float32) * 255.0
        self.scale = 1.0 / (np.asarray(STD, np.float32) * 255.0)

    def map(self, index: int) -> dict[str, np.ndarray]:
        if index >= self.size:  # padding of the last batch
            return self._padding()
        record = self.source[index]
        image = resize_center_crop(record["image"], self.resize, self.crop, Image.BICUBIC)
        out = {
            "image": (image.astype(np.float32) - self.mean) * self.scale,
            "label": np.int32(record["label"]),
            "valid": np.bool_(True),
        }
        if "mask" in record:
            out["mask"] = resize_center_crop(record["mask"], self.resize, self.crop, Image.NEAREST)
        return out

    def _padding(self) -> dict[str, np.ndarray]:
        out = {
            "image": np.zeros((self.crop, self.crop, 3), np.float32),
            "label": np.int32(-1),
            "valid": np.bool_(False),
        }
        if self.has_mask:
            out["mask"] = np.zeros((self.crop, self.crop), np.uint8)
        return out


def eval_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    batch_size: int,
    source=None,
    *,
    limit: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Every example of `split` (or its first `limit`) once, in order: this process's slices of
    global batches.

    Elements: {"image": f32 [b, S, S, 3], "label": i32 [b], "valid": bool [b]} (+ "mask" when the
    source has masks); the last global batch is padded with valid=False.
    """
    process_index, process_count = _process_slice(process_index, process_count)
    local_batch = _local_batch_size(batch_size, process_count)
    if source is None:
        source = DecodedSource(make_source(config.data.source, split, config.data.data_dir))
    size = len(source) if limit is None else min(limit, len(source))
    padded = math.ceil(size / batch_size) * batch_size
    data = config.data
    transform = EvalTransform(source, size, data.eval_resize_size, data.eval_crop_size)
    ds = (
        grain.MapDataset.range(padded)
        .map(transform)
        .batch(local_batch, drop_remainder=True)[process_index::process_count]
    )
    return _to_iter(ds, config)
