"""Attention maps: the 60%-mass threshold against the reference's rule in NumPy, upsampling,
Jaccard on hand-made masks and over a dataset, and the command's maps, masks and files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_jax import visualize_attention
from dino_jax.core import parallel
from dino_jax.data.pipeline import MEAN, STD, eval_dataset, resize_center_crop
from dino_jax.data.synthetic import ShapesSource
from dino_jax.eval import cli
from dino_jax.eval.maths import attention
from dino_jax.interop.hub import load_pretrained

REPO = Path(__file__).resolve().parent.parent


def reference_threshold(attentions, threshold):
    """visualize_attention.py's masks, line by line, in NumPy (torch.sort is ascending)."""
    idx = np.argsort(attentions, axis=1, kind="stable")
    val = np.take_along_axis(attentions, idx, axis=1)
    val = val / np.sum(val, axis=1, keepdims=True)
    cumval = np.cumsum(val, axis=1)
    th_attn = cumval > (1 - threshold)
    idx2 = np.argsort(idx, axis=1)
    for head in range(len(attentions)):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn


def test_mass_threshold_hand_case():
    # Ascending 0.1, 0.2, 0.3, 0.4 -> cumulative 0.1, 0.3, 0.6, 1.0: above 0.4 are 0.3 and 0.4,
    # which hold 70% >= 60%; the maps need not sum to 1 (the cls token takes the rest).
    maps = np.array([[0.1, 0.4, 0.2, 0.3], [0.05, 0.2, 0.1, 0.15]])
    want = [[False, True, False, True], [False, True, False, True]]
    np.testing.assert_array_equal(attention.mass_mask(maps, 0.6), want)
    # At 85% all but the smallest (90%); at 95% every patch, since the smallest alone is 10%.
    np.testing.assert_array_equal(attention.mass_mask(maps[:1], 0.85), [[False, True, True, True]])
    assert np.all(attention.mass_mask(maps[:1], 0.95))


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_mass_threshold_equals_the_reference(threshold):
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(64, 0.3), size=6) * 0.9  # 6 heads, 8x8 patches, peaky
    got = np.asarray(attention.mass_mask(maps, threshold))
    np.testing.assert_array_equal(got, reference_threshold(maps, threshold))
    kept = (maps * got).sum(1) / maps.sum(1)
    assert np.all(kept >= threshold - 1e-6)


def test_upsample_repeats_each_patch_over_its_pixels():
    maps = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    got = np.asarray(attention.upsample(maps, 8))
    assert got.shape == (2, 24, 32)
    rows, cols = np.meshgrid(np.arange(24), np.arange(32), indexing="ij")
    np.testing.assert_array_equal(got, maps[:, rows // 8, cols // 8])  # torch "nearest" by 8


def test_jaccard_hand_made():
    top_left = np.zeros((4, 4), bool)
    top_left[:2, :2] = True
    top_rows = np.zeros((4, 4), bool)
    top_rows[:2] = True
    bottom = ~top_rows
    pred = np.stack([top_left, top_left, np.zeros((4, 4), bool)])
    truth = np.stack([top_rows, bottom, np.zeros((4, 4), bool)])
    # 4 shared of 8 pixels; none shared; both empty counts as agreement.
    np.testing.assert_allclose(attention.jaccard(pred, truth), [0.5, 0.0, 1.0])


def test_mask_scores_of_each_head_and_of_the_mean_map():
    # 2 heads on 2x2 patches of 2 px. Head 0 puts 70% on patch (0, 0); head 1 spreads evenly.
    maps = np.array([[[[0.7, 0.1], [0.1, 0.1]], [[0.25, 0.25], [0.25, 0.25]]]])
    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, :2, :2] = 1  # the object fills patch (0, 0)
    got = np.asarray(attention.mask_scores(maps, truth, patch_size=2))
    # Head 0 keeps patch (0, 0) alone: J = 1. Head 1 (equal values, stable order) keeps the last
    # three patches in row-major order, 75%: J = 0 with the object's patch out. The mean map
    # 0.475, 0.175, 0.175, 0.175 keeps (0, 0) and the last (1, 1), 65%: J = 4 / 8.
    np.testing.assert_allclose(got, [[1.0, 0.0, 0.5]], atol=1e-6)


def numpy_jaccard(pred, truth):
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else np.logical_and(pred, truth).sum() / union


def test_dataset_score_equals_image_by_image_numpy(export_dir):
    mesh = parallel.make_mesh((("data", -1),))
    model, variables = cli.load_backbone(str(export_dir), mesh)
    config = cli.data_config("synthetic:shapes", "", 32, 32)
    data = eval_dataset(config, "val", 8, limit=12)
    got = attention.attention_jaccard(model, variables, data, mesh, num_batches=2, progress=False)

    host_model, host_variables = load_pretrained(export_dir)
    per_image = []
    for i in range(12):
        example = ShapesSource("val")[i]
        image = resize_center_crop(example["image"], 32, 32, Image.BICUBIC)
        truth = resize_center_crop(example["mask"], 32, 32, Image.NEAREST).astype(bool)
        x = ((image / 255.0 - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)
        attn = host_model.apply(host_variables, x[None], method="get_last_selfattention")
        maps = np.asarray(attn)[0, :, 0, 1:]  # [heads, 16]
        maps = np.concatenate([maps, maps.mean(0, keepdims=True)])
        masks = reference_threshold(maps, 0.6).reshape(-1, 4, 4)
        masks = masks.repeat(8, axis=1).repeat(8, axis=2)
        per_image.append([numpy_jaccard(m, truth) for m in masks])
    want = np.mean(per_image, axis=0)
    assert got["examples"] == 12
    np.testing.assert_allclose([got[f"head_{h}"] for h in range(4)], want[:4], atol=1e-6)
    np.testing.assert_allclose(got["mean_map"], want[4], atol=1e-6)
    assert got["best_head"] == pytest.approx(want[:4].max())
    assert got["best_head_index"] == int(np.argmax(want[:4]))
    assert got["mean_of_heads"] == pytest.approx(want[:4].mean())


@pytest.mark.slow
def test_command_writes_the_maps_of_an_image_file(export_dir, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "maps"
    command = [
        sys.executable, "-m", "dino_jax.visualize_attention", f"--checkpoint={export_dir}",
        f"--image={tmp_path / 'in.png'}", "--image_size=36", f"--out={out}",
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    heads = [f"attn-head{h}.png" for h in range(4)] + [f"mask_th0.6_head{h}.png" for h in range(4)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["img.png", "attention.png", *heads])
    # 36 px resized, cropped to 32 (a multiple of the 8-px patches), maps upsampled to it.
    for name in ["img.png", "attn-head0.png", "mask_th0.6_head3.png"]:
        assert Image.open(out / name).size == (32, 32), name
    assert min(Image.open(out / "attention.png").size) > 200  # a page a person can read
    assert "4 heads' maps and masks (60% of the mass)" in proc.stdout


def test_command_scores_synthetic_masks_and_defaults_to_a_scene(export_dir, tmp_path, capsys):
    visualize_attention.main(
        [f"--checkpoint={export_dir}", "--image_size=32", f"--out={tmp_path / 'scene'}"]
    )
    assert "Jaccard with the true mask: mean map" in capsys.readouterr().out
    assert (tmp_path / "scene" / "attention.png").is_file()
    visualize_attention.main(
        [f"--checkpoint={export_dir}", "--jaccard=synthetic:shapes", "--examples=16",
         "--batch_size=8", "--image_size=32", f"--out={tmp_path}"]
    )  # fmt: skip
    results = json.loads((tmp_path / "jaccard.json").read_text())
    assert results["jaccard"]["examples"] == 16 and results["image_size"] == 32
    assert 0.0 <= results["jaccard"]["mean_map"] <= 1.0
    assert "Jaccard of the 60%-mass masks on 16 images" in capsys.readouterr().out


def test_command_maps_and_masks_equal_the_reference_in_numpy(export_dir, tmp_path):
    args = visualize_attention.parse_args(
        [f"--checkpoint={export_dir}", "--index=2", "--image_size=68", f"--out={tmp_path}"]
    )
    got = visualize_attention.visualize(args)

    # The reference's input: resized to 68 x 68, the top-left 64 x 64 (a multiple of 8 px).
    example = ShapesSource("val")[2]
    image = np.asarray(Image.fromarray(example["image"]).resize((68, 68), Image.BILINEAR))
    image = image[:64, :64]
    truth = np.asarray(Image.fromarray(example["mask"]).resize((68, 68), Image.NEAREST))
    truth = truth[:64, :64].astype(bool)
    np.testing.assert_array_equal(got["image"], image)
    host_model, host_variables = load_pretrained(export_dir)
    x = ((image / 255.0 - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)
    attn = np.asarray(host_model.apply(host_variables, x[None], method="get_last_selfattention"))
    maps = attn[0, :, 0, 1:]  # the cls query's attention to the 8 x 8 patches, per head

    def nearest(a):  # nn.functional.interpolate(scale_factor=8, mode="nearest")
        return a.reshape(-1, 8, 8).repeat(8, axis=1).repeat(8, axis=2)

    masks = nearest(reference_threshold(np.concatenate([maps, maps.mean(0, keepdims=True)]), 0.6))
    assert got["maps"].shape == (4, 64, 64) and got["masks"].shape == (5, 64, 64)
    np.testing.assert_allclose(got["maps"], nearest(maps), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got["masks"], masks)
    assert 0 < masks.mean() < 1 and truth.any()  # neither side trivial
    np.testing.assert_allclose(got["scores"], [numpy_jaccard(m, truth) for m in masks], atol=1e-6)


def test_bad_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        visualize_attention.read_image(str(tmp_path / "missing.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png is not a readable image"):
        visualize_attention.read_image(str(tmp_path / "notes.png"))
