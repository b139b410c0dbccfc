"""The linear probe (the reference's `eval_linear.py`, SPEC 5): a linear classifier trained on the
frozen features of a backbone.

Features of a ViT are the cls tokens of its last `n_last_blocks` blocks, each after the final
LayerNorm, concatenated (n = 4 for ViT-S); with `avgpool`, the last block's cls token and the mean
of its patch tokens, interleaved per channel as the reference stacks them (n = 1, ViT-B). A
ResNet's feature is its pooled output. The classifier (init N(0, 0.01), bias 0) trains with SGD,
momentum 0.9, no weight decay, lr = lr · batch / 256 on a per-epoch cosine to 0 (torch's
CosineAnnealingLR stepped once an epoch), on RandomResizedCrop + flip; it is tested on resized,
centre-cropped images. One difference from the reference: its training crops resize bilinearly,
ours bicubically.

    python -m dino_jax.eval.linear --checkpoint runs/demo/export --train synthetic:textures \\
        --resize 72 --crop 64 --epochs 10 --out_dir runs/demo/linear
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh
from tqdm import tqdm

from dino_jax import hub, parallel
from dino_jax.data.pipeline import labelled_train_dataset
from dino_jax.data.sources import balanced_subset
from dino_jax.eval import cli
from dino_jax.models import VisionTransformer

N_LAST_BLOCKS = 4
LR = 1e-3  # for a global batch of 256, scaled linearly
MOMENTUM = 0.9
INIT_STD = 0.01
# The reference reports top-5 only with at least this many classes.
TOP_K = 5

log = logging.getLogger("dino_jax")


@dataclasses.dataclass(frozen=True)
class ProbeFeatures:
    """The frozen features a probe reads, behind the `apply` that eval.features calls."""

    model: Any
    n_last_blocks: int = N_LAST_BLOCKS
    avgpool: bool = False

    def __post_init__(self):
        depth = getattr(self.model, "depth", None)  # ViTs only; a ResNet ignores these settings
        if depth is not None and not 1 <= self.n_last_blocks <= depth:
            raise ValueError(
                f"n_last_blocks={self.n_last_blocks} is not between 1 and the backbone's depth "
                f"{depth}: choose one in that range."
            )
        if self.avgpool and self.n_last_blocks != 1:
            raise ValueError(
                f"avgpool with n_last_blocks={self.n_last_blocks}: the reference's pooled features "
                "are the last block's cls and patch mean; use n_last_blocks=1 with avgpool."
            )

    def apply(self, variables: dict, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, 3] -> features [B, F] float32, no gradient to the backbone."""
        del train  # the backbone is always in inference mode
        if not isinstance(self.model, VisionTransformer):
            return jax.lax.stop_gradient(hub.extract_features(self.model, variables, images))
        layers = hub.intermediate_layers(self.model, variables, images, self.n_last_blocks)
        features = jnp.concatenate([x[:, 0] for x in layers], axis=-1)
        if self.avgpool:
            patch_mean = jnp.mean(layers[-1][:, 1:], axis=1)
            features = jnp.stack([features, patch_mean], axis=-1).reshape(len(features), -1)
        return jax.lax.stop_gradient(features)


def init_classifier(rng: jax.Array, dim: int, num_labels: int) -> dict[str, jax.Array]:
    """{"kernel": N(0, 0.01) [dim, num_labels], "bias": 0 [num_labels]}, float32."""
    kernel = INIT_STD * jax.random.normal(rng, (dim, num_labels), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_labels,), jnp.float32)}


def logits(params: dict, features: jax.Array) -> jax.Array:
    """features [B, F] -> [B, num_labels]."""
    hp = jax.lax.Precision.HIGHEST
    return jnp.dot(features, params["kernel"], precision=hp) + params["bias"]


def make_optimizer(
    lr: float, batch_size: int, epochs: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    """SGD, momentum 0.9, no weight decay; lr scaled by batch / 256, cosine to 0 by epoch."""
    cosine = optax.cosine_decay_schedule(lr * batch_size / 256.0, epochs)
    return optax.sgd(lambda step: cosine(step // steps_per_epoch), momentum=MOMENTUM)


def make_train_step(features: ProbeFeatures, optimizer: optax.GradientTransformation, mesh: Mesh):
    """jit(params, opt_state, variables, images, labels) -> (params, opt_state, loss): one SGD
    step on the mean cross-entropy of the batch, which is split over all devices."""

    def step(params, opt_state, variables, images, labels):
        x = features.apply(variables, images)

        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(rep, rep, rep, batch, batch),
        out_shardings=(rep, rep, rep),
        donate_argnums=(0, 1),
    )


def accuracy(params: dict, features: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Top-1 and top-5 (%) of the classifier; top-5 is None with fewer than 5 classes."""
    scores = np.asarray(logits(params, jnp.asarray(features)))
    own = np.take_along_axis(scores, labels[:, None], axis=1)
    rank = (scores > own).sum(axis=1)  # how many classes score above the true one
    top5 = float(100.0 * np.mean(rank < TOP_K)) if scores.shape[1] >= TOP_K else None
    return {"top1": float(100.0 * np.mean(rank == 0)), "top5": top5}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long and how fast the classifier trains."""

    epochs: int
    steps_per_epoch: int
    batch_size: int  # global
    lr: float = LR  # for a batch of 256
    val_every: int = 1  # epochs between tests on the validation features


def train_classifier(
    features: ProbeFeatures,
    variables: dict,
    batches: Iterator[dict[str, np.ndarray]],
    schedule: Schedule,
    num_labels: int,
    mesh: Mesh,
    *,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    rng: jax.Array | None = None,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Trains a classifier on `batches` ({"image", "label"}, this process's slices of global
    batches); returns its params (host arrays) and one record per validation.

    `val` holds the frozen validation features and labels: the backbone and the test transform
    are deterministic, so they are computed once, not once per epoch.
    """
    rng = jax.random.key(0) if rng is None else rng
    first = next(batches)
    dim = jax.eval_shape(features.apply, variables, first["image"]).shape[-1]
    params = jax.device_put(init_classifier(rng, dim, num_labels), parallel.replicated(mesh))
    optimizer = make_optimizer(
        schedule.lr, schedule.batch_size, schedule.epochs, schedule.steps_per_epoch
    )
    opt_state = optimizer.init(params)
    train_step = make_train_step(features, optimizer, mesh)
    stream, history = itertools.chain([first], batches), []
    show = jax.process_index() == 0
    with tqdm(total=schedule.epochs * schedule.steps_per_epoch, disable=not show) as bar:
        for epoch in range(1, schedule.epochs + 1):
            loss_sum = 0.0
            for _ in range(schedule.steps_per_epoch):
                example = next(stream)
                batch = parallel.to_global({k: example[k] for k in ("image", "label")}, mesh)
                params, opt_state, loss = train_step(
                    params, opt_state, variables, batch["image"], batch["label"]
                )
                loss_sum += loss  # stays on the device: no sync per step
                bar.update(1)
            record = {"epoch": epoch, "loss": float(loss_sum) / schedule.steps_per_epoch}
            if val is not None and (epoch == schedule.epochs or epoch % schedule.val_every == 0):
                record.update(accuracy(params, *val))
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if v is not None})
            history.append(record)
    return jax.device_get(params), history


def save_classifier(path: str, params: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """The classifier as an .npz of `kernel` [F, C] and `bias` [C], plus `meta` as 0-d arrays."""
    if jax.process_index() != 0:
        return
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in params.items()}, **meta)
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    log.info("Wrote %s", out)


def load_classifier(path: str) -> dict[str, np.ndarray]:
    """{"kernel", "bias"} of a classifier written by `save_classifier`."""
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
        return {k: data[k] for k in ("kernel", "bias")}


# ---------------------------------------------------------------------------------------------
# The command.


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
    config.seed = args.seed
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
