"""DINOv2 on a laptop: a small DINOv2 (DINO + iBOT + KoLeo, softmax centering) learns from the
built-in `synthetic:objects` scenes in minutes on a 2-core CPU; the k-NN of its teacher and the
segmentation of a linear probe of its patch features rise from initialisation.

    python -m dino_jax.train --config configs/dinov2_demo.py --workdir runs/dinov2_demo

A DINOv2 ViT of depth 4 and width 128 with 8-px patches learns for 450 steps of 64 images (2x64
+ 6x32 px crops of the 128-px scenes, half of the global crops masked for iBOT). Before training,
every 150 steps and after the last, it logs the teacher's k-NN top-1 on the 10 object classes, the
Jaccard index of a linear probe of its patch features (fitted on 150 held-out scenes, scored on
150 others) and that of its attention masks. BENCHMARKS.md ('CPU: DINOv2 on a laptop') records
the run. The losses, the parameter groups and the schedules' shapes are DINOv2's
(`dino_jax.core.config.dinov2_config`); what is shrunk is the model, the crops, the head and the
schedules' lengths, and two values are those of a short run: LayerScale starts at 1 (the hub
models' value; DINOv2's 1e-5 leaves the blocks all but silent for the few hundred steps of a
demo, and the teacher's targets stay uniform) and the teacher's temperature stays at 0.04 (DINO's
default). `:smoke` shrinks it to a few steps.
"""

from dino_jax.core.config import apply_variants, dinov2_config, smoke


def get_config(arg=None):
    c = dinov2_config()
    s = c.student
    s.arch, s.patch_size, s.img_size = "dinov2_vit_small", 8, 64
    s.embed_dim, s.depth, s.num_heads = 128, 4, 4
    s.drop_path_rate, s.layerscale = 0.1, 1.0
    c.dino.head_n_prototypes = 1024
    c.data.source = "synthetic:objects"
    c.crops.global_crops_size, c.crops.local_crops_size = 64, 32
    c.data.blur_sigma = (0.1, 0.6)  # the reference's range scaled from 224-px to 64-px crops
    c.data.eval_resize_size, c.data.eval_crop_size = 64, 64  # the whole scene
    c.crops.local_crops_number = 6
    c.data.num_workers = 1
    c.train.batch_size = 64
    # Schedule epochs of 30 steps (one pass over the 20,000 scenes is ~300 steps).
    c.optim.epochs = 15
    c.train.OFFICIAL_EPOCH_LENGTH = 30
    c.optim.warmup_epochs = 1
    c.optim.lr = 2e-3  # times sqrt(64 / 1024): 5e-4
    c.optim.min_lr = 1e-5
    c.optim.freeze_last_layer_epochs = 1
    c.teacher.teacher_temp = 0.04
    c.teacher.warmup_teacher_temp_epochs = 0
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
