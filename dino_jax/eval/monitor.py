"""The monitors of a training run: teacher-feature k-NN accuracy on a labelled split, and with
eval.jaccard_examples the attention monitor beside it; their figures to metrics and PNGs."""

from __future__ import annotations

import logging
import math
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dino_jax.data.pipeline import eval_dataset
from dino_jax.data.sources import (
    DecodedSource,
    Subset,
    make_source,
    sample_indices,
    shared_examples,
)
from dino_jax.eval import figures
from dino_jax.eval.attention_monitor import AttentionMonitor
from dino_jax.eval.maths.features import extract_features
from dino_jax.eval.maths.knn import knn_classify
from dino_jax.metrics import MetricWriter, read_metrics
from dino_jax.models import build_dino

log = logging.getLogger(__name__)


class KnnMonitor:
    """Top-1 of the weighted k-NN (k = eval.knn_k, T = 0.07) of the teacher backbone, as the
    reference's eval_knn.py: knn_classifier.

    The memory is eval.knn_train_examples images of data.split of data.source, the queries
    eval.knn_val_examples images of data.eval_split of data.eval_source (default data.source):
    each a seeded, class-balanced sample of the whole split (data.sources.sample_indices), the
    same in every run, resized and centre-cropped as in evaluation. `indices` holds them, as
    indices into the split. Queries that could be images of the memory are refused (ValueError)
    when the monitor is built, before training starts: each would find itself.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config, self.mesh = config, mesh
        self.backbone = build_dino(config, teacher=True).backbone
        data = config.data
        self.splits = {
            "train": (data.source, data.split, config.eval.knn_train_examples),
            "val": (data.eval_source or data.source, data.eval_split, config.eval.knn_val_examples),
        }
        whole = {
            name: DecodedSource(make_source(spec, split, data.data_dir))
            for name, (spec, split, _) in self.splits.items()
        }
        self._check_disjoint(whole)
        if whole["train"][0]["label"] < 0:
            raise ValueError(
                f"{data.source} has no labels for the k-NN monitor: give it class "
                "sub-folders, or disable the monitor with --config.eval.knn_every_steps=None."
            )
        self.indices = {
            name: sample_indices(whole[name], examples)
            for name, (_, _, examples) in self.splits.items()
        }
        self.sources = {name: Subset(whole[name], self.indices[name]) for name in whole}
        log.info(
            "k-NN monitor: a memory of %d images of %r, %d queries of %r",
            len(self.indices["train"]),
            whole["train"].source,
            len(self.indices["val"]),
            whole["val"].source,
        )

    def _check_disjoint(self, sources: dict[str, DecodedSource]) -> None:
        why = shared_examples(sources["train"], sources["val"])
        if why is None:
            return
        (spec, split, _), (val_spec, val_split, _) = self.splits["train"], self.splits["val"]
        raise ValueError(
            f"The k-NN monitor's queries ({val_spec}, split {val_split!r}) would be images of its "
            f"memory ({spec}, split {split!r}), each finding itself: {why}. Set "
            "data.eval_source to held-out labelled images (e.g. data.source=folder:ROOT/train "
            "with data.eval_source=folder:ROOT/val, or lay out ROOT/train/ and ROOT/val/ and use "
            "folder:ROOT), or turn the monitor off with eval.knn_every_steps=None."
        )

    def features(
        self, teacher_params: dict, teacher_batch_stats: dict | None = None
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{"train": memory, "val": queries}, each (features [N, D], labels [N]) of the teacher
        backbone with these parameters, in the order of `indices`."""
        variables = {"params": teacher_params["backbone"]}
        if teacher_batch_stats and "backbone" in teacher_batch_stats:  # not a head-only BN
            variables["batch_stats"] = teacher_batch_stats["backbone"]
        return {name: self._features(name, variables) for name in self.sources}

    def _features(self, name: str, variables: dict):
        source, batch = self.sources[name], self.config.eval.batch_size
        data = eval_dataset(self.config, self.splits[name][1], batch, source)
        return extract_features(
            self.backbone,
            variables,
            data,
            self.mesh,
            num_batches=math.ceil(len(source) / batch),
            desc=f"k-NN {name}",
        )

    def __call__(self, teacher_params: dict, teacher_batch_stats: dict | None = None) -> float:
        """k-NN top-1 (%) of the teacher backbone with these parameters."""
        features = self.features(teacher_params, teacher_batch_stats)
        k = self.config.eval.knn_k
        top1, _ = knn_classify(*features["train"], *features["val"], ks=(k,))[k]
        return top1


class Monitors:
    """The monitors a config asks for, run together at step 0, every eval.knn_every_steps and
    after the last step: the k-NN top-1 (and that on eval.knn_retain_source) and
    (eval.jaccard_examples > 0) the attention masks' Jaccard go to the metrics; WORKDIR/figures/
    gets attention_<step>.png (the teacher's maps on eval.figure_scenes held-out scenes) and
    monitors.png (every figure so far, over the steps).

    Built before training starts, so that a monitor refusing its data stops the run first.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, workdir: str):
        self.config, self.workdir = config, workdir
        self.knn = KnnMonitor(config, mesh)
        self.retain = None
        if config.eval.knn_retain_source:
            retain = config.copy_and_resolve_references()
            retain.data.source, retain.data.eval_source = config.eval.knn_retain_source, None
            self.retain = KnnMonitor(retain, mesh)
        self.attention = (
            AttentionMonitor(config, mesh) if config.eval.jaccard_examples > 0 else None
        )

    def __call__(
        self,
        step: int,
        teacher_params: dict,
        teacher_batch_stats: dict | None,
        writer: MetricWriter,
    ) -> dict[str, float]:
        values = {"knn_top1": self.knn(teacher_params, teacher_batch_stats)}
        if self.retain:
            values["knn_top1_retain"] = self.retain(teacher_params, teacher_batch_stats)
        primary = jax.process_index() == 0
        out = os.path.join(self.workdir, "figures")
        if self.attention:
            values.update(self.attention(teacher_params))
            scenes = self.config.eval.figure_scenes
            if scenes > 0:
                title = (
                    f"step {step}: the teacher's last-block attention; masks keep 60% of the mass"
                )
                figure = self.attention.figure(teacher_params, scenes, title)
                if primary:
                    figures.save(figure, os.path.join(out, f"attention_{step:07d}.png"))
        writer.write(step, values)
        if primary:
            curves = figures.monitor_figure(read_metrics(self.workdir))
            if curves is not None:
                figures.save(curves, os.path.join(out, "monitors.png"))
        return values
