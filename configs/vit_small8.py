"""DINO ViT-S/8 on ImageNet (released weights: 78.3% k-NN, 79.7% linear).

    python -m dino_jax.train --config configs/vit_small8.py --workdir gs://BUCKET/dino/vits8 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Patch 8 quadruples the tokens of ViT-S/16: the reference's defaults otherwise. `:smoke` shrinks it
to a few CPU steps on the built-in data.
"""

from dino_jax.config import apply_variants, imagenet_config


def get_config(arg=None):
    c = imagenet_config()
    c.arch, c.patch_size = "vit_small", 8
    c.batch_size = 512
    return apply_variants(c, arg)
