"""The base configuration (the reference's defaults) and its validation.

Recipe files in `configs/` start from `base_config()` and change what their recipe changes.
Keys keep the names of the reference's `main_dino.py` arguments; `batch_size` is the GLOBAL
batch (the reference's is per GPU).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Sequence

import ml_collections

from dino_jax.models import ARCHS, REMATS, VIT_ARCHS

OPTIMIZERS = ("adamw", "sgd", "lars")
CLIP_MODES = ("per_tensor", "total_norm")
DTYPES = ("float32", "bfloat16")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")


def base_config() -> ml_collections.ConfigDict:
    """The reference's defaults (main_dino.py: get_args_parser): ViT-S/16, 100 epochs, AdamW, 2
    global + 8 local crops."""
    c = ml_collections.ConfigDict()
    # The method the generic step runs (dino_jax.methods): "dino".
    c.method = "dino"
    # Model.
    c.arch = "vit_small"
    c.patch_size = 16
    c.img_size = 224  # the resolution pos_embed is built for; other crop sizes interpolate it
    c.drop_path_rate = 0.1
    # ViT size overrides (0 keeps the arch's): for small experiments and tests.
    c.embed_dim = 0
    c.depth = 0
    c.num_heads = 0
    c.out_dim = 65536
    c.norm_last_layer = True
    c.use_bn_in_head = False
    c.head_nlayers = 3
    c.head_hidden_dim = 2048
    c.head_bottleneck_dim = 256
    # Loss.
    c.student_temp = 0.1
    c.warmup_teacher_temp = 0.04
    c.teacher_temp = 0.04
    c.warmup_teacher_temp_epochs = 0
    c.center_momentum = 0.9
    # Optimisation.
    c.optimizer = "adamw"
    c.batch_size = 512  # global
    c.epochs = 100
    c.steps_per_epoch = 0  # 0: derived from the dataset size (drop_last)
    c.lr = 5e-4  # for a global batch of 256; scaled linearly
    c.min_lr = 1e-6
    c.warmup_epochs = 10
    c.weight_decay = 0.04
    c.weight_decay_end = 0.4
    c.clip_grad = 3.0  # 0 disables clipping
    # "per_tensor" clips each gradient tensor to clip_grad (main_dino.py: utils.clip_gradients);
    # "total_norm" each sub-network's gradients (backbone, head) by their joint norm (DINOv2).
    c.clip_mode = "per_tensor"
    # Parameter groups beyond the method's own (dino_jax.core.optim.ParamRule): (path pattern,
    # lr multiplier, weight-decay multiplier, frozen epochs) tuples; every matching rule applies.
    c.param_groups = ()
    # Layer-wise lr decay (DINOv2's layerwise_decay): block i of a depth-L ViT gets lr times
    # rate^(L - i), the embeddings rate^(L + 1); 1.0 is off. The patch embedding's lr is further
    # times patch_embed_lr_mult.
    c.layerwise_decay = 1.0
    c.patch_embed_lr_mult = 1.0
    c.freeze_last_layer = 1
    c.momentum_teacher = 0.996
    c.seed = 0
    # Multi-crop.
    c.global_crops_scale = (0.4, 1.0)
    c.local_crops_number = 8
    c.local_crops_scale = (0.05, 0.4)
    c.data = ml_collections.ConfigDict()
    # or "synthetic:textures", "tfds:imagenet2012", "folder:/path/to/images"
    c.data.source = "synthetic:shapes"
    c.data.split = "train"
    c.data.data_dir = ""  # tfds data_dir ("" = tfds default)
    c.data.global_crop_size = 224
    c.data.local_crop_size = 96
    c.data.blur_sigma = (0.1, 2.0)  # Gaussian blur range in output pixels; scale it with the crops
    # True: the host only crops, resizes and flips (uint8); colour jitter, grayscale, blur,
    # solarize and normalisation run inside the train step (device_augment.py).
    c.data.augment_on_device = False
    c.data.num_workers = 0  # grain worker processes (0: decode and augment in the main process)
    c.data.num_threads = 4  # threads per process preparing batches (OpenCV and PIL free the GIL)
    c.data.prefetch_batches = 4  # batches prepared ahead, per process
    c.data.eval_split = "val"
    # The k-NN monitor's queries: "" takes data.source, read with data.eval_split. A folder:ROOT
    # holding train/ and val/ has its splits there; a folder without them is one split, so its
    # queries need a source of their own (the monitor refuses queries that sit in its memory).
    c.data.eval_source = ""
    c.data.eval_resize_size = 256
    c.data.eval_crop_size = 224
    # Checkpoints, logs and the k-NN monitor.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    # Resuming with other epochs, steps_per_epoch or batch_size is refused (the schedules would
    # jump); True resumes anyway and follows the new lengths' schedules from the saved step.
    c.checkpoint.replan_schedules = False
    # Weights a NEW run starts from (step 0, fresh optimizer): an official .pth (full training
    # checkpoint or backbone), a dino_jax export or workdir. A checkpoint in --workdir wins.
    c.init_checkpoint = ""
    # Where compiled programs persist (relative: under the workdir; "": nowhere), so that a rerun
    # after preemption loads its programs instead of compiling them again.
    c.compilation_cache_dir = "compilation_cache"
    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10  # metrics to metrics.jsonl and TensorBoard
    c.eval = ml_collections.ConfigDict()
    c.eval.knn_every_steps = 0  # 0: k-NN of the teacher only before and after training; -1: never
    # Seeded, class-balanced samples of the whole split (data.sources.sample_indices).
    c.eval.knn_train_examples = 10000  # labelled examples of data.split as the k-NN memory
    c.eval.knn_val_examples = 2000  # examples of data.eval_split (of data.eval_source) to classify
    c.eval.knn_k = 20
    # The attention monitor (eval/attention_monitor.py), beside the k-NN monitor: the Jaccard
    # index of the teacher's attention masks on this many held-out scenes with true masks (0:
    # off), and WORKDIR/figures/attention_<step>.png with the maps of the first figure_scenes.
    c.eval.jaccard_examples = 0
    c.eval.figure_scenes = 4
    c.eval.batch_size = 256
    # Devices: mesh axes (name, size); -1 takes the remaining devices.
    c.mesh = (("data", -1), ("fsdp", 1))
    c.dtype = "float32"  # matmul compute dtype; params, softmax, loss and EMAs stay float32
    # ViT blocks recomputed in the backward pass to save memory: "none", "block" (keep each
    # block's input only) or "dots_saveable" (keep the matmul outputs, recompute the rest).
    c.remat = "none"
    # The platform the step is built for: "auto" takes it from the mesh's devices; "cpu", "gpu"
    # or "tpu" name it (a step compiled ahead of time for other devices takes theirs).
    c.platform = "auto"
    # On CPU meshes, dino_jax.cpu's tuned layers (written-out gradients, the C++ attention kernel
    # built on first use with the host's g++) and host-memory reuse. False: stock Flax layers,
    # as on accelerators. Ignored elsewhere.
    c.cpu_tuning = True
    # The student's forward and backward as this many independent sub-batches of images (every
    # chunks-th image, so each device keeps its own): the same loss and gradient, with drop-path
    # masks drawn per chunk. XLA:CPU runs each operation on one core and overlaps independent
    # ones, so 2 keeps a 2-core CPU busier; leave 1 on accelerators.
    c.student_chunks = 1
    return c


def imagenet_config() -> ml_collections.ConfigDict:
    """`base_config()` on tfds:imagenet2012 (ArrayRecord) with accelerator-sized settings: the
    common ground of the paper's recipes."""
    c = base_config()
    c.data.source, c.data.eval_split = "tfds:imagenet2012", "validation"
    c.data.num_workers = 16
    c.dtype = "bfloat16"
    c.eval.knn_every_steps = 25000
    return c


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any recipe to a few CPU steps on the built-in data, keeping its arch family and
    optimizer: the `:smoke` variant every recipe accepts."""
    c = config
    if c.arch in VIT_ARCHS:
        c.embed_dim, c.depth, c.num_heads = 64, 2, 4
    c.out_dim, c.head_hidden_dim, c.head_bottleneck_dim = 256, 256, 64
    c.data.source, c.data.split, c.data.eval_split = "synthetic:shapes", "train", "val"
    c.data.eval_source = ""
    c.data.global_crop_size, c.data.local_crop_size = 2 * c.patch_size, c.patch_size
    c.data.eval_resize_size, c.data.eval_crop_size = 2 * c.patch_size + 8, 2 * c.patch_size
    c.data.num_workers = 0
    c.local_crops_number = min(c.local_crops_number, 2)
    c.batch_size, c.epochs, c.steps_per_epoch = 8, 1, 4
    c.warmup_epochs = c.warmup_teacher_temp_epochs = c.freeze_last_layer = 0
    c.checkpoint.every_steps, c.log.every_steps = 2, 1
    c.eval.knn_every_steps, c.eval.knn_train_examples, c.eval.knn_val_examples = -1, 64, 32
    c.eval.batch_size = 16
    return c


def apply_variants(
    config: ml_collections.ConfigDict, arg: str | None, variants: dict | None = None
) -> ml_collections.ConfigDict:
    """Apply comma-separated variants (`recipe.py:boosted,smoke`): the recipe's own and `smoke`."""
    table = {"smoke": smoke, **(variants or {})}
    for name in filter(None, (arg or "").split(",")):
        if name not in table:
            raise ValueError(f"Unknown config variant {name!r}; choose from {', '.join(table)}.")
        config = table[name](config)
    return config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`configs/recipe.py[:variants]` -> its config, as `--config` loads it (notebooks, tests)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("dino_jax_recipe", path)
    if module_spec is None:
        raise FileNotFoundError(f"No recipe file at {path!r}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def unknown_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> list[str]:
    """One message per `--config.KEY=...` of `argv` whose KEY the config lacks, naming the
    nearest keys it has."""
    known = _dotted_keys(config)
    messages = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].partition("=")[0]
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(near)}?" if near else "see dino_jax/core/config.py"
            messages.append(f"Unknown config key {key!r} in {arg!r}: {hint}")
    return messages


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_dotted_keys(value, f"{prefix}{name}."))
    return keys


def crops_summary(config: ml_collections.ConfigDict) -> str:
    """The multi-crop of `config` in words, e.g. "2x224 + 10x96"."""
    g, l, n = config.data.global_crop_size, config.data.local_crop_size, config.local_crops_number
    return f"2x{g}" + (f" + {n}x{l}" if n else "")


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Iterations per epoch; set by the train loop from the dataset when the recipe leaves 0."""
    if config.steps_per_epoch <= 0:
        raise ValueError(
            f"steps_per_epoch={config.steps_per_epoch}: set it to the number of iterations per "
            "epoch (dataset size // batch_size) before building the train step."
        )
    return int(config.steps_per_epoch)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks the values that would otherwise fail deep inside compilation, naming the key."""
    _check_choice("arch", config.arch, ARCHS)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("clip_mode", config.clip_mode, CLIP_MODES)
    _check_choice("dtype", config.dtype, DTYPES)
    _check_choice("remat", config.remat, REMATS)
    _check_choice("platform", config.platform, PLATFORMS)
    if config.arch in VIT_ARCHS:
        sizes = {
            "img_size": config.img_size,
            "data.global_crop_size": config.data.global_crop_size,
            "data.local_crop_size": config.data.local_crop_size,
        }
        for key, size in sizes.items():
            if size % config.patch_size:
                raise ValueError(
                    f"{key}={size} is not divisible by patch_size={config.patch_size}: "
                    f"choose a size that is a multiple of {config.patch_size}."
                )
        if config.embed_dim and config.num_heads and config.embed_dim % config.num_heads:
            raise ValueError(
                f"embed_dim={config.embed_dim} is not divisible by num_heads={config.num_heads}."
            )
    for group in config.param_groups:
        if len(group) != 4 or not isinstance(group[0], str):
            raise ValueError(
                f"param_groups entry {tuple(group)!r}: give (path pattern, lr_mult, wd_mult, "
                "frozen_epochs), e.g. ('^backbone/', 0.1, 1.0, 0)."
            )
        try:
            re.compile(group[0])
        except re.error as e:
            raise ValueError(f"param_groups pattern {group[0]!r} is not a regex: {e}.") from None
    if config.batch_size <= 0:
        raise ValueError(f"batch_size={config.batch_size} must be positive.")
    if num_devices is not None and config.batch_size % num_devices:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by {num_devices} devices: use a "
            f"multiple of {num_devices} (the batch is split evenly over all devices)."
        )
    _check_student_chunks(config, num_devices)
    if config.local_crops_number < 0:
        raise ValueError(f"local_crops_number={config.local_crops_number} must be >= 0.")
    if config.eval.jaccard_examples > 0 and config.eval.knn_every_steps < 0:
        raise ValueError(
            f"eval.jaccard_examples={config.eval.jaccard_examples} asks for the attention "
            "monitor, which runs beside the k-NN monitor, and eval.knn_every_steps=-1 turns "
            "both off: set eval.knn_every_steps to 0 (before and after training) or N."
        )
    if config.warmup_teacher_temp_epochs > config.epochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs={config.warmup_teacher_temp_epochs} exceeds "
            f"epochs={config.epochs}."
        )


def _check_student_chunks(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    chunks = config.student_chunks
    if chunks < 1:
        raise ValueError(f"student_chunks={chunks} must be >= 1.")
    if chunks > 1 and (config.arch == "resnet50" or config.use_bn_in_head):
        raise ValueError(
            f"student_chunks={chunks} would give BatchNorm the statistics of each chunk instead "
            "of the whole batch: use student_chunks=1 with resnet50 or use_bn_in_head."
        )
    devices = num_devices or 1
    per_device = config.batch_size // devices
    if per_device % chunks:
        raise ValueError(
            f"student_chunks={chunks} does not divide the images per device ({per_device} = "
            f"batch_size {config.batch_size} / {devices} devices): use a divisor of {per_device}."
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {key}={value!r}; choose one of {', '.join(choices)}.")
