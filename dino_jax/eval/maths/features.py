"""Sharded feature extraction: a backbone over an evaluation stream, gathered on every host."""

from __future__ import annotations

from collections.abc import Iterable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from dino_jax.core import parallel


def make_feature_fn(backbone: nn.Module, mesh: Mesh):
    """jit(variables, images [B, H, W, 3]) -> features [B, D], batch split over all devices.

    The variables keep the sharding they come with (replicated, or split over fsdp as training
    leaves them): XLA gathers what each device needs."""

    def features(variables, images):
        return backbone.apply(variables, images, train=False)

    return jax.jit(
        features,
        in_shardings=(None, parallel.batch_sharding(mesh)),
        out_shardings=parallel.batch_sharding(mesh),
    )


def extract_features(
    backbone: nn.Module,
    variables: dict,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    *,
    num_batches: int | None = None,
    desc: str = "features",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, labels [N]) of the valid examples, in dataset order.

    `batches` yields this process's slices {"image", "label", "valid"} (see data.eval_dataset).
    """
    feature_fn = make_feature_fn(backbone, mesh)
    features, labels = [], []
    show = progress and jax.process_index() == 0
    for i, batch in enumerate(tqdm(batches, total=num_batches, desc=desc, disable=not show)):
        if num_batches is not None and i >= num_batches:
            break
        glob = parallel.to_global(
            {"image": batch["image"], "label": batch["label"], "valid": batch["valid"]}, mesh
        )
        out = feature_fn(variables, glob["image"])
        out, label, valid = multihost_utils.process_allgather(
            (out, glob["label"], glob["valid"]), tiled=True
        )
        features.append(np.asarray(out, np.float32)[valid])
        labels.append(np.asarray(label)[valid])
    return np.concatenate(features), np.concatenate(labels)
