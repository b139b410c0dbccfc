"""DINOv2 ViT-S/14 on ImageNet-1k with DINOv2's default recipe (dinov2/configs/
ssl_default_config.yaml): DINO + iBOT (shared head) + KoLeo, softmax centering, 100 epochs of
1250 iterations, lr 0.004 x sqrt(batch / 1024), layer-wise decay 0.9, 2 x 224 + 8 x 98 px crops.

    python -m dino_jax.train --config configs/dinov2_vits14.py \\
        --workdir gs://BUCKET/dinov2/vits14 --config.data.data_dir=gs://BUCKET/tensorflow_datasets

The released ViT-S/14 was distilled from ViT-g/14 on LVD-142M; this trains one from scratch, the
way the official code trains any arch. `:smoke` shrinks it to a few CPU steps on the built-in
data.

Sized for a TPU v4-32 (16 chips): 64 images per chip at batch 1024, bfloat16, no remat; KoLeo,
the masks and the iBOT center are per chip, as per GPU in the official (train.rank_batch_size
64). Compiled there it leaves HBM to spare (BENCHMARKS.md, 'DINOv2 programs'). Launch
(launch/README.md):

    NAME=dinov2-vits14 ZONE=us-central2-b TYPE=v4-32 RUNTIME=tpu-ubuntu2204-base \\
        CONFIG=configs/dinov2_vits14.py WORKDIR=gs://BUCKET/dinov2/vits14 \\
        launch/tpu/run_with_restarts.sh --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from dino_jax.core.config import apply_variants, dinov2_config, imagenet_config


def get_config(arg=None):
    c = imagenet_config(dinov2_config())
    c.student.arch, c.student.patch_size = "dinov2_vit_small", 14
    c.crops.local_crops_size = 98  # a multiple of 14, as the official patch-14 recipes
    c.train.batch_size, c.train.rank_batch_size = 1024, 64
    c.eval.knn_every_steps = 12500  # the official evaluation.eval_period_iterations
    return apply_variants(c, arg)
