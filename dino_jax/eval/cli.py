"""What the evaluation commands share: a checkpoint's backbone on the device mesh, the settings
of the evaluation data, labelled sources and their features, and the JSON of results.

A data source is named as in training (`synthetic:textures`, `synthetic:shapes`, `folder:PATH`,
`tfds:NAME`) and a split separately (`train`, `val`, `validation`...); a folder holding `train/`
and `val/` has its splits there, any other folder is one split (the name is unused). N examples
of a split are a seeded, class-balanced sample of the whole split (data.sources.sample_indices).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from jax.sharding import Mesh

from dino_jax.core import parallel
from dino_jax.core.config import base_config
from dino_jax.data.pipeline import eval_dataset
from dino_jax.data.sources import DecodedSource, balanced_subset, make_source, shared_examples
from dino_jax.eval.maths.features import extract_features
from dino_jax.interop.hub import load_pretrained

log = logging.getLogger("dino_jax")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --arch, --patch_size: the backbone to evaluate."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="A dino_jax export dir (WORKDIR/export), a training workdir, or an official .pth.",
    )
    parser.add_argument(
        "--arch", default=None, help="Check (or, for a .pth, choose) the architecture."
    )
    parser.add_argument("--patch_size", type=int, default=None, help="Likewise the patch size.")


def add_data_args(parser: argparse.ArgumentParser, resize: int = 256, crop: int = 224) -> None:
    """--train/--val sources with their splits, --data_dir, sizes, batch and workers."""
    parser.add_argument("--train", required=True, help="Labelled source of the training images.")
    parser.add_argument("--train_split", default="train", help="Split of --train.")
    parser.add_argument("--val", default=None, help="Source of the test images (default: --train).")
    parser.add_argument("--val_split", default="val", help="Split of --val (ImageNet: validation).")
    parser.add_argument("--data_dir", default="", help="tfds data_dir of tfds: sources.")
    parser.add_argument(
        "--train_examples", type=int, default=0, help="A class-balanced sample of N (0: all)."
    )
    parser.add_argument(
        "--val_examples", type=int, default=0, help="A class-balanced sample of N (0: all)."
    )
    parser.add_argument("--resize", type=int, default=resize, help="Shorter side before the crop.")
    parser.add_argument("--crop", type=int, default=crop, help="Centre crop (evaluation images).")
    parser.add_argument("--batch_size", type=int, default=256, help="Global batch (all devices).")
    parser.add_argument("--num_workers", type=int, default=0, help="grain worker processes.")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator_address, --num_processes, --process_id: a multi-process run, as in training
    (TPU pods, SLURM and JAX_COORDINATOR_ADDRESS clusters are found without them)."""
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0.")
    parser.add_argument("--num_processes", type=int, default=None, help="Processes in the run.")
    parser.add_argument("--process_id", type=int, default=None, help="This process's index.")


def initialize_distributed(args: argparse.Namespace) -> None:
    """Connect this process to the others of the run (a no-op for a single process)."""
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)


def setup_logging() -> None:
    """Our INFO messages on the console, the libraries' only when they warn."""
    if not log.handlers:  # once per process, however many commands it runs
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)


def load_backbone(
    checkpoint: str, mesh: Mesh, arch: str | None = None, patch_size: int | None = None
) -> tuple[Any, dict]:
    """(backbone module, its variables replicated on every device of `mesh`)."""
    model, variables = load_pretrained(checkpoint, arch=arch, patch_size=patch_size)
    # Once on the devices: a jitted call given host arrays would copy them at every batch.
    return model, jax.device_put(variables, parallel.replicated(mesh))


def data_config(
    source: str, data_dir: str, resize: int, crop: int, num_workers: int = 0
) -> ml_collections.ConfigDict:
    """A run config carrying only what the evaluation streams read: source, sizes, workers."""
    if crop > resize:
        raise ValueError(f"crop={crop} is larger than resize={resize}: use crop <= resize.")
    config = base_config()
    config.data.source, config.data.data_dir = source, data_dir
    config.data.eval_resize_size, config.data.eval_crop_size = resize, crop
    config.data.num_workers = num_workers
    if num_workers > 0:
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    return config


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size <= 0 or batch_size % mesh.size:
        raise ValueError(
            f"batch_size={batch_size} is not a positive multiple of the {mesh.size} devices: "
            f"use a multiple of {mesh.size}."
        )


def labelled_source(spec: str, split: str, data_dir: str = "") -> DecodedSource:
    """The decoded source `spec`/`split`, refused if its first image has no label."""
    source = DecodedSource(make_source(spec, split, data_dir))
    if source[0]["label"] < 0:
        raise ValueError(
            f"{spec} has no labels: give a folder class sub-folders (one per class), or use a "
            "labelled tfds dataset."
        )
    return source


def num_examples(source, limit: int) -> int:
    """How many examples of `source` are used: all, or `limit` when limit > 0."""
    return len(source) if limit <= 0 else min(limit, len(source))


def check_disjoint(train: tuple[str, str, DecodedSource], val: tuple[str, str, DecodedSource]):
    """Refuses test images that are also training images: (spec, split, source) of each."""
    why = shared_examples(train[2], val[2])
    if why is not None:
        raise ValueError(
            f"The test images ({val[0]}, split {val[1]!r}) would be training images "
            f"({train[0]}, split {train[1]!r}): {why}. Pass held-out images with --val (e.g. "
            "--train folder:ROOT/train --val folder:ROOT/val), or another --val_split."
        )


def labelled_features(
    model: Any,
    variables: dict,
    config: ml_collections.ConfigDict,
    split: str,
    source: DecodedSource,
    *,
    batch_size: int,
    limit: int,
    mesh: Mesh,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], labels [N]) of a class-balanced sample of `limit` images (0: all),
    resized and cropped."""
    source = balanced_subset(source, limit)
    data = eval_dataset(config, split, batch_size, source)
    return extract_features(
        model, variables, data, mesh, num_batches=math.ceil(len(source) / batch_size), desc=desc
    )


def write_json(path: str, results: dict[str, Any]) -> None:
    """Writes `results` as indented JSON to `path` (local or gs://), from process 0 only."""
    if jax.process_index() != 0:
        return
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    log.info("Wrote %s", out)
