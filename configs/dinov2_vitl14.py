"""DINOv2 ViT-L/14, the official `vitl14` (dinov2/configs/train/vitl14.yaml): 131072 prototypes
with a bottleneck of 384 and a separate iBOT head, Sinkhorn-Knopp centering, SwiGLU FFN,
stochastic depth 0.4, teacher momentum 0.994, 500 epochs (80 of warm-up) of 1250 iterations,
lr 2e-4 x sqrt(batch / 1024), weight decay 0.04 -> 0.2, no layer-wise decay, 2 x 224 + 8 x 98 px
crops, 32 images per GPU. The official trains it on ImageNet-22k; give its images with
--config.data.source=folder:/path/to/imagenet22k (a folder of class folders).

    python -m dino_jax.train --config configs/dinov2_vitl14.py \\
        --workdir gs://BUCKET/dinov2/vitl14 --config.data.source=folder:/data/imagenet22k

Sized for a TPU v5p-32 (16 chips): 32 images per chip at batch 512, as per GPU in the official,
bfloat16, `compute.remat="block"`. Compiled there it leaves HBM to spare (BENCHMARKS.md,
'DINOv2 programs'). `:smoke` shrinks it to a few CPU steps on the built-in data. Launch
(launch/README.md):

    NAME=dinov2-vitl14 ZONE=us-east5-a TYPE=v5p-32 RUNTIME=v2-alpha-tpuv5 \\
        CONFIG=configs/dinov2_vitl14.py WORKDIR=gs://BUCKET/dinov2/vitl14 \\
        launch/tpu/run_with_restarts.sh --config.data.source=folder:/data/imagenet22k
"""

from dino_jax.core.config import apply_variants, dinov2_config, dinov2_patch14, imagenet_config


def get_config(arg=None):
    c = dinov2_patch14(imagenet_config(dinov2_config()))
    c.student.arch = "dinov2_vit_large"
    c.eval.knn_every_steps = 12500  # the official evaluation.eval_period_iterations
    c.train.batch_size, c.train.rank_batch_size = 512, 32
    c.compute.remat = "block"
    return apply_variants(c, arg)
