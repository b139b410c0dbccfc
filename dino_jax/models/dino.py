"""The multi-crop network: one backbone pass per crop resolution, one head pass over all crops."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MultiCrop(nn.Module):
    """backbone + head over a multi-crop batch (the reference's `MultiCropWrapper`).

    Crops of one resolution go through the backbone together, all features through the head once.
    Crops are merged image-major ([B, n] -> [B * n]) so that the sharded batch axis stays sharded
    without any data movement; the output is crop-major like the reference's, as [n_crops, B, K]
    (its [n_crops * B, K] with the crop axis kept apart).
    """

    backbone: nn.Module
    head: nn.Module

    def __call__(
        self,
        global_crops: jax.Array,
        local_crops: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """global_crops [B, 2, H, W, 3], local_crops [B, n, h, w, 3] or None -> [n_crops, B, K]."""
        groups = [global_crops]
        if local_crops is not None and local_crops.shape[1] > 0:
            groups.append(local_crops)
        features = [self._backbone_features(crops, train) for crops in groups]
        logits = self.head(jnp.concatenate(features, axis=1), train=train)  # [B, n_crops, K]
        return jnp.swapaxes(logits, 0, 1)

    def _backbone_features(self, crops: jax.Array, train: bool) -> jax.Array:
        """[B, n, H, W, 3] -> [B, n, D] with one backbone call."""
        b, n = crops.shape[:2]
        features = self.backbone(crops.reshape((b * n, *crops.shape[2:])), train=train)
        return features.reshape(b, n, -1)
