"""DINOv2's block masking and per-batch mask ratios against the official algorithm written out
here from dinov2/data/masking.py and collate.py (drawing from Python's `random` module, as the
official does), seeded alike; and the laws the masks must follow."""

import math
import random

import numpy as np
import pytest
import torch

from dino_jax.data.masking import BlockMasking, batch_masks
from dino_jax.methods.dinov2 import mask_upper_bound as upper_bound


def official_mask(height, width, num_masking_patches, max_num_patches, min_num_patches=4):
    """MaskingGenerator(input_size=(h, w), max_num_patches=...)(num_masking_patches)."""
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masking_patches:
        room = min(num_masking_patches - count, max_num_patches)
        delta = 0
        for _ in range(10):
            target_area = random.uniform(min_num_patches, room)
            aspect_ratio = math.exp(random.uniform(*log_aspect))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= room:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def official_collate_masks(B, side, ratio=(0.1, 0.5), probability=0.5):
    """collate_data_and_cast's masks and upperbound (torch.linspace in float32, as it is)."""
    N = side * side
    max_num = 0.5 * (side * 14) // 14 * (side * 14) // 14  # train.py's expression, patch 14
    n_samples_masked = int(B * probability)
    probs = torch.linspace(*ratio, n_samples_masked + 1)
    upperbound, masks = 0, []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks.append(
            official_mask(side, side, int(N * random.uniform(prob_min, prob_max)), max_num)
        )
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks.append(official_mask(side, side, 0, max_num))
    random.shuffle(masks)
    return np.stack(masks).reshape(B, N), upperbound


@pytest.mark.parametrize(("batch", "side"), [(16, 16), (8, 7), (64, 16), (5, 37)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_official_masks_for_the_same_seed(batch, side, seed):
    random.seed(seed)
    want, want_bound = official_collate_masks(batch, side)
    got = batch_masks(random.Random(seed), BlockMasking(side, side), batch)
    np.testing.assert_array_equal(got, want)
    assert upper_bound(batch, side * side) == want_bound
    assert got.sum() <= want_bound


def test_the_laws_of_the_masks():
    """Half of the crops masked, each within its bracket's ratio (the generator may stop
    short, never over), the masked ones in random positions of the batch."""
    rng, generator = random.Random(0), BlockMasking(16, 16)
    counts, positions = [], np.zeros(64)
    for _ in range(50):
        masks = batch_masks(rng, generator, 64)
        per_crop = masks.sum(axis=1)
        assert (per_crop > 0).sum() <= 32
        assert per_crop.max() <= int(256 * 0.5)
        counts.append(np.sort(per_crop[per_crop > 0]))
        positions += per_crop > 0
    # Every crop position is masked about half the time (shuffled), none always or never.
    assert positions.min() > 10 and positions.max() < 40
    # The ratios cover the brackets: the least-masked crops near 0.1, the most near 0.5.
    assert np.median([c[0] for c in counts]) < 0.15 * 256
    assert np.median([c[-1] for c in counts]) > 0.4 * 256
    # A block is at least 4 patches; masks are unions of rectangles of aspect within [0.3, 3.3].
    mask = generator(random.Random(3), 40)
    assert mask.sum() >= 4


def pipeline_config(**overrides):
    from conftest import make_tiny_config

    config = make_tiny_config(method="dinov2", arch="dinov2_vit_small", rank_batch_size=2)
    for key, value in overrides.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    return config


def test_the_pipeline_masks_each_rank_as_the_official_collate():
    """Each rank of the batch gets collate_data_and_cast's masks for its 2 x rank global crops
    (crop-major there, image-major in the batch), from its own seeded generator."""
    from dino_jax.data.masking import BatchMasks

    config = pipeline_config()
    grid = config.crops.global_crops_size // config.student.patch_size
    batch = {"global": np.zeros((8, 2, 1, 1, 3))}
    got = BatchMasks(config)(5, batch)["masks"]
    assert got.shape == (8, 2, grid * grid) and got.dtype == bool
    for rank in range(4):
        rng = random.Random(f"masks/{config.train.seed}/5/{rank}")
        want = batch_masks(rng, BlockMasking(grid, grid), 4)  # [2 x 2 crops, N] crop-major
        crop_major = np.swapaxes(got[2 * rank : 2 * rank + 2], 0, 1).reshape(4, -1)
        np.testing.assert_array_equal(crop_major, want)
        assert (crop_major.sum(axis=1) > 0).sum() <= 2  # int(4 x 0.5) crops masked per rank


def test_the_masks_resume_and_do_not_depend_on_the_processes():
    from dino_jax.data.pipeline import train_dataset

    config = pipeline_config(**{"data.source": "synthetic:shapes"})
    it = iter(train_dataset(config))
    first = next(it)["masks"]
    state = it.get_state()
    second = next(it)["masks"]
    assert not np.array_equal(first, second)  # a new draw every step
    resumed = iter(train_dataset(config))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["masks"], second)
    halves = [
        next(iter(train_dataset(config, process_index=p, process_count=2)))["masks"]
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(halves), first)


def test_a_rank_that_straddles_processes_is_refused():
    from dino_jax.data.pipeline import train_dataset

    config = pipeline_config(**{"train.rank_batch_size": 8})
    with pytest.raises(ValueError, match=r"train\.rank_batch_size=8 must divide the 4 images"):
        train_dataset(config, process_index=0, process_count=2)
