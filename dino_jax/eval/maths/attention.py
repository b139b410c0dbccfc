"""Self-attention maps of a ViT as segmentations (the reference's `visualize_attention.py`), and
their Jaccard index against ground-truth foreground masks.

A map is the last block's attention of the cls query to the patch tokens, one per head. Its mask
keeps the patches that together hold `threshold` (60% in the paper) of the head's attention mass,
the largest first, exactly as the reference thresholds; maps and masks are upsampled to pixels by
repeating each patch patch_size times along both axes (torch's nearest interpolation by an integer
factor).

Scores, each the Jaccard |pred ∩ truth| / |pred ∪ truth| averaged over images:
- `head_<i>`: the mask of head i;
- `best_head`: the head with the highest average (chosen once for the whole set, not per image);
- `mean_of_heads`: the per-head scores averaged over the heads;
- `mean_map` (the headline figure): the mask of the heads' average map, thresholded the same way,
  one mask per image as a user of the maps would draw it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from dino_jax.core import parallel
from dino_jax.interop import hub

THRESHOLD = 0.6


def mass_mask(maps: jax.Array, threshold: float = THRESHOLD) -> jax.Array:
    """[..., N] non-negative maps -> bool [..., N]: the largest entries holding `threshold` of each
    map's mass.

    The reference's rule: sort ascending, normalise, keep the entries whose cumulative sum exceeds
    1 - threshold. The entry that crosses the line is kept, so the kept mass is >= threshold.
    """
    order = jnp.argsort(maps, axis=-1, stable=True)
    ranked = jnp.take_along_axis(maps, order, axis=-1)
    cumulative = jnp.cumsum(ranked / jnp.sum(ranked, axis=-1, keepdims=True), axis=-1)
    keep = cumulative > 1.0 - threshold
    return jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)


def upsample(maps: jax.Array, patch_size: int) -> jax.Array:
    """[..., h, w] per-patch values -> [..., h p, w p]: each patch's value over its pixels."""
    return jnp.repeat(jnp.repeat(maps, patch_size, axis=-2), patch_size, axis=-1)


def jaccard(pred: jax.Array, truth: jax.Array) -> jax.Array:
    """Jaccard index of boolean masks [..., H, W] -> [...]; 1 where both are empty."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    inter = jnp.sum(pred & truth, axis=(-2, -1))
    union = jnp.sum(pred | truth, axis=(-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def head_masks(maps: jax.Array, threshold: float = THRESHOLD) -> jax.Array:
    """Attention maps [..., heads, h, w] -> their masks [..., heads + 1, h, w] (bool): one per head,
    then the mask of the heads' mean map."""
    maps = jnp.concatenate([maps, jnp.mean(maps, axis=-3, keepdims=True)], axis=-3)
    flat = maps.reshape(*maps.shape[:-2], -1)
    return mass_mask(flat, threshold).reshape(maps.shape)


def mask_scores(
    maps: jax.Array, truth: jax.Array, patch_size: int, threshold: float = THRESHOLD
) -> jax.Array:
    """Maps [B, heads, h, w] and true masks [B, h p, w p] -> Jaccard [B, heads + 1] of each head's
    mask, then of the mean map's mask."""
    masks = upsample(head_masks(maps, threshold), patch_size)
    return jaccard(masks, truth[:, None])


@functools.lru_cache(maxsize=8)
def make_score_fn(model: Any, mesh: Mesh, threshold: float = THRESHOLD):
    """jit(variables, images [B, H, W, 3], masks [B, H, W]) -> Jaccard [B, heads + 1], the batch
    split over all devices, the variables as sharded as they come (replicated, or over fsdp); one
    per model, mesh and threshold, so that a monitor scoring every N steps compiles it once."""

    def scores(variables, images, masks):
        maps = hub.attention_maps(model, variables, images)
        return mask_scores(maps, masks, model.patch_size, threshold)

    batch = parallel.batch_sharding(mesh)
    return jax.jit(scores, in_shardings=(None, batch, batch), out_shardings=batch)


def attention_jaccard(
    model: Any,
    variables: dict,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    *,
    threshold: float = THRESHOLD,
    num_batches: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """The scores of the module docstring over the valid examples of `batches`.

    `batches` yields this process's slices {"image", "mask", "valid"} (data.eval_dataset of a
    source with masks, e.g. synthetic:shapes); image sides must be multiples of the patch size.
    """
    score_fn = make_score_fn(model, mesh, threshold)
    per_image = []
    show = progress and jax.process_index() == 0
    for i, batch in enumerate(tqdm(batches, total=num_batches, desc="Jaccard", disable=not show)):
        if num_batches is not None and i >= num_batches:
            break
        if "mask" not in batch:
            raise ValueError(
                "the data has no foreground masks: use synthetic:objects or synthetic:shapes"
            )
        glob = parallel.to_global({k: batch[k] for k in ("image", "mask", "valid")}, mesh)
        out = score_fn(variables, glob["image"], glob["mask"])
        out, valid = multihost_utils.process_allgather((out, glob["valid"]), tiled=True)
        per_image.append(np.asarray(out, np.float64)[np.asarray(valid)])
    return summarize(np.concatenate(per_image))


def summarize(per_image: np.ndarray) -> dict[str, float]:
    """Jaccard [N, heads + 1] per image (heads, then the mean map) -> the named averages."""
    mean = per_image.mean(axis=0)
    heads = mean[:-1]
    return {
        "mean_map": float(mean[-1]),
        "best_head": float(heads.max()),
        "best_head_index": int(heads.argmax()),
        "mean_of_heads": float(heads.mean()),
        **{f"head_{i}": float(v) for i, v in enumerate(heads)},
        "examples": len(per_image),
    }
