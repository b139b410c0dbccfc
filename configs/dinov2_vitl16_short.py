"""DINOv2 ViT-L/16 on ImageNet-1k, the official `vitl16_short` (dinov2/configs/train/
vitl16_short.yaml: "the default config"): 100 epochs of 1250 iterations of 64 images per GPU on
32 GPUs (batch 2048), DINO + iBOT (shared head, 65536 prototypes) + KoLeo, softmax centering,
uniform stochastic depth 0.3, LayerScale 1e-5, lr 0.004 x sqrt(2048 / 1024), layer-wise decay
0.9, 2 x 224 + 8 x 96 px crops. The official reports 82.0% k-NN and 84.5% linear on ImageNet-1k
for this run.

    python -m dino_jax.train --config configs/dinov2_vitl16_short.py \\
        --workdir gs://BUCKET/dinov2/vitl16_short \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Sized for a TPU v5p-64 (32 chips): 64 images per chip, as per GPU in the official (so KoLeo,
the masks and the iBOT center see the same 64 images), bfloat16, `compute.remat="block"`.
Compiled there it leaves HBM to spare (BENCHMARKS.md, 'DINOv2 programs'). `:smoke` shrinks it
to a few CPU steps on the built-in data. Launch (launch/README.md):

    NAME=dinov2-vitl16 ZONE=us-east5-a TYPE=v5p-64 RUNTIME=v2-alpha-tpuv5 \\
        CONFIG=configs/dinov2_vitl16_short.py WORKDIR=gs://BUCKET/dinov2/vitl16_short \\
        launch/tpu/run_with_restarts.sh --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from dino_jax.core.config import apply_variants, dinov2_config, imagenet_config


def get_config(arg=None):
    c = imagenet_config(dinov2_config())  # ViT-L/16, the official default
    c.train.batch_size, c.train.rank_batch_size = 2048, 64
    c.compute.remat = "block"
    c.eval.knn_every_steps = 12500  # the official evaluation.eval_period_iterations
    return apply_variants(c, arg)
