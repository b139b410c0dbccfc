"""The k-NN monitor: teacher-feature k-NN accuracy on a labelled split, during training."""

from __future__ import annotations

import logging
import math

import ml_collections
from jax.sharding import Mesh

from dino_jax.data.pipeline import eval_dataset
from dino_jax.data.sources import DecodedSource, make_source
from dino_jax.eval.features import extract_features
from dino_jax.eval.knn import knn_classify
from dino_jax.models import build_dino

log = logging.getLogger(__name__)


class KnnMonitor:
    """Top-1 of the weighted k-NN (k = eval.knn_k, T = 0.07) of the teacher backbone.

    The memory is the first eval.knn_train_examples of data.split, the queries the first
    eval.knn_val_examples of data.eval_split, both resized and centre-cropped as in evaluation.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config, self.mesh = config, mesh
        self.backbone = build_dino(config, teacher=True).backbone
        self.splits = {
            "train": (config.data.split, config.eval.knn_train_examples),
            "val": (config.data.eval_split, config.eval.knn_val_examples),
        }
        self.sources = {
            name: DecodedSource(make_source(config.data.source, split, config.data.data_dir))
            for name, (split, _) in self.splits.items()
        }
        if self.sources["train"][0]["label"] < 0:
            raise ValueError(
                f"{config.data.source} has no labels for the k-NN monitor: give it class "
                "sub-folders, or disable the monitor with --config.eval.knn_every_steps=-1."
            )

    def _features(self, name: str, variables: dict):
        _, limit = self.splits[name]
        source, batch = self.sources[name], self.config.eval.batch_size
        data = eval_dataset(self.config, self.splits[name][0], batch, source, limit=limit)
        num_batches = math.ceil(min(limit, len(source)) / batch)
        return extract_features(
            self.backbone, variables, data, self.mesh, num_batches=num_batches, desc=f"k-NN {name}"
        )

    def __call__(self, teacher_params: dict, teacher_batch_stats: dict | None = None) -> float:
        """k-NN top-1 (%) of the teacher backbone with these parameters."""
        variables = {"params": teacher_params["backbone"]}
        if teacher_batch_stats and "backbone" in teacher_batch_stats:  # not a head-only BN
            variables["batch_stats"] = teacher_batch_stats["backbone"]
        train_features, train_labels = self._features("train", variables)
        val_features, val_labels = self._features("val", variables)
        k = self.config.eval.knn_k
        top1, _ = knn_classify(train_features, train_labels, val_features, val_labels, ks=(k,))[k]
        return top1
