"""DINO ViT-B/8 on ImageNet (released weights: 77.4% k-NN, 80.1% linear).

    python -m dino_jax.train --config configs/vit_base8.py --workdir gs://BUCKET/dino/vitb8 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ViT-B/16's settings (clip 0.3) with patch 8. `:smoke` shrinks it to a few CPU steps on the
built-in data.

Sized for a TPU v5p-32 (16 chips, 64 images per chip at batch 1024) with `compute.remat="block"`:
compiled there, it leaves HBM to spare, where a v4-32 with the same remat falls under the bar of
10% of HBM free (BENCHMARKS.md, 'TPU and GPU programs: compiled per recipe').
Launch (launch/README.md):

    NAME=dino-vitb8 ZONE=us-east5-a TYPE=v5p-32 RUNTIME=v2-alpha-tpuv5 \\
        CONFIG=configs/vit_base8.py WORKDIR=gs://BUCKET/dino/vitb8 \\
        launch/tpu/run_with_restarts.sh --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from dino_jax.core.config import apply_variants, imagenet_config


def get_config(arg=None):
    c = imagenet_config()
    c.student.arch, c.student.patch_size = "vit_base", 8
    c.optim.clip_grad = 0.3
    c.train.batch_size = 1024
    # 64 images of 785-token crops per chip need it even on a v5p: without it XLA asks for more
    # temporaries than the chip's HBM (BENCHMARKS.md). Recomputing the blocks adds FLOPs.
    c.compute.remat = "block"
    return apply_variants(c, arg)
