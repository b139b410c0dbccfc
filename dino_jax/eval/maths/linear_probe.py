"""The linear probe (the reference's `eval_linear.py`): a linear classifier trained on the frozen
features of a backbone.

Features of a ViT are the cls tokens of its last `n_last_blocks` blocks, each after the final
LayerNorm, concatenated (n = 4 for ViT-S); with `avgpool`, the last block's cls token and the mean
of its patch tokens, interleaved per channel as the reference stacks them (n = 1, ViT-B). A
ResNet's feature is its pooled output. The classifier (init N(0, 0.01), bias 0) trains with SGD,
momentum 0.9, no weight decay, lr = lr · batch / 256 on a per-epoch cosine to 0 (torch's
CosineAnnealingLR stepped once an epoch), on RandomResizedCrop + flip; it is tested on resized,
centre-cropped images. One difference from the reference: its training crops resize bilinearly,
ours bicubically.

The command is `python -m dino_jax.eval.linear` (eval/linear.py).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh
from tqdm import tqdm

from dino_jax.core import parallel
from dino_jax.interop import hub
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
            patches = layers[-1][:, 1 + self.model.num_register_tokens :]  # no cls, registers
            patch_mean = jnp.mean(patches, axis=1)
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
