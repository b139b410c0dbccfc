"""The attention monitor: its Jaccard equals a NumPy computation (the reference's threshold) on
hand-made masks; a training run logs it with the k-NN and writes the figures; bad settings are
refused before training."""

import jax
import numpy as np
import pytest
from PIL import Image

from dino_jax import train
from dino_jax.core import parallel
from dino_jax.core.config import load_config
from dino_jax.core.step import init_state
from dino_jax.data.pipeline import MEAN, STD, resize_center_crop
from dino_jax.data.sources import DecodedSource
from dino_jax.eval.attention_monitor import AttentionMonitor
from dino_jax.eval.maths import segmentation
from dino_jax.eval.monitor import KnnMonitor
from dino_jax.metrics import read_metrics
from dino_jax.models import build_dino


def hand_made_scenes(n: int, side: int, seed: int = 0) -> list[dict]:
    """Noise images, each with a rectangle of its own size and place as the true mask."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n):
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        mask = np.zeros((side, side), np.uint8)
        top, left = rng.integers(0, side // 2, 2)
        height, width = rng.integers(side // 4, side // 2 + 1, 2)
        mask[top : top + height, left : left + width] = 1
        image[mask.astype(bool)] = (200, 40, 40)
        scenes.append({"image": image, "label": np.int32(i % 2), "mask": mask})
    return scenes


def numpy_masks(maps: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    """visualize_attention.py's rule per map [N]: ascending sort, normalise, cumsum > 1 - t."""
    masks = []
    for m in maps:
        order = np.argsort(m, kind="stable")
        cumulative = np.cumsum(m[order] / m.sum())
        keep = np.zeros(m.shape, bool)
        keep[order] = cumulative > 1 - threshold
        masks.append(keep)
    return np.stack(masks)


def numpy_jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else np.logical_and(pred, truth).sum() / union


def test_jaccard_equals_numpy_on_hand_made_masks(tiny_config):
    config = tiny_config()
    side, patch = config.data.eval_crop_size, config.student.patch_size
    config.data.eval_resize_size = side
    config.eval.jaccard_examples, config.eval.batch_size = 10, 8
    mesh = parallel.make_mesh(config.compute.mesh)
    scenes = hand_made_scenes(10, side)
    monitor = AttentionMonitor(config, mesh, source=DecodedSource(scenes))
    state = init_state(config, jax.random.key(0), mesh)
    got = monitor(state.teacher)

    backbone = build_dino(config, teacher=True).backbone
    variables = {"params": jax.device_get(state.teacher["backbone"])}
    grid = side // patch
    per_image = []
    for scene in scenes:
        image = resize_center_crop(scene["image"], side, side, Image.BICUBIC)
        truth = resize_center_crop(scene["mask"], side, side, Image.NEAREST).astype(bool)
        x = ((image / 255.0 - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)
        attn = np.asarray(backbone.apply(variables, x[None], method="get_last_selfattention"))
        maps = attn[0, :, 0, 1:]  # [heads, patches]: the cls query's attention to the patches
        maps = np.concatenate([maps, maps.mean(0, keepdims=True)])
        masks = numpy_masks(maps).reshape(-1, grid, grid).repeat(patch, 1).repeat(patch, 2)
        per_image.append([numpy_jaccard(m, truth) for m in masks])
    want = np.mean(per_image, axis=0)
    assert got["jaccard_mean_map"] == pytest.approx(want[-1], abs=1e-6)
    assert got["jaccard_best_head"] == pytest.approx(want[:-1].max(), abs=1e-6)
    # The scores differ between heads and scenes: the comparison is not of constants.
    assert len({round(j, 6) for row in per_image for j in row}) > 5
    # The probe of the patch features: fitted on the first 5 scenes, scored on the last 5.
    features, truths = [], []
    for scene in scenes:
        image = resize_center_crop(scene["image"], side, side, Image.BICUBIC)
        x = ((image / 255.0 - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)
        out = backbone.apply(variables, x[None], method="forward_features")
        features.append(np.asarray(out["x_norm_patchtokens"]).reshape(grid, grid, -1))
        truths.append(resize_center_crop(scene["mask"], side, side, Image.NEAREST) > 0)
    want_patch = segmentation.linear_probe_jaccard(np.stack(features), np.stack(truths), patch)
    assert got["patch_jaccard"] == pytest.approx(want_patch, abs=1e-6)

    figure = monitor.figure(state.teacher, 3, "hand-made")
    assert len(figure.axes) == 3 * (config.student.num_heads + 2)
    assert figure.axes[-1].get_title() == f"mean map  J={per_image[2][-1]:.2f}"


def test_a_source_without_masks_is_refused(tiny_config):
    config = tiny_config()
    config.data.source = "synthetic:textures"
    config.eval.jaccard_examples = 8
    with pytest.raises(ValueError, match=r"has no foreground masks.*jaccard_examples=0"):
        AttentionMonitor(config, parallel.make_mesh(config.compute.mesh))


def test_a_resnet_is_refused(tiny_config):
    config = tiny_config(arch="resnet50")
    config.data.source = "synthetic:shapes"
    config.eval.jaccard_examples = 8
    with pytest.raises(ValueError, match=r"needs a ViT's attention maps.*jaccard_examples=0"):
        AttentionMonitor(config, parallel.make_mesh(config.compute.mesh))


@pytest.mark.slow
def test_training_logs_jaccard_beside_knn_and_draws_the_figures(tmp_path):
    config = load_config("configs/demo.py:smoke")
    config.data.source = "synthetic:shapes"
    config.optim.epochs, config.train.OFFICIAL_EPOCH_LENGTH = 1, 4
    config.eval.knn_every_steps, config.eval.jaccard_examples = 2, 12
    config.eval.figure_scenes = 2
    train.train(config, str(tmp_path))
    records = [r for r in read_metrics(tmp_path) if "jaccard_mean_map" in r]
    assert [r["step"] for r in records] == [0, 2, 4]
    for r in records:
        assert 0 <= r["jaccard_mean_map"] <= 1 and 0 <= r["jaccard_best_head"] <= 1
        assert 0 <= r["patch_jaccard"] <= 1
        assert "knn_top1" in r
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert names == [
        "attention_0000000.png",
        "attention_0000002.png",
        "attention_0000004.png",
        "monitors.png",
    ]
    with Image.open(tmp_path / "figures" / "attention_0000004.png") as png:
        assert png.width > png.height > 100  # two scenes, each with heads + 2 panels


def test_monitors_score_fsdp_split_parameters_as_replicated_ones(tiny_config):
    """Training under FSDP leaves the teacher split over fsdp; the monitors take it as it is and
    give what the same parameters give replicated on a data-only mesh."""
    config = tiny_config(embed_dim=128)  # weight matrices large enough to be split
    config.data.source = "synthetic:shapes"
    config.eval.knn_train_examples, config.eval.knn_val_examples = 32, 16
    config.eval.jaccard_examples, config.eval.batch_size = 16, 8
    split = config.copy_and_resolve_references()
    split.compute.mesh = (("data", -1), ("fsdp", 2))
    fsdp_mesh = parallel.make_mesh(split.compute.mesh)
    teacher = init_state(split, jax.random.key(0), fsdp_mesh).teacher
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(teacher))
    host = jax.device_get(teacher)
    data_mesh = parallel.make_mesh(config.compute.mesh)
    knn = [
        KnnMonitor(c, m)(t) for c, m, t in ((split, fsdp_mesh, teacher), (config, data_mesh, host))
    ]
    jaccard = [
        AttentionMonitor(c, m)(t)
        for c, m, t in ((split, fsdp_mesh, teacher), (config, data_mesh, host))
    ]
    assert knn[0] == pytest.approx(knn[1], abs=1e-6)
    assert jaccard[0] == pytest.approx(jaccard[1], abs=1e-6)
