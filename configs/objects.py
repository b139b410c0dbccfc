"""DINO's emerging properties on a laptop: after minutes, not hours, on a 2-core CPU the teacher's
attention finds the objects of held-out `synthetic:objects` scenes (Caron et al. 2021, Fig. 1
and the Jaccard index of Table 4), and its features classify them by k-NN.

    python -m dino_jax.train --config configs/objects.py --workdir runs/objects

A ViT of depth 4 and width 128 with 8-px patches learns for 600 steps of 64 images (2x64 + 6x32
px crops of the 128-px scenes). Before training, every 150 steps and after the last, it logs the
teacher's k-NN top-1 on the 10 object classes and the Jaccard index of its 60%-mass attention
masks on 300 held-out scenes, and draws WORKDIR/figures/attention_<step>.png (each head's map and
the masks on 4 scenes) and monitors.png (both figures over the steps). BENCHMARKS.md ('CPU:
attention that finds the objects') records the run's time, k-NN and Jaccard. The DINO maths are
the reference's; what makes it work in minutes is the data, where the object is what recurs
across images (data/objects.py), and a short-run teacher (momentum 0.99) with a small head
(out_dim 1024). `:smoke` shrinks it to a few steps with the monitors on.
"""

from dino_jax.core.config import apply_variants, base_config, smoke


def get_config(arg=None):
    c = base_config()
    c.student.arch, c.student.patch_size, c.student.img_size = "vit_small", 8, 64
    c.student.embed_dim, c.student.depth, c.student.num_heads = 128, 4, 4
    c.student.drop_path_rate = 0.1
    c.dino.head_n_prototypes = 1024
    c.data.source = "synthetic:objects"
    c.crops.global_crops_size, c.crops.local_crops_size = 64, 32
    c.data.blur_sigma = (0.1, 0.6)  # the reference's range scaled from 224-px to 64-px crops
    c.data.eval_resize_size, c.data.eval_crop_size = 64, 64  # the whole scene
    c.crops.local_crops_number = 6
    c.data.num_workers = 1
    c.train.batch_size = 64
    # Schedule epochs of 30 steps (one pass over the 20,000 scenes is ~300 steps).
    c.optim.epochs = 20
    c.train.OFFICIAL_EPOCH_LENGTH = 30
    c.optim.warmup_epochs = 1
    c.optim.lr = 2e-3
    c.optim.min_lr = 1e-5
    c.optim.freeze_last_layer_epochs = 1
    c.teacher.momentum_teacher = 0.99  # a short run: the teacher must follow the student faster
    c.checkpoint.every_steps = 100
    c.log.every_steps = 10
    c.eval.knn_every_steps = 150
    c.eval.knn_train_examples = 2000
    c.eval.knn_val_examples = 500
    c.eval.jaccard_examples = 300
    c.eval.figure_scenes = 4
    c.eval.batch_size = 100
    return apply_variants(c, arg, {"smoke": _smoke})


def _smoke(c):
    """The generic few-step shrink, on this recipe's scenes, with both monitors on."""
    c = smoke(c)
    c.data.source = "synthetic:objects"
    c.eval.knn_every_steps, c.eval.jaccard_examples, c.eval.figure_scenes = 2, 16, 2
    return c
