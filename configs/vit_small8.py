"""DINO ViT-S/8 on ImageNet (released weights: 78.3% k-NN, 79.7% linear).

    python -m dino_jax.train --config configs/vit_small8.py --workdir gs://BUCKET/dino/vits8 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Patch 8 quadruples the tokens of ViT-S/16: the reference's defaults otherwise. `:smoke` shrinks it
to a few CPU steps on the built-in data.
"""

from dino_jax.config import apply_variants, base_config


def get_config(arg=None):
    c = base_config()
    c.arch, c.patch_size = "vit_small", 8
    c.data.source, c.data.eval_split = "tfds:imagenet2012", "validation"
    c.data.num_workers = 16
    c.batch_size = 512
    c.dtype = "bfloat16"
    c.eval.knn_every_steps = 25000
    return apply_variants(c, arg)
