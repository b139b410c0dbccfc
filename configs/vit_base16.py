"""DINO ViT-B/16 on ImageNet (released weights: 76.1% k-NN, 78.2% linear).

    python -m dino_jax.train --config configs/vit_base16.py --workdir gs://BUCKET/dino/vitb16 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

As the reference's ViT-B/16 run: gradient clipping at 0.3, float32 compute, 2 nodes x 8 GPUs of 64.
`:smoke` shrinks it to a few CPU steps on the built-in data.

Sized for a TPU v4-32 (16 chips, 64 images per chip at batch 1024): compiled there without
remat, it clears the bar of 10% of HBM free (BENCHMARKS.md, 'TPU and GPU programs: compiled per
recipe'). Launch (launch/README.md):

    NAME=dino-vitb16 ZONE=us-central2-b TYPE=v4-32 RUNTIME=tpu-ubuntu2204-base \\
        CONFIG=configs/vit_base16.py WORKDIR=gs://BUCKET/dino/vitb16 \\
        launch/tpu/run_with_restarts.sh --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from dino_jax.core.config import apply_variants, imagenet_config


def get_config(arg=None):
    c = imagenet_config()
    c.student.arch, c.student.patch_size = "vit_base", 16
    c.optim.clip_grad = 0.3
    c.compute.dtype = "float32"
    c.train.batch_size = 1024
    return apply_variants(c, arg)
