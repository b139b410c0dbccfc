"""DINO ResNet-50 on ImageNet (released weights: 67.5% k-NN, 75.3% linear).

    python -m dino_jax.train --config configs/resnet50.py --workdir gs://BUCKET/dino/rn50 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

The reference's ResNet recipe: SGD, lr 0.03, constant weight decay 1e-4, global crops scale
(0.14, 1), local crops scale (0.05, 0.14); BatchNorm statistics over the global batch.
`:smoke` shrinks it to a few CPU steps on the built-in data.

Sized for a TPU v5e-16 (16 chips, 32 images per chip at batch 512): compiled there, it leaves
HBM to spare (BENCHMARKS.md, 'TPU and GPU programs: compiled per recipe').
Launch (launch/README.md; v5e's accelerator type is `v5litepod-16`):

    NAME=dino-rn50 ZONE=us-west4-a TYPE=v5litepod-16 RUNTIME=v2-alpha-tpuv5-lite \\
        CONFIG=configs/resnet50.py WORKDIR=gs://BUCKET/dino/rn50 \\
        launch/tpu/run_with_restarts.sh --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from dino_jax.core.config import apply_variants, imagenet_config


def get_config(arg=None):
    c = imagenet_config()
    c.student.arch = "resnet50"
    c.optim.optimizer = "sgd"
    c.optim.lr = 0.03
    c.optim.weight_decay = c.optim.weight_decay_end = 1e-4
    c.crops.global_crops_scale = (0.14, 1.0)
    c.crops.local_crops_scale = (0.05, 0.14)
    c.train.batch_size = 512
    return apply_variants(c, arg)
