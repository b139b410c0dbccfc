"""DINO ViT-S/16 on your own images, on one machine: 1-8 GPUs or a small TPU slice (v4-8, v5e-8).

1. Lay the images out as an ImageFolder, one sub-folder per class under train/ and val/:

       /data/pets/train/cat/0001.jpg ...   /data/pets/train/dog/...
       /data/pets/val/cat/0107.jpg ...     /data/pets/val/dog/...

   DINO itself ignores the labels; the k-NN monitor uses them (train/ as its memory, val/ as its
   queries). A gs:// folder works too. Then point the recipe at the root:

       python -m dino_jax.train --config configs/custom.py --workdir runs/pets \\
           --config.data.source=folder:/data/pets --config.optim.epochs=300 \\
           --config.optim.warmup_epochs=30

2. Choose the length from the number of images N. What counts is the iterations (steps) and the
   images seen (iterations x batch), not epochs: the paper's 100 ImageNet epochs are 128M images
   seen, 125k iterations at batch 1024, more than a small dataset needs to start with. The rule
   here: aim for ~30M images seen (epochs ~ 30M / N), at most 1000 epochs, with ~10% of the run
   as lr warm-up and ~1% with the last layer frozen. At batch 256:

       images | epochs | steps/epoch | iterations | images seen | warmup_epochs | freeze_last_layer
       10k    |  1000  |      39     |     39k    |     10M     |      100      |        10
       100k   |   300  |     390     |    117k    |     30M     |       30      |         3
       1M     |    30  |    3906     |    117k    |     30M     |        3      |         1

   The defaults below are the 100k row; at batch 128 (`:1gpu`) the same epochs take twice the
   iterations, for the same images seen. Pass the others as --config.optim.epochs=...
   --config.optim.warmup_epochs=... --config.optim.freeze_last_layer_epochs=... The lr,
   weight-decay and teacher-momentum schedules are laid out over the whole run, so fix its
   length before starting: a resumed run must keep the epochs it started with.

3. Batch, learning rate, teacher momentum. `train.batch_size` is global: 256 here, the batch for
   which the reference's main_dino.py (its --momentum_teacher help) recommends teacher momentum
   0.9995 instead of its default 0.996 (the paper's batch is 1024; see also facebookresearch/dino
   issue #104 on small-batch training): a slower teacher for the noisier small-batch student. Keep
   0.9995 (or go higher) if you lower the batch. The lr scales with the batch as in main_dino.py (lr
   * batch_size / 256), done for you: `optim.lr` stays 0.0005, the value for a batch of 256.

4. Devices. The batch is split evenly over all devices, so the same recipe runs on 1 to 8 GPUs
   or a TPU v4-8 / v5e-8. Compiled for H100s (`benchmark compile --target h100x8`, batch 8x),
   the step at 256 images per GPU fits in what JAX reserves of one 80 GB GPU (75% of it, 56 GiB,
   by default), and easily 8 GPUs (32 each) or a v4-8 (64 per chip, as `vit_small16.py:boosted` on
   v4). On one GPU of less than 80 GB, use `configs/custom.py:1gpu`: batch 128 and the ViT
   blocks recomputed in the backward pass (compute.remat="block": more FLOPs, far less memory); on a
   24 GB GPU add --config.train.batch_size=64. The memory and FLOPs are in BENCHMARKS.md ('TPU and
   GPU programs: compiled per recipe').

5. The input pipeline: `data.num_workers` processes (8 here) decode and crop; the photometric
   augmentations run on the accelerator (`data.augment_on_device`). Measure what one core does
   on your files with this configuration:

       python -m dino_jax.benchmark data --config configs/custom.py \\
           --config.data.source=folder:/data/pets

   and give the loader about (the step's images/s, in the training log) / (that figure) workers,
   within the machine's cores.

6. What k-NN to expect: it depends on the data, and no figure from ImageNet carries over (ViT-S/16
   there: 69.3% after 100 epochs). Watch the k-NN monitor (`knn_top1` in metrics.jsonl and
   TensorBoard, every `eval.knn_every_steps`): it starts from the random teacher's figure at step
   0, usually above chance already, and should climb well past it; when it stops climbing,
   a longer run will not help much. It needs class sub-folders; set eval.knn_every_steps=None to
   train on unlabelled images.

`:smoke` shrinks the recipe to a few CPU steps on the built-in data.
"""

from dino_jax.core.config import apply_variants, base_config


def one_gpu(c):
    # Half the batch (the lr follows it) and each ViT block recomputed in the backward pass: a
    # fraction of the default's memory on one GPU (BENCHMARKS.md). The teacher keeps the
    # small-batch momentum.
    c.train.batch_size = 128
    c.compute.remat = "block"
    return c


def get_config(arg=None):
    c = base_config()
    c.student.arch, c.student.patch_size = "vit_small", 16
    # Read only when training starts: the recipe loads without the folder.
    c.data.source = "folder:/path/to/images"
    c.data.split, c.data.eval_split = "train", "val"
    c.data.num_workers = 8
    c.data.augment_on_device = True  # the host's CPU is the scarce part on one machine
    c.compute.dtype = "bfloat16"
    c.train.batch_size = 256
    c.teacher.momentum_teacher = 0.9995  # main_dino.py's advice for batch 256 (0.996 is for 1024)
    # The 100k-image row of the table above.
    c.optim.epochs, c.optim.warmup_epochs, c.optim.freeze_last_layer_epochs = 300, 30, 3
    c.eval.knn_every_steps = 5000
    return apply_variants(c, arg, {"1gpu": one_gpu})
