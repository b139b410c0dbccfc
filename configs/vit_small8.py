"""DINO ViT-S/8 on ImageNet (released weights: 78.3% k-NN, 79.7% linear).

    python -m dino_jax.train --config configs/vit_small8.py --workdir gs://BUCKET/dino/vits8 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Patch 8 quadruples the tokens of ViT-S/16: the reference's defaults otherwise. `:smoke` shrinks it
to a few CPU steps on the built-in data.

Sized for a TPU v4-32 (16 chips, 32 images per chip at batch 512) with `compute.remat="block"`:
compiled there, it leaves HBM to spare, where no remat and "dots_saveable" fall under the bar of 10%
of HBM free (BENCHMARKS.md, 'TPU and GPU programs: compiled per recipe'). Launch (launch/README.md):

    NAME=dino-vits8 ZONE=us-central2-b TYPE=v4-32 RUNTIME=tpu-ubuntu2204-base \\
        CONFIG=configs/vit_small8.py WORKDIR=gs://BUCKET/dino/vits8 \\
        launch/tpu/run_with_restarts.sh --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from dino_jax.core.config import apply_variants, imagenet_config


def get_config(arg=None):
    c = imagenet_config()
    c.student.arch, c.student.patch_size = "vit_small", 8
    c.train.batch_size = 512
    # The 785-token crops' activations fill a v4 chip without it; the blocks' recompute adds to
    # the step's FLOPs (BENCHMARKS.md).
    c.compute.remat = "block"
    return apply_variants(c, arg)
