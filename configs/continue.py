"""Continue pretraining from released weights on your own images, without losing what they know.

    python -m dino_jax.train --config configs/continue.py --workdir runs/mine \\
        --config.data.source=folder:/data/mine \\
        --config.train.init_checkpoint=dino_deitsmall16_pretrain.pth

    python -m dino_jax.train --config configs/continue.py:dinov2 --workdir runs/mine2 \\
        --config.data.source=folder:/data/mine \\
        --config.train.init_checkpoint=dinov2_vits14_pretrain.pth

`:dino` (the default) continues a DINO ViT-S/16 (dino_deitsmall16_pretrain.pth); `:dinov2` a
DINOv2 ViT-S/14 (dinov2_vits14_pretrain.pth, a Hugging Face directory, or any dino_jax export).
For another size set --config.student.arch (vit_base, dinov2_vit_base, ...) and patch_size to the
file's: a file of another model is refused in one line naming what differs.

1. What starts where. The released files hold the backbone only: student and teacher start from
   it, the heads and the centers are new. New heads send random gradients into the backbone, and
   a teacher made of those heads gives near-random targets: started that way the backbone forgets
   much of what it knew in the first thousand steps (facebookresearch/dinov2 issue #204: k-NN
   ~80% -> ~10%). So the backbone stays frozen for `optim.freeze_backbone_epochs` (2 here) while
   the heads and the centers settle on it (no update, no weight decay, no Adam moments); then
   everything trains on the recipe's schedules, from an lr warm-up. Measured on the built-in data
   (BENCHMARKS.md): without the warm-up a run forgot 11 points of k-NN in 120 steps and warned of
   a collapse; the frozen start kept the most, and adapted slowest where the weights fit poorly.

2. Length, for N images (what counts is the images seen, iterations x batch): 10k images, 100-200
   epochs; 100k, 30-50; 1M, 5-10. The warm-up (`optim.warmup_epochs`) should end a few epochs
   after the freeze; `optim.freeze_last_layer_epochs` stays 1. `train.OFFICIAL_EPOCH_LENGTH`
   sets iterations per epoch where the dataset is too small for a meaningful epoch.

3. Learning rate: half the from-scratch value (facebookresearch/dinov2 issue #143): the weights
   are already good and a large step undoes them. `optim.lr` is for the scaling rule's reference
   batch and is scaled to `train.batch_size` (global) for you.

4. Small batches (32-256, 1-8 GPUs or a TPU v4-8 / v5e-8; `:batch32`, `:batch64`, `:batch256`
   beside the default 128). The teacher follows a noisier student more slowly: teacher momentum
   0.9995 at 256 or fewer (main_dino.py's advice for 256; facebookresearch/dino issue #104), Adam's
   beta2 0.99 (dinov2 issue #143), stochastic depth 0.1. Below 64 images, keep KoLeo's images per
   rank (train.rank_batch_size) at 8 or more for DINOv2.

5. What to watch: the k-NN monitor (`knn_top1`, every `eval.knn_every_steps`, on your labelled
   val/ split) should hold during the freeze and rise after it. A collapse warning in the log
   (targets near uniform, or on a few prototypes) names what to change; `teacher_entropy` and
   `teacher_kl_uniform` in metrics.jsonl show the same.

`:smoke` shrinks the recipe to a few CPU steps on the built-in data.
"""

from dino_jax.core.config import apply_variants, base_config, dinov2_config


def _common(c):
    c.data.source = "folder:/path/to/images"  # read only when training starts
    c.data.split, c.data.eval_split = "train", "val"
    c.data.num_workers = 8
    c.data.augment_on_device = c.method == "dino"
    c.compute.dtype = "bfloat16"
    c.train.batch_size = 128
    c.optim.epochs, c.optim.warmup_epochs = 50, 5
    c.optim.freeze_backbone_epochs, c.optim.freeze_last_layer_epochs = 2, 1
    c.optim.lr /= 2
    c.optim.adamw_beta2 = 0.99
    c.teacher.momentum_teacher = 0.9995
    c.student.drop_path_rate = 0.1
    c.eval.knn_every_steps = 2000
    return c


def dino():
    c = base_config()
    c.student.arch, c.student.patch_size = "vit_small", 16
    return _common(c)


def dinov2():
    c = dinov2_config()
    c.student.arch, c.student.patch_size = "dinov2_vit_small", 14
    c.student.img_size = 518  # the released models' position embedding: 37 x 37 patches
    c.crops.local_crops_size = 98
    c.train.rank_batch_size = 16  # KoLeo and the masks per 16 images, on any number of devices
    c.teacher.warmup_teacher_temp_epochs = 5
    return _common(c)


def batch(size):
    def variant(c):
        c.train.batch_size = size
        if c.method == "dinov2":
            c.train.rank_batch_size = min(16, size)
        return c

    return variant


def get_config(arg=None):
    names = (arg or "").split(",")
    c = dinov2() if "dinov2" in names else dino()
    rest = ",".join(n for n in names if n not in ("dino", "dinov2"))
    variants = {f"batch{b}": batch(b) for b in (32, 64, 256)}
    return apply_variants(c, rest or None, variants)
