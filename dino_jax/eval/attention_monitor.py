"""The attention monitor: how well the teacher's self-attention segments held-out scenes during
training (the Jaccard index of the paper's Table 4), and the figure of its maps (its Figure 1);
beside it, how well a linear probe of its patch features segments them (eval/maths/
segmentation.py), the dense side that DINOv2's iBOT objective trains."""

from __future__ import annotations

import logging
import math

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from matplotlib.figure import Figure

from dino_jax.core import parallel
from dino_jax.data.pipeline import MEAN, STD, eval_dataset
from dino_jax.data.sources import DecodedSource, Subset, make_source, sample_indices
from dino_jax.eval import figures
from dino_jax.eval.maths import attention, segmentation
from dino_jax.interop import hub
from dino_jax.models import VisionTransformer, build_dino

log = logging.getLogger(__name__)


class AttentionMonitor:
    """The Jaccard index of the teacher's 60%-mass attention masks (eval/maths/attention.py, the
    reference's visualize_attention.py) against the true foreground masks of
    eval.jaccard_examples scenes of data.eval_split of data.eval_source (default data.source): a
    seeded, class-balanced sample, the same in every run, resized and centre-cropped as in
    evaluation. The source must have masks (synthetic:objects, synthetic:shapes). Held-out
    scenes are never trained on, so the score says what the attention finds, not what it saw.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, mesh: Mesh, source: DecodedSource | None = None
    ):
        self.config, self.mesh = config, mesh
        data = config.data
        self.spec, self.split = data.eval_source or data.source, data.eval_split
        self.backbone = build_dino(config, teacher=True).backbone
        if not isinstance(self.backbone, VisionTransformer):
            raise ValueError(
                "eval.jaccard_examples needs a ViT's attention maps, and "
                f"student.arch={config.student.arch} has none: set "
                "--config.eval.jaccard_examples=0."
            )
        if source is None:
            source = DecodedSource(make_source(self.spec, self.split, data.data_dir))
        if "mask" not in source[0]:
            raise ValueError(
                f"eval.jaccard_examples: {self.spec} (split {self.split!r}) has no foreground "
                "masks. Set data.eval_source to a source with masks (synthetic:objects, "
                "synthetic:shapes), or --config.eval.jaccard_examples=0."
            )
        self.indices = sample_indices(source, config.eval.jaccard_examples)
        self.source = Subset(source, self.indices)
        self.maps_fn = _maps_fn(self.backbone, mesh)
        self.patches_fn = _patches_fn(self.backbone, mesh)
        log.info("Attention monitor: %d scenes of %r", len(self.indices), source.source)

    def _batches(self, limit: int | None = None):
        batch = self.config.eval.batch_size
        size = len(self.source) if limit is None else min(limit, len(self.source))
        data = eval_dataset(self.config, self.split, batch, self.source, limit=size)
        return data, math.ceil(size / batch)

    def __call__(self, teacher_params: dict) -> dict[str, float]:
        """{"jaccard_mean_map", "jaccard_best_head"}: the mask of the heads' mean map, and of
        the best head (chosen over all scenes), averaged over the scenes; "patch_jaccard": the
        linear probe of the patch features fitted on the first half of the scenes, scored on
        the second."""
        data, batches = self._batches()
        variables = {"params": teacher_params["backbone"]}
        scores = attention.attention_jaccard(
            self.backbone, variables, data, self.mesh, num_batches=batches, progress=False
        )
        return {
            "jaccard_mean_map": scores["mean_map"],
            "jaccard_best_head": scores["best_head"],
            "patch_jaccard": self.patch_jaccard(variables),
        }

    def patch_jaccard(self, variables: dict) -> float:
        """The Jaccard index of the linear probe of the teacher's patch features."""
        data, batches = self._batches()
        features, masks = [], []
        for batch, _ in zip(data, range(batches), strict=False):
            glob = parallel.to_global({k: batch[k] for k in ("image", "mask", "valid")}, self.mesh)
            patches = self.patches_fn(variables, glob["image"])
            gathered = multihost_utils.process_allgather(
                (patches, glob["mask"], glob["valid"]), tiled=True
            )
            patches, truth, valid = (np.asarray(x) for x in gathered)
            features.append(patches[valid])
            masks.append(truth[valid].astype(bool))
        return segmentation.linear_probe_jaccard(
            np.concatenate(features), np.concatenate(masks), self.backbone.patch_size
        )

    def figure(self, teacher_params: dict, scenes: int, title: str) -> Figure:
        """The first `scenes` scenes, each head's map and the masks: figures.attention_figure."""
        data, _ = self._batches(limit=scenes)
        variables = {"params": teacher_params["backbone"]}
        batch = next(iter(data))
        glob = parallel.to_global({k: batch[k] for k in ("image", "mask", "valid")}, self.mesh)
        maps = self.maps_fn(variables, glob["image"])
        gathered = multihost_utils.process_allgather(
            (maps, glob["image"], glob["mask"], glob["valid"]), tiled=True
        )
        maps, images, truth, valid = (np.asarray(x) for x in gathered)
        maps, images, truth = maps[valid][:scenes], images[valid][:scenes], truth[valid][:scenes]
        patch = self.backbone.patch_size
        masks = np.asarray(attention.upsample(attention.head_masks(maps), patch))
        scores = np.asarray(attention.jaccard(masks, truth[:, None]))
        pixels = np.clip((images * np.asarray(STD) + np.asarray(MEAN)) * 255.0, 0, 255)
        return figures.attention_figure(
            pixels.astype(np.uint8),
            np.asarray(attention.upsample(maps, patch)),
            masks,
            truth.astype(bool),
            scores,
            title,
        )


def _maps_fn(model, mesh: Mesh):
    """jit(variables, images [B, H, W, 3]) -> attention maps [B, heads, h, w], batch-split, the
    variables as sharded as they come."""
    batch = parallel.batch_sharding(mesh)
    return jax.jit(
        lambda variables, images: hub.attention_maps(model, variables, images),
        in_shardings=(None, batch),
        out_shardings=batch,
    )


def _patches_fn(model, mesh: Mesh):
    """jit(variables, images [B, H, W, 3]) -> patch features [B, h, w, D], batch-split."""
    batch = parallel.batch_sharding(mesh)
    return jax.jit(
        lambda variables, images: hub.patch_features(model, variables, images),
        in_shardings=(None, batch),
        out_shardings=batch,
    )
