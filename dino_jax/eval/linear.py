"""The linear probe as a command (the reference's `eval_linear.py`): features of a checkpoint's
backbone, then a linear classifier trained on them (eval/maths/linear_probe.py).

    python -m dino_jax.eval.linear --checkpoint runs/demo/export --train synthetic:textures \\
        --resize 72 --crop 64 --epochs 10 --out_dir runs/demo/linear
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from dino_jax.core import parallel
from dino_jax.data.pipeline import labelled_train_dataset
from dino_jax.data.sources import balanced_subset
from dino_jax.eval import cli
from dino_jax.eval.maths.linear_probe import (
    LR,
    N_LAST_BLOCKS,
    ProbeFeatures,
    Schedule,
    save_classifier,
    train_classifier,
)

log = logging.getLogger("dino_jax")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.eval.linear",
        description="Linear probe of a backbone's frozen features (the reference's eval_linear).",
    )
    cli.add_checkpoint_args(parser)
    cli.add_distributed_args(parser)
    cli.add_data_args(parser)
    parser.add_argument(
        "--n_last_blocks",
        type=int,
        default=None,
        help="cls tokens of the last n blocks (4; 1 with --avgpool).",
    )
    parser.add_argument(
        "--avgpool", action="store_true", help="Last cls + mean of the patch tokens (ViT-B)."
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=LR, help="For a batch of 256; scaled.")
    parser.add_argument("--val_every", type=int, default=1, help="Epochs between tests.")
    parser.add_argument("--num_labels", type=int, default=0, help="Classes (0: from the data).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default=None, help="classifier.npz and results.json here.")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.val_every < 1:
        parser.error(f"--epochs={args.epochs} and --val_every={args.val_every} must be >= 1.")
    return args


def num_labels(source, labels: np.ndarray) -> int:
    """Classes of a source: its `num_classes`, tfds's label feature, else the largest label + 1."""
    raw = source.source
    if getattr(raw, "num_classes", None):
        return int(raw.num_classes)
    info = getattr(raw, "dataset_info", None)
    if info is not None and "label" in info.features:
        return int(info.features["label"].num_classes)
    return int(labels.max()) + 1


def validation_features(args, features: ProbeFeatures, variables: dict, mesh: Mesh, source):
    """(features [N, F], labels [N]) of the resized, centre-cropped validation images."""
    spec = args.val or args.train
    config = cli.data_config(spec, args.data_dir, args.resize, args.crop, args.num_workers)
    return cli.labelled_features(
        features,
        variables,
        config,
        args.val_split,
        source,
        batch_size=args.batch_size,
        limit=args.val_examples,
        mesh=mesh,
        desc="validation features",
    )


def training_stream(args, source) -> tuple[Iterator[dict[str, np.ndarray]], int]:
    """(endless cropped and flipped training batches, number of training images): all of
    `source`, or a class-balanced sample of --train_examples."""
    config = cli.data_config(args.train, args.data_dir, args.resize, args.crop, args.num_workers)
    config.train.seed = args.seed
    source = balanced_subset(source, args.train_examples)
    data = labelled_train_dataset(config, source, args.batch_size, args.crop)
    return iter(data), len(source)


def evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Validation features, then the classifier's training: (results, classifier params)."""
    mesh = parallel.make_mesh((("data", -1),))
    cli.check_batch_size(args.batch_size, mesh)
    train_source = cli.labelled_source(args.train, args.train_split, args.data_dir)
    val_spec = args.val or args.train
    val_source = cli.labelled_source(val_spec, args.val_split, args.data_dir)
    cli.check_disjoint(
        (args.train, args.train_split, train_source), (val_spec, args.val_split, val_source)
    )
    model, variables = cli.load_backbone(args.checkpoint, mesh, args.arch, args.patch_size)
    n_last = args.n_last_blocks or (1 if args.avgpool else N_LAST_BLOCKS)
    features = ProbeFeatures(model, n_last, args.avgpool)
    val = validation_features(args, features, variables, mesh, val_source)
    batches, size = training_stream(args, train_source)
    labels = args.num_labels or num_labels(train_source, val[1])
    schedule = Schedule(
        args.epochs, size // args.batch_size, args.batch_size, args.lr, args.val_every
    )
    params, history = train_classifier(
        features, variables, batches, schedule, labels, mesh, val=val, rng=jax.random.key(args.seed)
    )
    results = {
        "checkpoint": str(args.checkpoint),
        "features": {
            "n_last_blocks": n_last,
            "avgpool": args.avgpool,
            "dim": params["kernel"].shape[0],
        },
        "train": {"source": args.train, "split": args.train_split, "examples": size},
        "val": {"source": args.val or args.train, "split": args.val_split, "examples": len(val[0])},
        "schedule": dataclasses.asdict(schedule),
        "num_labels": labels,
        **{k: history[-1][k] for k in ("top1", "top5")},
        "best_top1": max(r["top1"] for r in history if "top1" in r),
        "history": history,
    }
    return results, params


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cli.initialize_distributed(args)
    cli.setup_logging()
    try:
        results, params = evaluate(args)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)  # bad paths and settings: the message, not a traceback
        sys.exit(1)
    top5 = "n/a" if results["top5"] is None else f"{results['top5']:.2f}%"
    print(
        f"Linear probe on {results['val']['examples']} images: top-1 {results['top1']:.2f}%  "
        f"top-5 {top5}  (best top-1 {results['best_top1']:.2f}%)"
    )
    if args.out_dir:
        out = epath.Path(args.out_dir)
        save_classifier(str(out / "classifier.npz"), params, {"num_labels": results["num_labels"]})
        cli.write_json(str(out / "results.json"), results)


if __name__ == "__main__":
    main()
