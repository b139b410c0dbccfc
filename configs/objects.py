"""DINO's emerging properties on a laptop: the teacher's attention finds the objects of the
built-in `synthetic:objects` scenes (Caron et al. 2021, Sec. 4.2 and Fig. 1) after about an hour
on a 2-core CPU.

    python -m dino_jax.train --config configs/objects.py --workdir runs/objects
"""

from dino_jax.config import apply_variants, base_config


def get_config(arg=None):
    c = base_config()
    c.arch, c.patch_size, c.img_size = "vit_small", 8, 64
    c.embed_dim, c.depth, c.num_heads = 128, 4, 4
    c.drop_path_rate = 0.1
    c.out_dim = 4096
    c.data.source = "synthetic:objects"
    c.data.global_crop_size, c.data.local_crop_size = 64, 32
    c.data.blur_sigma = (0.1, 0.6)  # the reference's range scaled from 224-px to 64-px crops
    c.data.eval_resize_size, c.data.eval_crop_size = 64, 64  # the whole scene
    c.local_crops_number = 6
    c.data.num_workers = 1
    c.batch_size = 64
    c.epochs = 10
    c.steps_per_epoch = 30
    c.warmup_epochs = 1
    c.lr = 1e-3
    c.min_lr = 1e-5
    c.freeze_last_layer = 1
    c.momentum_teacher = 0.99
    c.checkpoint.every_steps = 100
    c.log.every_steps = 10
    c.eval.knn_every_steps = 0
    c.eval.knn_train_examples = 5000
    c.eval.knn_val_examples = 1000
    c.eval.batch_size = 250
    return apply_variants(c, arg)
