"""DINO ViT-S/16 on ImageNet, the reference's default run (100 epochs: 69.3% k-NN, 74.0% linear).

    python -m dino_jax.train --config configs/vit_small16.py --workdir gs://BUCKET/dino/vits16 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Variants: `configs/vit_small16.py:boosted` is the 300-epoch recipe (teacher temperature 0.07 after
30 warm-up epochs, trainable last-layer norm; 73.3% k-NN, 76.0% linear); `:smoke` shrinks it to a
few CPU steps on the built-in data. `train.batch_size` is global: the reference's 64 per GPU x 8
GPUs.

Sized for a TPU v4-32 (16 chips): 32 images per chip at batch 512, 64 per chip for `:boosted` at
1024; compiled there, both leave HBM to spare (BENCHMARKS.md, 'TPU and GPU programs: compiled
per recipe'). Launch (launch/README.md):

    NAME=dino-vits16 ZONE=us-central2-b TYPE=v4-32 RUNTIME=tpu-ubuntu2204-base \\
        CONFIG=configs/vit_small16.py WORKDIR=gs://BUCKET/dino/vits16 \\
        launch/tpu/run_with_restarts.sh --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from dino_jax.core.config import apply_variants, imagenet_config


def boosted(c):
    c.optim.epochs = 300
    c.teacher.teacher_temp = 0.07
    c.teacher.warmup_teacher_temp_epochs = 30
    c.dino.norm_last_layer = False
    c.train.batch_size = 1024  # 64 per GPU x 16 GPUs
    return c


def get_config(arg=None):
    c = imagenet_config()
    c.student.arch, c.student.patch_size = "vit_small", 16
    c.train.batch_size = 512
    return apply_variants(c, arg, {"boosted": boosted})
