"""The demo: DINO on the built-in `synthetic:textures` data, sized for minutes on a 2-core CPU.

    python -m dino_jax.train --config configs/demo.py --workdir runs/demo

A ViT of depth 4 and width 128 with 8-px patches learns from 64-px global and 32-px local crops of
128-px texture fields; the k-NN accuracy of its teacher on held-out images (10 texture classes) is
printed before and after training. `make demo` runs exactly this; `:smoke` shrinks it to a few
steps. Every crop of a texture field shows its class, which is what DINO needs to learn classes
in minutes; the object scenes of `synthetic:shapes` (with masks, for attention maps) need a far
longer run. BENCHMARKS.md ('CPU: the demo') records its time and k-NN on the CPUs it ran on.
"""

from dino_jax.core.config import apply_variants, base_config


def get_config(arg=None):
    c = base_config()
    c.student.arch, c.student.patch_size, c.student.img_size = "vit_small", 8, 64
    c.student.embed_dim, c.student.depth, c.student.num_heads = 128, 4, 4
    c.student.drop_path_rate = 0.1
    c.dino.head_n_prototypes = 4096
    c.data.source = "synthetic:textures"
    c.crops.global_crops_size, c.crops.local_crops_size = 64, 32
    c.data.blur_sigma = (0.1, 0.6)  # the reference's range scaled from 224-px to 64-px crops
    c.data.eval_resize_size, c.data.eval_crop_size = 72, 64
    c.crops.local_crops_number = 6
    c.data.num_workers = 1
    c.train.batch_size = 64
    # Schedule epochs of 30 steps (the data has 20,000 images: one pass ~ 300 steps).
    c.optim.epochs = 10
    c.train.OFFICIAL_EPOCH_LENGTH = 30
    c.optim.warmup_epochs = 1
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-5
    c.optim.freeze_last_layer_epochs = 1
    c.teacher.momentum_teacher = 0.99  # a short run: the teacher must follow the student faster
    c.checkpoint.every_steps = 100
    c.log.every_steps = 10
    c.eval.knn_every_steps = 0  # before and after training
    c.eval.knn_train_examples = 5000
    c.eval.knn_val_examples = 1000
    c.eval.batch_size = 250
    return apply_variants(c, arg)
