"""DINO ViT-B/8 on ImageNet (released weights: 77.4% k-NN, 80.1% linear).

    python -m dino_jax.train --config configs/vit_base8.py --workdir gs://BUCKET/dino/vitb8 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ViT-B/16's settings (clip 0.3) with patch 8. `:smoke` shrinks it to a few CPU steps on the
built-in data.
"""

from dino_jax.config import apply_variants, imagenet_config


def get_config(arg=None):
    c = imagenet_config()
    c.arch, c.patch_size = "vit_base", 8
    c.clip_grad = 0.3
    c.batch_size = 1024
    return apply_variants(c, arg)
