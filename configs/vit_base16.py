"""DINO ViT-B/16 on ImageNet (released weights: 76.1% k-NN, 78.2% linear).

    python -m dino_jax.train --config configs/vit_base16.py --workdir gs://BUCKET/dino/vitb16 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

As the reference's ViT-B/16 run: gradient clipping at 0.3, float32 compute, 2 nodes x 8 GPUs of 64.
`:smoke` shrinks it to a few CPU steps on the built-in data.
"""

from dino_jax.config import apply_variants, imagenet_config


def get_config(arg=None):
    c = imagenet_config()
    c.arch, c.patch_size = "vit_base", 16
    c.clip_grad = 0.3
    c.dtype = "float32"
    c.batch_size = 1024
    return apply_variants(c, arg)
