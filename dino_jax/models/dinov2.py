"""DINOv2's student and teacher networks: the backbone, the DINO head and, with a separate
head, the iBOT head (dinov2/train/ssl_meta_arch.py: SSLMetaArch's `student` and `teacher`
ModuleDicts, whose names the parameters keep)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DinoV2Networks(nn.Module):
    """backbone + dino_head (+ ibot_head) over DINOv2's multi-crop batch.

    The heads run on the backbone's normed tokens: the cls tokens of every crop and the patch
    tokens of the global crops that `patch_index` selects (the masked ones, gathered per rank
    into a buffer of fixed size). Crops stay image-major, [B, n, ...].
    """

    backbone: nn.Module
    dino_head: nn.Module
    ibot_head: nn.Module | None = None

    def __call__(
        self,
        global_crops: jax.Array,
        local_crops: jax.Array | None = None,
        masks: jax.Array | None = None,
        patch_index: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        """global_crops [B, 2, H, W, 3], local_crops [B, n, h, w, 3] or None, masks bool
        [B, 2, N] (patches the student sees as the mask token) or None, patch_index int
        [R, U] (for each of R ranks, U indices into its global crops' patch tokens laid out
        crop-major, [2, B/R, N] flattened) or None ->

        {"global_cls": [B, 2, D] backbone cls tokens, "global_logits": [B, 2, K],
        "local_logits": [B, n, K] (with local crops), "patch_logits": [R, U, K'] (with
        patch_index)}.
        """
        b = global_crops.shape[0]
        flat = global_crops.reshape(b * 2, *global_crops.shape[2:])
        flat_masks = None if masks is None else masks.reshape(b * 2, -1)
        features = self.backbone.forward_features(flat, flat_masks, train=train)
        cls = features["x_norm_clstoken"].reshape(b, 2, -1)
        out = {"global_cls": cls, "global_logits": self.dino_head(cls, train=train)}
        if local_crops is not None and local_crops.shape[1] > 0:
            n = local_crops.shape[1]
            local = local_crops.reshape(b * n, *local_crops.shape[2:])
            local_cls = self.backbone(local, train=train).reshape(b, n, -1)
            out["local_logits"] = self.dino_head(local_cls, train=train)
        if patch_index is not None:
            patches = features["x_norm_patchtokens"]
            ranks = patch_index.shape[0]
            # [B, 2, N, D] -> per rank [2, B/R, N, D] flattened, the official's crop-major order.
            patches = patches.reshape(ranks, b // ranks, 2, *patches.shape[1:])
            patches = jnp.swapaxes(patches, 1, 2).reshape(ranks, -1, patches.shape[-1])
            selected = jnp.take_along_axis(patches, patch_index[..., None], axis=1)
            head = self.dino_head if self.ibot_head is None else self.ibot_head
            out["patch_logits"] = head(selected, train=train)
        return out
