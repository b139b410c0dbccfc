"""Continuing from a backbone-only file (configs/continue.py): with optim.freeze_backbone_epochs
the first epochs leave the student's backbone bit-identical to the file's while the heads move,
then the backbone trains; and the collapse watch names each collapse once."""

import math

import jax
import numpy as np
import pytest
import torch
from conftest import make_tiny_config

from dino_jax.core import parallel
from dino_jax.core.step import init_state, make_train_step
from dino_jax.eval.collapse import CollapseWatch
from dino_jax.interop.state_dict import backbone_to_torch
from dino_jax.interop.training_state import init_state_from
from dino_jax.tools.step_benchmark import random_batch

EPOCH = 2  # iterations per epoch


def tiny(method):
    if method == "dino":
        return make_tiny_config(OFFICIAL_EPOCH_LENGTH=EPOCH, freeze_backbone_epochs=1)
    return make_tiny_config(
        method="dinov2",
        arch="dinov2_vit_small",
        layerscale=1e-5,
        rank_batch_size=4,
        OFFICIAL_EPOCH_LENGTH=EPOCH,
        freeze_backbone_epochs=1,
    )


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_a_frozen_backbone_stays_bit_identical_then_trains(tmp_path, method):
    config = tiny(method)
    mesh = parallel.make_mesh(config.compute.mesh)
    # A backbone-only file in the official layout, from weights trained elsewhere (here: a
    # different seed's initialisation).
    other = init_state(config, jax.random.key(7), mesh)
    released = jax.device_get(other.teacher["backbone"])
    torch.save(backbone_to_torch({"params": released}), tmp_path / "backbone.pth")

    state, what = init_state_from(tmp_path / "backbone.pth", config, jax.random.key(0), mesh)
    assert "backbone" in what
    for got, want in zip(
        jax.tree.leaves(jax.device_get(state.student["backbone"])),
        jax.tree.leaves(released),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    heads = {k: v for k, v in jax.device_get(state.student).items() if k != "backbone"}

    step = make_train_step(config, mesh)
    batch = parallel.to_global(random_batch(config), mesh)
    for _ in range(EPOCH):  # the frozen epoch
        state, _ = step(state, batch)
    student = jax.device_get(state.student)
    for got, want in zip(
        jax.tree.leaves(student["backbone"]), jax.tree.leaves(released), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves({k: student[k] for k in heads}), jax.tree.leaves(heads), strict=True
        )
    ]
    assert any(moved)

    state, _ = step(state, batch)  # epoch 1: the backbone trains
    after = jax.device_get(state.student["backbone"])
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(released), strict=True)
    ]
    assert sum(changed) > len(changed) // 2


def test_freezing_every_epoch_is_refused():
    config = make_tiny_config(freeze_backbone_epochs=4)  # optim.epochs is 4
    with pytest.raises(ValueError, match=r"optim\.freeze_backbone_epochs=4 must be in \[0"):
        make_train_step(config, parallel.make_mesh(config.compute.mesh))


def test_the_collapse_watch_names_each_collapse_once():
    config = make_tiny_config()  # 256 prototypes; warm-up of 1 epoch of 3 steps
    log_k = math.log(256)
    watch = CollapseWatch(config, steps_per_epoch=3)
    healthy = {"teacher_entropy": 0.5 * log_k, "teacher_kl_uniform": 0.1}
    uniform = {"teacher_entropy": 0.99 * log_k, "teacher_kl_uniform": 0.01}
    peaked = {"teacher_entropy": 0.01, "teacher_kl_uniform": 0.9 * log_k}
    # During the warm-up nothing is said, whatever the targets.
    assert [watch.check(s, uniform) for s in (1, 2, 3)] == [None] * 3
    assert watch.check(4, healthy) is None
    said = [watch.check(s, uniform) for s in (5, 6, 7, 8)]
    assert said[:2] == [None, None] and "near uniform" in said[2] and said[3] is None
    assert "teacher.teacher_temp" in said[2] and "\n" not in said[2]
    said = [watch.check(s, peaked) for s in (9, 10, 11)]
    assert said[:2] == [None, None] and "few prototypes" in said[2]
    assert "teacher.momentum_teacher" in said[2]


def test_the_monitor_scores_the_retained_source_beside_the_new_one(tmp_path):
    """eval.knn_retain_source: the k-NN on the data a continued run must not forget, with that
    source's own memory and queries."""
    from dino_jax.eval.monitor import KnnMonitor, Monitors
    from dino_jax.metrics import MetricWriter

    config = make_tiny_config()
    config.data.source, config.eval.knn_retain_source = "synthetic:shapes", "synthetic:textures"
    config.data.eval_resize_size, config.data.eval_crop_size = 40, 32
    config.eval.knn_train_examples, config.eval.knn_val_examples = 48, 24
    config.eval.batch_size = 24
    mesh = parallel.make_mesh(config.compute.mesh)
    state = init_state(config, jax.random.key(0), mesh)
    monitors = Monitors(config, mesh, str(tmp_path))
    with MetricWriter(str(tmp_path)) as writer:
        values = monitors(0, state.teacher, None, writer)
    alone = config.copy_and_resolve_references()
    alone.data.source = "synthetic:textures"
    assert monitors.retain.splits["train"][0] == "synthetic:textures"
    assert values["knn_top1_retain"] == KnnMonitor(alone, mesh)(state.teacher)
    assert values["knn_top1"] == KnnMonitor(config, mesh)(state.teacher)
