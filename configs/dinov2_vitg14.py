"""DINOv2 ViT-g/14, the official `vitg14` (dinov2/configs/train/vitg14.yaml): the `vitl14`
recipe (configs/dinov2_vitl14.py) with the giant2 backbone (1536 wide, 40 blocks, SwiGLU) and
12 images per GPU. The official trains it on ImageNet-22k; give its images with
--config.data.source=folder:/path/to/imagenet22k.

    python -m dino_jax.train --config configs/dinov2_vitg14.py \\
        --workdir gs://BUCKET/dinov2/vitg14 --config.data.source=folder:/data/imagenet22k

Sized for a TPU v5p-32 (16 chips): 12 images per chip at batch 192, as per GPU in the official,
bfloat16, `compute.remat="block"`, the blocks scanned (`compute.scan_blocks`: the 40 blocks
compile once) and the state split 4 ways (`data 4 x fsdp 4`: each chip keeps a quarter of the
parameters, their EMA and Adam's moments, gathered for the forward passes). Compiled there it
leaves HBM to spare (BENCHMARKS.md, 'DINOv2 programs'). `:smoke` shrinks it to a few CPU steps
on the built-in data. Launch (launch/README.md):

    NAME=dinov2-vitg14 ZONE=us-east5-a TYPE=v5p-32 RUNTIME=v2-alpha-tpuv5 \\
        CONFIG=configs/dinov2_vitg14.py WORKDIR=gs://BUCKET/dinov2/vitg14 \\
        launch/tpu/run_with_restarts.sh --config.data.source=folder:/data/imagenet22k
"""

from dino_jax.core.config import apply_variants, dinov2_config, dinov2_patch14, imagenet_config


def get_config(arg=None):
    c = dinov2_patch14(imagenet_config(dinov2_config()))
    c.eval.knn_every_steps = 12500  # the official evaluation.eval_period_iterations
    c.student.arch = "dinov2_vit_giant2"
    c.train.batch_size, c.train.rank_batch_size = 192, 12
    c.compute.mesh = (("data", 4), ("fsdp", 4))
    c.compute.remat, c.compute.scan_blocks = "block", True
    return apply_variants(c, arg)
