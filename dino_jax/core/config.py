"""The base configuration (the references' defaults), its sections and its validation.

The config is grouped as DINOv2's `ssl_default_config.yaml` groups it, with the references' leaf
names: `student` (the backbone), `teacher` (its momentum and temperature), `dino` (DINO's head
and loss), `optim`, `crops` and `train`; dino_jax adds `data`, `compute`, `checkpoint`, `log` and
`eval`. Recipe files in `configs/` start from `base_config()` and change what their recipe
changes. `train.batch_size` is the GLOBAL batch (the references' is per GPU). An unset value is
None, never a 0 or "" that means "unset".
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from dino_jax.models import ARCHS, DINOV2_ARCHS, FFN_LAYERS, REMATS, VIT_ARCHS

OPTIMIZERS = ("adamw", "sgd", "lars")
SCALING_RULES = ("linear_wrt_256", "sqrt_wrt_1024")
CENTERINGS = ("centering", "sinkhorn_knopp")
CLIP_MODES = ("per_tensor", "total_norm")
DTYPES = ("float32", "bfloat16")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")


def base_config() -> ml_collections.ConfigDict:
    """The reference's defaults (main_dino.py: get_args_parser): ViT-S/16, 100 epochs, AdamW, 2
    global + 8 local crops."""
    c = ml_collections.ConfigDict()
    # The method the generic step runs (dino_jax.methods): "dino" or "dinov2".
    c.method = "dino"

    c.student = s = ml_collections.ConfigDict()
    # DINO's vit_tiny, vit_small, vit_base (vision_transformer.py) or resnet50; DINOv2's
    # dinov2_vit_small, _base, _large or _giant2 (dinov2/models/vision_transformer.py).
    s.arch = "vit_small"
    s.patch_size = 16  # pixels per side of a ViT patch (ignored by resnet50)
    s.img_size = 224  # the resolution pos_embed is built for; other crop sizes interpolate it
    s.drop_path_rate = 0.1  # stochastic depth, rising linearly over the blocks
    # ViT size overrides (None keeps the arch's): for small experiments and tests.
    s.embed_dim = optional(int)
    s.depth = optional(int)
    s.num_heads = optional(int)
    # DINOv2's backbone options (dinov2_* archs; DINOv2's student.* names): LayerScale's initial
    # gamma (None: no LayerScale; DINOv2 trains with 1e-5), the FFN ("mlp" or "swiglufused"),
    # register tokens, the position-embedding resize (offset 0.1, or 0 with antialias as the
    # hub's models with registers), and one drop-path rate for every block.
    s.layerscale = optional(float)
    s.ffn_layer = "mlp"
    s.num_register_tokens = 0
    s.interpolate_offset = 0.1
    s.interpolate_antialias = False
    s.drop_path_uniform = False

    c.teacher = t = ml_collections.ConfigDict()
    # The EMA's momentum, raised to 1 over training by a cosine (main_dino.py: momentum_schedule).
    t.momentum_teacher = 0.996
    # The teacher's softmax temperature, raised linearly from warmup_teacher_temp to teacher_temp
    # over the first warmup_teacher_temp_epochs (main_dino.py: DINOLoss).
    t.warmup_teacher_temp = 0.04
    t.teacher_temp = 0.04
    t.warmup_teacher_temp_epochs = 0

    c.dino = d = ml_collections.ConfigDict()
    d.head_n_prototypes = 65536  # main_dino.py's out_dim: the head's output width
    d.head_hidden_dim = 2048  # the width of the head MLP's hidden layers
    d.head_bottleneck_dim = 256  # the L2-normalised output of the MLP, before the last layer
    d.head_nlayers = 3  # linear layers of the MLP (main_dino.py: DINOHead nlayers)
    d.norm_last_layer = True  # weight-normalised last layer with its norm fixed to 1
    d.use_bn_in_head = False  # BatchNorm after each hidden layer of the head
    d.student_temp = 0.1  # the student's softmax temperature
    d.center_momentum = 0.9  # the EMA of the teacher's outputs subtracted before its softmax
    # DINOv2's weights of the DINO loss and of KoLeo on the student's global cls tokens.
    d.loss_weight = 1.0
    d.koleo_loss_weight = 0.1

    # DINOv2's iBOT objective: the student sees masked global crops and learns the teacher's
    # outputs at the masked patches (dinov2/train/ssl_meta_arch.py).
    c.ibot = i = ml_collections.ConfigDict()
    i.loss_weight = 1.0  # 0 turns iBOT off
    i.mask_sample_probability = 0.5  # the fraction of global crops that get a mask
    i.mask_ratio_min_max = (0.1, 0.5)  # the masked fraction of a crop's patches
    # A head of its own for the patch tokens (below), else the DINO head's.
    i.separate_head = False
    i.head_n_prototypes = 65536
    i.head_bottleneck_dim = 256
    i.head_hidden_dim = 2048
    i.head_nlayers = 3

    c.optim = o = ml_collections.ConfigDict()
    o.optimizer = "adamw"  # adamw, sgd or lars
    o.epochs = 100  # the length every schedule is laid out over
    o.lr = 5e-4  # the lr for the scaling rule's reference batch (DINOv2's base_lr)
    # lr * batch / 256 (main_dino.py) or lr * sqrt(batch / 1024) (DINOv2), batch global.
    o.scaling_rule = "linear_wrt_256"
    o.adamw_beta1 = 0.9
    o.adamw_beta2 = 0.999
    o.min_lr = 1e-6  # the end of the cosine after warmup_epochs of linear warmup
    o.warmup_epochs = 10  # linear lr warmup from 0
    o.weight_decay = 0.04  # raised by a cosine to weight_decay_end
    o.weight_decay_end = 0.4  # the weight decay at the end of training
    o.clip_grad = 3.0  # 0 disables clipping, as in main_dino.py
    # "per_tensor" clips each gradient tensor to clip_grad (main_dino.py: utils.clip_gradients);
    # "total_norm" each sub-network's gradients (backbone, head) by their joint norm (DINOv2).
    o.clip_mode = "per_tensor"
    # Epochs the head's last layer stays frozen (main_dino.py's freeze_last_layer: no update;
    # DINOv2: its lr is 0 while Adam's moments accumulate).
    o.freeze_last_layer_epochs = 1
    # Epochs the student's backbone stays frozen (no update, no moments) while the heads and the
    # method's state settle: for a run that starts from trained weights (train.init_checkpoint).
    o.freeze_backbone_epochs = 0
    # Layer-wise lr decay (DINOv2's layerwise_decay): block i of a depth-L ViT gets lr times
    # rate^(L - i), the embeddings rate^(L + 1); 1.0 is off. The patch embedding's lr is further
    # times patch_embed_lr_mult.
    o.layerwise_decay = 1.0
    o.patch_embed_lr_mult = 1.0
    # Parameter groups beyond the method's own (dino_jax.core.optim.ParamRule): (path pattern,
    # lr multiplier, weight-decay multiplier, frozen epochs) tuples; every matching rule applies.
    o.param_groups = ()

    # Multi-crop: 2 global crops and local_crops_number local ones per image, each a
    # RandomResizedCrop of an area fraction in its scale range, resized to its size in pixels.
    c.crops = m = ml_collections.ConfigDict()
    m.global_crops_scale = (0.4, 1.0)
    m.local_crops_number = 8
    m.local_crops_scale = (0.05, 0.4)
    m.global_crops_size = 224
    m.local_crops_size = 96

    c.train = r = ml_collections.ConfigDict()
    r.batch_size = 512  # global, over all devices and hosts
    # Iterations per epoch (DINOv2's name); None derives it from the dataset size (drop_last).
    r.OFFICIAL_EPOCH_LENGTH = optional(int)
    r.seed = 0  # parameters, augmentations, data order and drop-path masks
    # Weights a NEW run starts from (step 0, fresh optimizer): an official .pth (full training
    # checkpoint or backbone), a dino_jax export or workdir. A checkpoint in --workdir wins.
    r.init_checkpoint = optional(str)
    # DINOv2's teacher targets: "centering" (softmax of the centred logits, the centers EMAs)
    # or "sinkhorn_knopp" (over the global batch).
    r.centering = "centering"
    # The images of one official GPU (rank): DINOv2 assigns the masks, computes KoLeo and
    # averages the iBOT center per rank. None: the images per device of the mesh (recorded in
    # the run's config, so that a resume on other devices keeps it).
    r.rank_batch_size = optional(int)

    c.data = a = ml_collections.ConfigDict()
    # or "synthetic:textures", "tfds:imagenet2012", "folder:/path/to/images"
    a.source = "synthetic:shapes"
    a.split = "train"  # the split of data.source to train on
    a.data_dir = optional(str)  # tfds data_dir (None: tfds's default)
    a.blur_sigma = (0.1, 2.0)  # Gaussian blur range in output pixels; scale it with the crops
    # True: the host only crops, resizes and flips (uint8); colour jitter, grayscale, blur,
    # solarize and normalisation run inside the train step (core/device_augment.py).
    a.augment_on_device = False
    a.num_workers = 0  # grain worker processes (0: decode and augment in the main process)
    a.num_threads = 4  # threads per process preparing batches (OpenCV and PIL free the GIL)
    a.prefetch_batches = 4  # batches prepared ahead, per process
    a.eval_split = "val"  # the split the k-NN monitor classifies
    # The k-NN monitor's queries: None takes data.source, read with data.eval_split. A
    # folder:ROOT holding train/ and val/ has its splits there; a folder without them is one
    # split, so its queries need a source of their own (the monitor refuses queries that sit in
    # its memory).
    a.eval_source = optional(str)
    # The monitor's images: resized (shorter side), then centre-cropped, as eval_knn.py does.
    a.eval_resize_size = 256
    a.eval_crop_size = 224

    c.compute = u = ml_collections.ConfigDict()
    # Devices: mesh axes (name, size); -1 takes the remaining devices.
    u.mesh = (("data", -1), ("fsdp", 1))
    u.dtype = "float32"  # matmul compute dtype; params, softmax, loss and EMAs stay float32
    # ViT blocks recomputed in the backward pass to save memory: "none", "block" (keep each
    # block's input only) or "dots_saveable" (keep the matmul outputs, recompute the rest).
    u.remat = "none"
    # The ViT's blocks but the last as one scan over their stacked parameters: a deep model's
    # step compiles one block, not depth copies (minutes, not hours, for ViT-g/14). Needs one
    # drop-path rate for every block (student.drop_path_uniform, or drop_path_rate 0).
    u.scan_blocks = False
    # The platform the step is built for: "auto" takes it from the mesh's devices; "cpu", "gpu"
    # or "tpu" name it (a step compiled ahead of time for other devices takes theirs).
    u.platform = "auto"
    # On CPU meshes, dino_jax.cpu's tuned layers (written-out gradients, the C++ attention kernel
    # built on first use with the host's g++) and host-memory reuse. False: stock Flax layers,
    # as on accelerators. Ignored elsewhere.
    u.cpu_tuning = True
    # The student's forward and backward as this many independent sub-batches of images (every
    # chunks-th image, so each device keeps its own): the same loss and gradient, with drop-path
    # masks drawn per chunk. XLA:CPU runs each operation on one core and overlaps independent
    # ones, so 2 keeps a 2-core CPU busier; leave 1 on accelerators.
    u.student_chunks = 1
    # Where compiled programs persist (relative: under the workdir; None: nowhere), so that a
    # rerun after preemption loads its programs instead of compiling them again.
    u.compilation_cache_dir = optional(str, "compilation_cache")

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every_steps = 1000  # also at the end of each run and on a preemption notice
    k.keep = 3  # the newest checkpoints kept in WORKDIR/checkpoints
    # Resuming with other optim.epochs, train.OFFICIAL_EPOCH_LENGTH or train.batch_size is
    # refused (the schedules would jump); True resumes anyway and follows the new lengths'
    # schedules from the saved step.
    k.replan_schedules = False

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10  # metrics to metrics.jsonl and TensorBoard

    c.eval = e = ml_collections.ConfigDict()
    # The k-NN monitor: 0 runs it before and after training only, N also every N steps; None
    # never runs it.
    e.knn_every_steps = optional(int, 0)
    # Seeded, class-balanced samples of the whole split (data.sources.sample_indices).
    e.knn_train_examples = 10000  # labelled examples of data.split as the k-NN memory
    e.knn_val_examples = 2000  # examples of data.eval_split (of data.eval_source) to classify
    e.knn_k = 20  # neighbours voting, weighted by exp(similarity / 0.07) (eval_knn.py)
    # A second labelled source the k-NN monitor also scores (knn_top1_retain: its data.split as
    # the memory, its data.eval_split as the queries): what a run continued from trained weights
    # must not forget. None: none.
    e.knn_retain_source = optional(str)
    # The attention monitor (eval/attention_monitor.py), beside the k-NN monitor: the Jaccard
    # index of the teacher's attention masks on this many held-out scenes with true masks (0:
    # off), and WORKDIR/figures/attention_<step>.png with the maps of the first figure_scenes.
    e.jaccard_examples = 0
    e.figure_scenes = 4
    e.batch_size = 256  # images per forward pass of the monitors, over all devices
    c.lock()  # a misspelt or moved key fails where it is set, instead of being added
    return c


def optional(kind: type, default: Any = None) -> ml_collections.FieldReference:
    """A field that may be None and takes `kind` from the command line."""
    return ml_collections.FieldReference(default, field_type=kind)


# Where each key of the flat layout (main_dino.py's argument names) now lives.
MOVED_KEYS = {
    **{k: f"student.{k}" for k in ("arch", "patch_size", "img_size", "drop_path_rate")},
    **{k: f"student.{k}" for k in ("embed_dim", "depth", "num_heads")},
    **{
        k: f"teacher.{k}"
        for k in (
            "momentum_teacher",
            "warmup_teacher_temp",
            "teacher_temp",
            "warmup_teacher_temp_epochs",
        )
    },
    "out_dim": "dino.head_n_prototypes",
    **{
        k: f"dino.{k}"
        for k in (
            "head_hidden_dim",
            "head_bottleneck_dim",
            "head_nlayers",
            "norm_last_layer",
            "use_bn_in_head",
            "student_temp",
            "center_momentum",
        )
    },
    **{
        k: f"optim.{k}"
        for k in (
            "optimizer",
            "epochs",
            "lr",
            "min_lr",
            "warmup_epochs",
            "weight_decay",
            "weight_decay_end",
            "clip_grad",
            "clip_mode",
            "layerwise_decay",
            "patch_embed_lr_mult",
            "param_groups",
        )
    },
    "freeze_last_layer": "optim.freeze_last_layer_epochs",
    **{k: f"crops.{k}" for k in ("global_crops_scale", "local_crops_number", "local_crops_scale")},
    "data.global_crop_size": "crops.global_crops_size",
    "data.local_crop_size": "crops.local_crops_size",
    "batch_size": "train.batch_size",
    "steps_per_epoch": "train.OFFICIAL_EPOCH_LENGTH",
    "seed": "train.seed",
    "init_checkpoint": "train.init_checkpoint",
    **{
        k: f"compute.{k}"
        for k in (
            "mesh",
            "dtype",
            "remat",
            "platform",
            "cpu_tuning",
            "student_chunks",
            "compilation_cache_dir",
        )
    },
}
# The keys that may be None, with the value that meant "unset" in the flat layout.
OPTIONAL_KEYS = {
    "student.embed_dim": 0,
    "student.depth": 0,
    "student.num_heads": 0,
    "train.OFFICIAL_EPOCH_LENGTH": 0,
    "train.init_checkpoint": "",
    "compute.compilation_cache_dir": "",
    "data.data_dir": "",
    "data.eval_source": "",
    "eval.knn_every_steps": -1,
    "train.rank_batch_size": 0,
}


def upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config (a workdir's or an export's config.json) in the current layout: keys of the
    flat layout moved to their sections, their "unset" values made None. Current configs pass
    through unchanged."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in saved.items()}
    if isinstance(out.get("student"), dict):
        return _with_defaults(out)
    for old, new in MOVED_KEYS.items():
        section, _, leaf = old.rpartition(".")
        holder = out.get(section) if section else out
        if not isinstance(holder, dict) or leaf not in holder:
            continue
        value = holder.pop(leaf)
        new_section, new_leaf = new.split(".")
        out.setdefault(new_section, {})[new_leaf] = value
    for key, unset in OPTIONAL_KEYS.items():
        section, leaf = key.split(".")
        if out.get(section, {}).get(leaf, None) == unset:
            out[section][leaf] = None
    return _with_defaults(out)


def _with_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with the keys added to the sections since it was saved at their defaults (which
    reproduce the models and runs of before)."""
    for name, section in base_config().items():
        if isinstance(section, ml_collections.ConfigDict):
            saved = tree.setdefault(name, {})
            for key, value in section.to_dict().items():
                saved.setdefault(key, value)
    return tree


def lookup(config: ml_collections.ConfigDict | Mapping[str, Any], key: str, default: Any = None):
    """The value at dotted `key` ("optim.lr"), or `default` where a section or leaf is absent."""
    value = config
    for part in key.split("."):
        if not isinstance(value, Mapping | ml_collections.ConfigDict) or part not in value:
            return default
        value = value[part]
    return value


def imagenet_config(c: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`c` (default `base_config()`) on tfds:imagenet2012 (ArrayRecord) with accelerator-sized
    settings: the common ground of the papers' recipes."""
    c = base_config() if c is None else c
    c.data.source, c.data.eval_split = "tfds:imagenet2012", "validation"
    c.data.num_workers = 16
    c.compute.dtype = "bfloat16"
    c.eval.knn_every_steps = 25000
    return c


def dinov2_config() -> ml_collections.ConfigDict:
    """DINOv2's defaults (dinov2/configs/ssl_default_config.yaml): ViT-L/16 with LayerScale and
    uniform stochastic depth 0.3, DINO + iBOT + KoLeo with softmax centering, lr 0.004 scaled by
    sqrt(batch / 1024), layer-wise decay 0.9, epochs of 1250 iterations."""
    c = base_config()
    c.method = "dinov2"
    s = c.student
    s.arch, s.patch_size, s.drop_path_rate = "dinov2_vit_large", 16, 0.3
    s.layerscale, s.drop_path_uniform = 1e-5, True
    c.teacher.momentum_teacher, c.teacher.teacher_temp = 0.992, 0.07
    c.teacher.warmup_teacher_temp_epochs = 30
    c.dino.norm_last_layer = False  # DINOv2's DINOHead always trains weight_g
    o = c.optim
    o.lr, o.scaling_rule, o.clip_mode = 0.004, "sqrt_wrt_1024", "total_norm"
    o.layerwise_decay, o.patch_embed_lr_mult = 0.9, 0.2
    c.crops.global_crops_scale, c.crops.local_crops_scale = (0.32, 1.0), (0.05, 0.32)
    c.train.batch_size, c.train.OFFICIAL_EPOCH_LENGTH = 64, 1250
    return c


def dinov2_patch14(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """What dinov2/configs/train/vitl14.yaml and vitg14.yaml change from the default."""
    c.dino.head_n_prototypes, c.dino.head_bottleneck_dim = 131072, 384
    c.ibot.separate_head, c.ibot.head_n_prototypes = True, 131072
    c.train.centering = "sinkhorn_knopp"
    c.student.patch_size, c.student.drop_path_rate = 14, 0.4
    c.student.ffn_layer = "swiglufused"
    c.teacher.momentum_teacher = 0.994
    o = c.optim
    o.epochs, o.weight_decay_end, o.lr, o.warmup_epochs, o.layerwise_decay = 500, 0.2, 2e-4, 80, 1.0
    c.crops.local_crops_size = 98
    return c


def rank_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """train.rank_batch_size, or the images per device of `num_devices` when it is None."""
    size = config.train.rank_batch_size
    return config.train.batch_size // num_devices if size is None else size


def with_rank_batch_size(
    config: ml_collections.ConfigDict, num_devices: int
) -> ml_collections.ConfigDict:
    """`config`, or a copy with train.rank_batch_size set from `num_devices` where it is None."""
    if config.train.rank_batch_size is not None:
        return config
    config = config.copy_and_resolve_references()
    config.train.rank_batch_size = rank_batch_size(config, num_devices)
    return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any recipe to a few CPU steps on the built-in data, keeping its arch family and
    optimizer: the `:smoke` variant every recipe accepts."""
    c = config
    s, d, patch = c.student, c.dino, c.student.patch_size
    if s.arch in VIT_ARCHS:
        s.embed_dim, s.depth, s.num_heads = 64, 2, 4
    d.head_n_prototypes, d.head_hidden_dim, d.head_bottleneck_dim = 256, 256, 64
    i = c.ibot
    i.head_n_prototypes, i.head_hidden_dim, i.head_bottleneck_dim = 256, 256, 64
    c.data.source, c.data.split, c.data.eval_split = "synthetic:shapes", "train", "val"
    c.data.eval_source = None
    # DINOv2 masks at least a tenth of a global crop's patches: 16 of them, not 4.
    side = 4 * patch if c.method == "dinov2" else 2 * patch
    c.crops.global_crops_size, c.crops.local_crops_size = side, patch
    c.data.eval_resize_size, c.data.eval_crop_size = side + 8, side
    c.data.num_workers = 0
    c.crops.local_crops_number = min(c.crops.local_crops_number, 2)
    c.train.batch_size, c.optim.epochs, c.train.OFFICIAL_EPOCH_LENGTH = 8, 1, 4
    c.train.rank_batch_size = 4  # DINOv2's ranks: 2 of 4 images, whatever the devices
    c.compute.mesh = base_config().compute.mesh  # whatever devices the machine has
    c.optim.warmup_epochs = c.optim.freeze_last_layer_epochs = c.optim.freeze_backbone_epochs = 0
    c.teacher.warmup_teacher_temp_epochs = 0
    c.checkpoint.every_steps, c.log.every_steps = 2, 1
    c.eval.knn_every_steps, c.eval.knn_train_examples, c.eval.knn_val_examples = None, 64, 32
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
    """One message per `--config.KEY=...` of `argv` whose KEY the config lacks: where a key of
    the flat layout moved, or the nearest keys the config has."""
    known = _dotted_keys(config)
    messages = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].partition("=")[0]
        if key in known:
            continue
        if key in MOVED_KEYS:
            value = arg.partition("=")[2]
            new = f"--config.{MOVED_KEYS[key]}" + (f"={value}" if "=" in arg else "")
            messages.append(f"{arg!r}: config key {key!r} is now {MOVED_KEYS[key]!r}; use {new!r}")
            continue
        near = _nearest_keys(key, known)
        hint = f"did you mean {' or '.join(near)}?" if near else "see dino_jax/core/config.py"
        messages.append(f"Unknown config key {key!r} in {arg!r}: {hint}")
    return messages


def _nearest_keys(key: str, known: list[str]) -> list[str]:
    """Up to 3 known dotted keys near `key`: by the whole name, then by the leaf name (so that
    "epoch" finds optim.epochs)."""
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    by_leaf: dict[str, list[str]] = {}
    for path in known:
        by_leaf.setdefault(path.rpartition(".")[2], []).append(path)
    leaf = key.rpartition(".")[2]
    for match in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6):
        near.extend(by_leaf[match])
    return list(dict.fromkeys(near))[:3]


def none_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`argv` without its `--config.KEY=None` overrides of OPTIONAL_KEYS, those KEYs):
    config_flags parses a value as its field's type, so the caller sets them after parsing."""
    rest, keys = [], []
    for arg in argv:
        key, _, value = arg.removeprefix("--config.").partition("=")
        if arg.startswith("--config.") and key in OPTIONAL_KEYS and value.lower() == "none":
            keys.append(key)
        else:
            rest.append(arg)
    return rest, keys


def set_none(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Sets each dotted key of `keys` ("student.depth") to None."""
    for key in keys:
        section, leaf = key.split(".")
        config[section][leaf] = None


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_dotted_keys(value, f"{prefix}{name}."))
    return keys


def crops_summary(config: ml_collections.ConfigDict) -> str:
    """The multi-crop of `config` in words, e.g. "2x224 + 10x96"."""
    crops = config.crops
    g, l, n = crops.global_crops_size, crops.local_crops_size, crops.local_crops_number
    return f"2x{g}" + (f" + {n}x{l}" if n else "")


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Iterations per epoch; set by the train loop from the dataset when the recipe leaves None."""
    steps = config.train.OFFICIAL_EPOCH_LENGTH
    if steps is None or steps <= 0:
        raise ValueError(
            f"train.OFFICIAL_EPOCH_LENGTH={steps}: set it to the number of iterations per "
            "epoch (dataset size // train.batch_size) before building the train step."
        )
    return int(steps)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks the values that would otherwise fail deep inside compilation, naming the key."""
    student, optim, crops = config.student, config.optim, config.crops
    _check_choice("student.arch", student.arch, ARCHS)
    _check_choice("optim.optimizer", optim.optimizer, OPTIMIZERS)
    _check_choice("optim.scaling_rule", optim.scaling_rule, SCALING_RULES)
    _check_choice("optim.clip_mode", optim.clip_mode, CLIP_MODES)
    _check_choice("compute.dtype", config.compute.dtype, DTYPES)
    _check_choice("compute.remat", config.compute.remat, REMATS)
    _check_choice("compute.platform", config.compute.platform, PLATFORMS)
    if student.arch in VIT_ARCHS:
        sizes = {
            "student.img_size": student.img_size,
            "crops.global_crops_size": crops.global_crops_size,
            "crops.local_crops_size": crops.local_crops_size,
        }
        for key, size in sizes.items():
            if size % student.patch_size:
                raise ValueError(
                    f"{key}={size} is not divisible by student.patch_size={student.patch_size}: "
                    f"choose a size that is a multiple of {student.patch_size}."
                )
        for key in ("embed_dim", "depth", "num_heads"):
            if student[key] is not None and student[key] <= 0:
                raise ValueError(
                    f"student.{key}={student[key]} must be positive, or None for the arch's."
                )
        _check_choice("student.ffn_layer", student.ffn_layer, FFN_LAYERS)
        if student.arch not in DINOV2_ARCHS:
            for key, default in (("layerscale", None), ("ffn_layer", "mlp")):
                if student[key] != default:
                    raise ValueError(
                        f"student.{key}={student[key]!r} is DINOv2's: choose a dinov2_* arch, "
                        f"or {key}={default!r} for {student.arch}."
                    )
            if student.num_register_tokens:
                raise ValueError(
                    f"student.num_register_tokens={student.num_register_tokens} is DINOv2's: "
                    f"choose a dinov2_* arch, or 0 for {student.arch}."
                )
        uniform = student.drop_path_uniform or student.drop_path_rate == 0
        if config.compute.scan_blocks and not uniform:
            raise ValueError(
                "compute.scan_blocks runs every block with one drop-path rate: set "
                "student.drop_path_uniform=True (DINOv2's) or student.drop_path_rate=0."
            )
        if student.interpolate_antialias and student.interpolate_offset:
            raise ValueError(
                "student.interpolate_antialias resizes to a size, not by a scale: set "
                "student.interpolate_offset=0 with it."
            )
        if student.embed_dim and student.num_heads and student.embed_dim % student.num_heads:
            raise ValueError(
                f"student.embed_dim={student.embed_dim} is not divisible by "
                f"student.num_heads={student.num_heads}."
            )
    if config.compute.scan_blocks and student.arch not in VIT_ARCHS:
        raise ValueError(f"compute.scan_blocks scans a ViT's blocks; {student.arch} has none.")
    for group in optim.param_groups:
        if len(group) != 4 or not isinstance(group[0], str):
            raise ValueError(
                f"optim.param_groups entry {tuple(group)!r}: give (path pattern, lr_mult, "
                "wd_mult, frozen_epochs), e.g. ('^backbone/', 0.1, 1.0, 0)."
            )
        try:
            re.compile(group[0])
        except re.error as e:
            raise ValueError(
                f"optim.param_groups pattern {group[0]!r} is not a regex: {e}."
            ) from None
    batch = config.train.batch_size
    if batch <= 0:
        raise ValueError(f"train.batch_size={batch} must be positive.")
    if num_devices is not None and batch % num_devices:
        raise ValueError(
            f"train.batch_size={batch} is not divisible by {num_devices} devices: use a "
            f"multiple of {num_devices} (the batch is split evenly over all devices)."
        )
    steps = config.train.OFFICIAL_EPOCH_LENGTH
    if steps is not None and steps <= 0:
        raise ValueError(
            f"train.OFFICIAL_EPOCH_LENGTH={steps} must be positive, or None to derive it from "
            "the dataset size."
        )
    if config.method == "dinov2":
        _check_dinov2(config, num_devices)
    _check_student_chunks(config, num_devices)
    if crops.local_crops_number < 0:
        raise ValueError(f"crops.local_crops_number={crops.local_crops_number} must be >= 0.")
    if config.eval.jaccard_examples > 0 and config.eval.knn_every_steps is None:
        raise ValueError(
            f"eval.jaccard_examples={config.eval.jaccard_examples} asks for the attention "
            "monitor, which runs beside the k-NN monitor, and eval.knn_every_steps=None turns "
            "both off: set eval.knn_every_steps to 0 (before and after training) or N."
        )
    if not 0 <= optim.freeze_backbone_epochs < optim.epochs:
        raise ValueError(
            f"optim.freeze_backbone_epochs={optim.freeze_backbone_epochs} must be in [0, "
            f"optim.epochs={optim.epochs}): the backbone would never train."
        )
    if config.teacher.warmup_teacher_temp_epochs > optim.epochs:
        raise ValueError(
            f"teacher.warmup_teacher_temp_epochs={config.teacher.warmup_teacher_temp_epochs} "
            f"exceeds optim.epochs={optim.epochs}."
        )


def _check_dinov2(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    """DINOv2's settings (dinov2/train/ssl_meta_arch.py), in one line each."""
    student, ibot, dino = config.student, config.ibot, config.dino
    if student.arch not in DINOV2_ARCHS:
        raise ValueError(
            f"method='dinov2' masks patches with DINOv2's mask token: choose a dinov2_* "
            f"student.arch ({', '.join(DINOV2_ARCHS)}), not {student.arch!r}."
        )
    _check_choice("train.centering", config.train.centering, CENTERINGS)
    if dino.loss_weight <= 0 and ibot.loss_weight <= 0:
        raise ValueError(
            "dino.loss_weight and ibot.loss_weight are both 0: DINOv2 has nothing to learn; "
            "give one of them a positive weight."
        )
    if dino.loss_weight <= 0 and dino.koleo_loss_weight > 0:
        raise ValueError(
            f"dino.koleo_loss_weight={dino.koleo_loss_weight} is applied with the DINO loss, "
            "which dino.loss_weight=0 turns off: set dino.koleo_loss_weight=0 too."
        )
    if ibot.loss_weight > 0:
        low, high = ibot.mask_ratio_min_max
        if not 0 < low <= high < 1:
            raise ValueError(
                f"ibot.mask_ratio_min_max={tuple(ibot.mask_ratio_min_max)} must be within "
                "(0, 1) with min <= max, e.g. (0.1, 0.5)."
            )
        if not 0 < ibot.mask_sample_probability <= 1:
            raise ValueError(
                f"ibot.mask_sample_probability={ibot.mask_sample_probability} must be in "
                "(0, 1]: the fraction of global crops that get a mask."
            )
        grid = config.crops.global_crops_size // student.patch_size
        if int(grid * grid * low) < 1:
            raise ValueError(
                f"ibot.mask_ratio_min_max={tuple(ibot.mask_ratio_min_max)} masks no patch of "
                f"a {grid}x{grid} global crop: raise the ratios or crops.global_crops_size."
            )
    elif ibot.separate_head:
        raise ValueError(
            "ibot.separate_head=True asks for an iBOT head that ibot.loss_weight=0 never "
            "builds: set ibot.separate_head=False, or a positive ibot.loss_weight."
        )
    if dino.use_bn_in_head:
        raise ValueError("dino.use_bn_in_head is DINO's: DINOv2's heads have no BatchNorm.")
    if config.compute.student_chunks != 1:
        raise ValueError(
            f"compute.student_chunks={config.compute.student_chunks} is DINO's: use 1 with "
            "method='dinov2'."
        )
    batch, rank = config.train.batch_size, config.train.rank_batch_size
    if rank is None and num_devices is not None:
        rank = batch // num_devices
    if rank is not None:
        if rank <= 0 or batch % rank:
            raise ValueError(f"train.rank_batch_size={rank} must divide train.batch_size={batch}.")
        if rank == 1 and dino.koleo_loss_weight > 0:
            raise ValueError(
                "KoLeo needs 2 or more images per rank (the official gives NaN with 1): "
                "raise train.batch_size or train.rank_batch_size, or set "
                "dino.koleo_loss_weight=0."
            )


def _check_student_chunks(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    chunks = config.compute.student_chunks
    if chunks < 1:
        raise ValueError(f"compute.student_chunks={chunks} must be >= 1.")
    if chunks > 1 and (config.student.arch == "resnet50" or config.dino.use_bn_in_head):
        raise ValueError(
            f"compute.student_chunks={chunks} would give BatchNorm the statistics of each chunk "
            "instead of the whole batch: use compute.student_chunks=1 with resnet50 or "
            "dino.use_bn_in_head."
        )
    devices = num_devices or 1
    per_device = config.train.batch_size // devices
    if per_device % chunks:
        raise ValueError(
            f"compute.student_chunks={chunks} does not divide the images per device "
            f"({per_device} = train.batch_size {config.train.batch_size} / {devices} devices): "
            f"use a divisor of {per_device}."
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {key}={value!r}; choose one of {', '.join(choices)}.")
