"""DINOv2's masks for the iBOT objective: BEiT's block masking (dinov2/data/masking.py:
MaskingGenerator) and the per-batch assignment of mask ratios (dinov2/data/collate.py:
collate_data_and_cast).

Both draw from a `random.Random` in the order the official code draws from Python's `random`
module, so that a generator seeded alike gives the official masks; the pipeline seeds one per
batch from the run's seed and the batch's index, which makes the masks resumable.
"""

from __future__ import annotations

import math
import random

import numpy as np


class BlockMasking:
    """Masks of a height x width patch grid made of rectangular blocks: each block has an area
    drawn from U(min_num_patches, room left), a log-uniform aspect ratio in [min_aspect,
    1 / min_aspect] and a uniform position; it is kept only if it adds between 1 and the room
    left new patches, with up to 10 tries per block. The mask may fall short of its target."""

    def __init__(
        self,
        height: int,
        width: int,
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.height, self.width = height, width
        # dinov2/train/train.py: max_num_patches=0.5 * img_size // patch_size * img_size //
        # patch_size, which floors half the rows first: (height // 2) * width patches.
        if max_num_patches is None:
            max_num_patches = float((height // 2) * width)
        self.max_num_patches = max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, rng: random.Random, mask: np.ndarray, room: float) -> int:
        """Masks one more block of at most `room` new patches; returns how many it added."""
        added = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, room)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= room:
                    block[...] = True
                    added += new
            if added > 0:
                break
        return added

    def __call__(self, rng: random.Random, num_masking_patches: int = 0) -> np.ndarray:
        """bool [height, width] with about `num_masking_patches` patches masked."""
        mask = np.zeros((self.height, self.width), bool)
        count = 0
        while count < num_masking_patches:
            room = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(rng, mask, room)
            if added == 0:
                break
            count += added
        return mask


def batch_masks(
    rng: random.Random,
    generator: BlockMasking,
    batch: int,
    ratio=(0.1, 0.5),
    probability: float = 0.5,
) -> np.ndarray:
    """bool [batch, h * w]: masks for `batch` crops (the official collate's B, every global
    crop of the batch): int(batch * probability) of them masked, the i-th to a ratio drawn
    from the i-th of the brackets linspace(*ratio, n + 1), the others empty, all shuffled."""
    n_tokens = generator.height * generator.width
    n_masked = int(batch * probability)
    bounds = np.linspace(*ratio, n_masked + 1)
    masks = [
        generator(rng, int(n_tokens * rng.uniform(bounds[i], bounds[i + 1])))
        for i in range(n_masked)
    ]
    masks += [generator(rng, 0) for _ in range(n_masked, batch)]
    rng.shuffle(masks)
    return np.stack(masks).reshape(batch, n_tokens)


class BatchMasks:
    """A grain map with index: adds "masks", bool [b, 2, N], to batch `index` of this process
    (the global step): each rank of `config.train.rank_batch_size` images gets the official
    collate's masks for its 2 x rank global crops (crop-major there, image-major here), from a
    `random.Random` seeded by the run's seed, the step and the rank's global number. So the masks
    depend on neither the process count nor the workers, and a resumed iterator redraws them."""

    def __init__(self, config, process_index: int = 0, process_count: int = 1):
        crops, ibot = config.crops, config.ibot
        grid = crops.global_crops_size // config.student.patch_size
        self.generator = BlockMasking(grid, grid)
        self.ratio = tuple(ibot.mask_ratio_min_max)
        self.probability = ibot.mask_sample_probability
        self.seed, self.rank = config.train.seed, config.train.rank_batch_size
        local = config.train.batch_size // process_count
        if self.rank is None or local % self.rank:
            raise ValueError(
                f"train.rank_batch_size={self.rank} must divide the {local} images of each of "
                f"{process_count} processes: choose a divisor of {local}."
            )
        self.first_rank = process_index * (local // self.rank)

    def __call__(self, index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ranks = batch["global"].shape[0] // self.rank
        masks = []
        for j in range(ranks):
            rng = random.Random(f"masks/{self.seed}/{index}/{self.first_rank + j}")
            drawn = batch_masks(rng, self.generator, 2 * self.rank, self.ratio, self.probability)
            masks.append(drawn.reshape(2, self.rank, -1).swapaxes(0, 1))
        return {**batch, "masks": np.concatenate(masks)}
