"""DINOv2's official training YAML as a dino_jax config, and the recipe file that builds it.

`config_from_yaml` reads a train YAML (dinov2/configs/train/vitl14.yaml, ..., or the config.yaml
an official run writes to its output_dir), merges it onto the official defaults as
dinov2/utils/config.py: get_cfg_from_args does, maps every official key to its dino_jax key and
returns the config with one-line notes on what dino_jax cannot honour. `recipe_source` writes the
config as a `get_config(arg)` recipe for `python -m dino_jax.train --config`.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Mapping
from typing import Any

import ml_collections
import yaml
from etils import epath

from dino_jax.core.config import dinov2_config, lookup, validate
from dino_jax.core.schedules import scaled_lr

# dinov2/configs/ssl_default_config.yaml: the values every train YAML is merged onto.
_FP16_MODULE = {
    "sharding_strategy": "SHARD_GRAD_OP",
    "mixed_precision": {"param_dtype": "fp16", "reduce_dtype": "fp16", "buffer_dtype": "fp32"},
}
_FP16_REDUCE32 = {
    "sharding_strategy": "SHARD_GRAD_OP",
    "mixed_precision": {"param_dtype": "fp16", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
}
DEFAULTS: dict[str, Any] = {
    "MODEL": {"WEIGHTS": ""},
    "compute_precision": {
        "grad_scaler": True,
        "teacher": {"backbone": _FP16_MODULE, "dino_head": _FP16_MODULE, "ibot_head": _FP16_MODULE},
        "student": {
            "backbone": _FP16_MODULE,
            "dino_head": _FP16_REDUCE32,
            "ibot_head": _FP16_REDUCE32,
        },
    },
    "dino": {
        "loss_weight": 1.0,
        "head_n_prototypes": 65536,
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "head_hidden_dim": 2048,
        "koleo_loss_weight": 0.1,
    },
    "ibot": {
        "loss_weight": 1.0,
        "mask_sample_probability": 0.5,
        "mask_ratio_min_max": [0.1, 0.5],
        "separate_head": False,
        "head_n_prototypes": 65536,
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "head_hidden_dim": 2048,
    },
    "train": {
        "batch_size_per_gpu": 64,
        "dataset_path": "ImageNet:split=TRAIN",
        "output_dir": ".",
        "saveckp_freq": 20,
        "seed": 0,
        "num_workers": 10,
        "OFFICIAL_EPOCH_LENGTH": 1250,
        "cache_dataset": True,
        "centering": "centering",
    },
    "student": {
        "arch": "vit_large",
        "patch_size": 16,
        "drop_path_rate": 0.3,
        "layerscale": 1.0e-05,
        "drop_path_uniform": True,
        "pretrained_weights": "",
        "ffn_layer": "mlp",
        "block_chunks": 0,
        "qkv_bias": True,
        "proj_bias": True,
        "ffn_bias": True,
        "num_register_tokens": 0,
        "interpolate_antialias": False,
        "interpolate_offset": 0.1,
    },
    "teacher": {
        "momentum_teacher": 0.992,
        "final_momentum_teacher": 1,
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 30,
    },
    "optim": {
        "epochs": 100,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "base_lr": 0.004,
        "lr": 0.0,
        "warmup_epochs": 10,
        "min_lr": 1.0e-06,
        "clip_grad": 3.0,
        "freeze_last_layer_epochs": 1,
        "scaling_rule": "sqrt_wrt_1024",
        "patch_embed_lr_mult": 0.2,
        "layerwise_decay": 0.9,
        "adamw_beta1": 0.9,
        "adamw_beta2": 0.999,
    },
    "crops": {
        "global_crops_scale": [0.32, 1.0],
        "local_crops_number": 8,
        "local_crops_scale": [0.05, 0.32],
        "global_crops_size": 224,
        "local_crops_size": 96,
    },
    "evaluation": {"eval_period_iterations": 12500},
}

# Official keys whose value dino_jax takes as it is: {official: dino_jax}.
SAME_KEYS = {
    **{
        f"student.{k}": f"student.{k}"
        for k in (
            "patch_size",
            "drop_path_rate",
            "layerscale",
            "drop_path_uniform",
            "ffn_layer",
            "num_register_tokens",
            "interpolate_antialias",
            "interpolate_offset",
        )
    },
    **{
        f"teacher.{k}": f"teacher.{k}"
        for k in (
            "momentum_teacher",
            "warmup_teacher_temp",
            "teacher_temp",
            "warmup_teacher_temp_epochs",
        )
    },
    **{f"dino.{k}": f"dino.{k}" for k in DEFAULTS["dino"]},
    **{f"ibot.{k}": f"ibot.{k}" for k in DEFAULTS["ibot"]},
    **{f"crops.{k}": f"crops.{k}" for k in DEFAULTS["crops"]},
    **{
        f"optim.{k}": f"optim.{k}"
        for k in DEFAULTS["optim"]
        if k not in ("base_lr", "lr")  # the lr: `_map_lr`
    },
    "optim.base_lr": "optim.lr",  # dino_jax scales optim.lr to the global batch at run time
    "train.seed": "train.seed",
    "train.OFFICIAL_EPOCH_LENGTH": "train.OFFICIAL_EPOCH_LENGTH",
    "train.centering": "train.centering",
    "train.batch_size_per_gpu": "train.rank_batch_size",
    "train.num_workers": "data.num_workers",
}
# dinov2/models/vision_transformer.py's architectures (build_model drops a "_memeff" suffix).
ARCHS = {a: f"dinov2_{a}" for a in ("vit_small", "vit_base", "vit_large", "vit_giant2")}
# dinov2/data/loaders.py: ImageNet's splits (ImageNet.Split) as tfds:imagenet2012's.
IMAGENET_SPLITS = {"TRAIN": "train", "VAL": "validation", "TEST": "test"}
# Keys the official train.py never reads (dinov2/train/train.py: do_train checkpoints every
# 3 epochs whatever saveckp_freq says).
UNREAD_KEYS = ("train.saveckp_freq", "train.cache_dataset")
# Keys that locate the run rather than define it: the trainer's --workdir.
LOCATION_KEYS = ("train.output_dir",)
# Keys that lay the model out without changing it: FSDP's BlockChunk wrapping
# (dinov2/models/vision_transformer.py), whose checkpoint keys state_dict.py reads.
LAYOUT_KEYS = ("student.block_chunks",)
# The official key that may be null: LayerScale off (vision_transformer.py: init_values=None).
NULLABLE_KEYS = ("student.layerscale",)
PLACEHOLDER_SOURCE = "folder:/path/to/images"


def config_from_yaml(
    source: str | epath.PathLike, world_size: int | None = None
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(dino_jax config, notes) of an official DINOv2 train YAML: a path, or the YAML text.

    The YAML is merged onto `DEFAULTS` (ssl_default_config.yaml) as OmegaConf.merge does:
    mappings merge key by key, any other value replaces the default. `world_size` is the
    number of GPUs of the official run: train.batch_size (GLOBAL) = batch_size_per_gpu x
    world_size, which scales the lr (dinov2/utils/config.py: apply_scaling_rules_to_cfg). Left
    None, it is read off a non-zero optim.lr (the scaled lr an official run's config.yaml
    records). Each note names a key dino_jax does not honour and why; a value dino_jax cannot
    take raises a one-line ValueError.
    """
    official = merged(DEFAULTS, load_yaml(source))
    return from_official(official, world_size)


def load_yaml(source: str | epath.PathLike) -> dict:
    """The mapping in a YAML file, or in YAML text (a string holding a newline), read as
    OmegaConf reads it: 1e-5 is a float, duplicate keys are refused."""
    text = source if isinstance(source, str) and "\n" in source else None
    if text is None:
        path = epath.Path(source)
        if not path.exists():
            raise FileNotFoundError(f"No official config at {path}.")
        text = path.read_text()
    try:
        loaded = yaml.load(text, Loader=_omegaconf_loader())
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"The official config is not valid YAML ({first}).") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"The official config holds a {type(loaded).__name__}, not a mapping of sections."
        )
    return loaded


def _omegaconf_loader() -> type:
    """A yaml.SafeLoader with OmegaConf's changes (omegaconf/_utils.py: get_yaml_loader): floats
    without a dot ("1e-5"), no timestamps, duplicate keys refused."""

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [k.value for k, _ in node.value]
            duplicates = sorted({k for k in keys if keys.count(k) > 1})
            if duplicates:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {duplicates[0]}", node.start_mark
                )
            return super().construct_mapping(node, deep=deep)

    float_pattern = re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_pattern, list("-+0123456789."))
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in Loader.yaml_implicit_resolvers.items()
    }
    return Loader


def merged(default: Mapping, override: Mapping) -> dict:
    """`override` merged onto `default`: mappings key by key, other values replaced."""
    out = dict(default)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def from_official(
    official: Mapping, world_size: int | None = None
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(dino_jax config, notes) of a merged official config (see `config_from_yaml`)."""
    flat = _flat(official)
    interpolated = sorted(k for k, v in flat.items() if isinstance(v, str) and "${" in v)
    if interpolated:
        raise ValueError(
            f"{interpolated[0]}={flat[interpolated[0]]!r} is an OmegaConf interpolation: write "
            "its value out in the YAML."
        )
    config, notes = dinov2_config(), []
    for key in (*UNREAD_KEYS, *LOCATION_KEYS, *LAYOUT_KEYS):
        flat.pop(key, None)
    for key, ours in SAME_KEYS.items():
        if key in flat:
            _set(config, ours, flat.pop(key), key)
    _map_arch(config, flat)
    notes.append(
        f"train.num_workers={config.data.num_workers}: the official's loader processes per GPU; "
        "data.num_workers are per host (python -m dino_jax.benchmark data sizes them)."
    )
    world = _map_batch(config, flat, world_size, notes)
    notes += _map_lr(config, flat, world)
    notes += _map_model_options(config, flat)
    notes += _map_data(config, flat)
    notes += _map_compute(config, flat)
    notes += _map_schedule_keys(config, flat)
    unread = [k for k in UNREAD_KEYS if lookup(official, k) is not None]
    if unread:
        notes.append(f"{', '.join(unread)}: unread by the official train.py; ignored.")
    notes += [
        f"{key}={value!r}: not a key of the official config; ignored."
        for key, value in flat.items()
    ]
    validate(config)
    return config, notes


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"section.key": leaf} of a nested mapping; lists and empty mappings are leaves."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set(config: ml_collections.ConfigDict, ours: str, value: Any, official: str) -> None:
    """config[ours] = value, a value of the wrong type refused in one line naming `official`."""
    section, leaf = ours.split(".")
    kind = config[section].get_ref(leaf).get_type()
    wrong = f"{official}={value!r}: expected {kind.__name__}, as in {lookup(DEFAULTS, official)!r}."
    if value is None:
        if official not in NULLABLE_KEYS:
            raise ValueError(
                f"{official}=null: give it a value, e.g. {lookup(DEFAULTS, official)!r}."
            )
    elif isinstance(value, bool) != (kind is bool):  # YAML's true is no number, 1 no boolean
        raise ValueError(wrong)
    try:
        config[section][leaf] = tuple(value) if isinstance(value, list) else value
    except TypeError:
        raise ValueError(wrong) from None


def _map_arch(config: ml_collections.ConfigDict, flat: dict) -> None:
    """student.arch, and the biases every dino_jax ViT has; the model is built for the global
    crops (dinov2/models/__init__.py: build_model_from_cfg's img_size)."""
    arch = str(flat.pop("student.arch")).removesuffix("_memeff")
    if arch not in ARCHS:
        raise ValueError(
            f"student.arch={arch!r} is not an official DINOv2 ViT; choose one of "
            f"{', '.join(ARCHS)}."
        )
    config.student.arch = ARCHS[arch]
    config.student.img_size = config.crops.global_crops_size
    for key in ("student.qkv_bias", "student.proj_bias", "student.ffn_bias"):
        if flat.pop(key) is not True:
            raise ValueError(f"{key}=False: dino_jax's DINOv2 ViT has this bias; set it true.")


def _map_batch(config: ml_collections.ConfigDict, flat: dict, world_size, notes) -> int:
    """train.batch_size (global) = batch_size_per_gpu x the official run's GPUs; returns them."""
    per_gpu = config.train.rank_batch_size
    if not isinstance(per_gpu, int) or per_gpu <= 0:
        raise ValueError(f"train.batch_size_per_gpu={per_gpu!r} must be a positive integer.")
    if world_size is None:
        world_size = _world_size_from_lr(config, flat.get("optim.lr") or 0.0)
        notes.append(
            f"world_size={world_size}: read off optim.lr={flat['optim.lr']} (the official "
            "run's scaled lr); pass world_size to set it."
        )
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size={world_size!r} must be a positive number of GPUs.")
    config.train.batch_size = per_gpu * world_size
    return world_size


def _world_size_from_lr(config: ml_collections.ConfigDict, lr: float) -> int:
    """The GPUs whose global batch gives the scaled `lr` = base_lr * sqrt(batch / 1024)."""
    base_lr, per_gpu = config.optim.lr, config.train.rank_batch_size
    if lr <= 0 or base_lr <= 0 or config.optim.scaling_rule != "sqrt_wrt_1024":
        raise ValueError(
            "world_size is not given: pass the number of GPUs of the official run "
            "(--world-size N), which sets the global batch and the lr."
        )
    world = 1024.0 * (lr / base_lr) ** 2 / per_gpu
    if not math.isclose(world, round(world), rel_tol=1e-6) or round(world) < 1:
        raise ValueError(
            f"optim.lr={lr} is base_lr={base_lr} x sqrt({per_gpu} x {world:.4g} / 1024), not a "
            "whole number of GPUs: pass world_size (--world-size N)."
        )
    return round(world)


def _map_lr(config: ml_collections.ConfigDict, flat: dict, world_size: int) -> list[str]:
    """optim.lr of the YAML is the official's output (apply_scaling_rules_to_cfg overwrites it
    with base_lr scaled to the batch); dino_jax scales optim.lr (base_lr) itself."""
    lr = flat.pop("optim.lr", 0.0) or 0.0
    if lr and not math.isclose(lr, scaled_lr(config), rel_tol=1e-6):
        return [
            f"optim.lr={lr}: the official overwrites it with base_lr scaled to the batch; "
            f"dino_jax scales optim.lr={config.optim.lr} to {scaled_lr(config):.6g} at "
            f"{world_size} GPUs x {config.train.rank_batch_size}."
        ]
    return []


def _map_model_options(config: ml_collections.ConfigDict, flat: dict) -> list[str]:
    """Where the weights come from, and the teacher momentum's end."""
    notes = []
    weights = flat.pop("MODEL.WEIGHTS", "") or ""
    pretrained = flat.pop("student.pretrained_weights", "") or ""
    if pretrained:
        # ssl_meta_arch.py: SSLMetaArch loads it into the student backbone, which
        # prepare_for_distributed_training copies to the teacher.
        config.train.init_checkpoint = str(pretrained)
    if weights:
        # train.py: do_train's checkpointer.resume_or_load(cfg.MODEL.WEIGHTS) loads it after
        # pretrained_weights, over the whole model.
        config.train.init_checkpoint = str(weights)
        notes.append(
            f"MODEL.WEIGHTS={weights!r}: the official resumes its iteration; dino_jax starts "
            "at step 0 from it (train.init_checkpoint; interop.import_full_checkpoint resumes)."
        )
        if pretrained:
            notes.append(f"student.pretrained_weights={pretrained!r}: MODEL.WEIGHTS loads over it.")
    final = flat.pop("teacher.final_momentum_teacher", 1)
    if final != 1:
        notes.append(
            f"teacher.final_momentum_teacher={final}: dino_jax's teacher momentum rises to 1."
        )
    return notes


def _map_data(config: ml_collections.ConfigDict, flat: dict) -> list[str]:
    """train.dataset_path (dinov2/data/loaders.py: _parse_dataset_str, "Name:key=value:...")
    as data.source: ImageNet as tfds:imagenet2012, anything else as a folder to set."""
    path = str(flat.pop("train.dataset_path"))
    name, *tokens = path.split(":")
    options = dict(token.partition("=")[::2] for token in tokens)
    if name == "ImageNet":
        split = options.pop("split", "TRAIN")
        if split not in IMAGENET_SPLITS:
            raise ValueError(
                f"train.dataset_path={path!r}: split={split} is none of ImageNet's "
                f"{', '.join(IMAGENET_SPLITS)}."
            )
        config.data.source, config.data.split = "tfds:imagenet2012", IMAGENET_SPLITS[split]
        config.data.eval_split = "validation"
        if options:
            return [
                f"train.dataset_path={path!r}: dino_jax reads ImageNet with tfds (data.data_dir), "
                f"not from {', '.join(options)}; or set data.source=folder:ROOT."
            ]
        return []
    config.data.source = PLACEHOLDER_SOURCE
    return [
        f"train.dataset_path={path!r} has no tfds counterpart: set data.source=folder:ROOT (an "
        "image folder tree) and data.eval_source for the k-NN monitor."
    ]


def _map_compute(config: ml_collections.ConfigDict, flat: dict) -> list[str]:
    """compute_precision (dinov2/fsdp/__init__.py: get_fsdp_wrapper): dino_jax keeps float32
    parameters and computes the matmuls in compute.dtype, bfloat16 where the official's
    parameters are half precision."""
    precision = {k: flat.pop(k) for k in list(flat) if k.startswith("compute_precision.")}
    dtypes = {v for k, v in precision.items() if k.endswith(".param_dtype")}
    config.compute.dtype = "float32" if dtypes <= {"fp32"} else "bfloat16"
    notes = []
    if dtypes - {"fp32"}:
        notes.append(
            f"compute_precision.*.mixed_precision: the official's {'/'.join(sorted(dtypes))} "
            f"FSDP parameters; dino_jax keeps float32 ones, matmuls in {config.compute.dtype}."
        )
    if precision.get("compute_precision.grad_scaler"):
        notes.append(
            "compute_precision.grad_scaler: fp16 loss scaling, which bfloat16 does not need."
        )
    if any(k.endswith(".sharding_strategy") for k in precision):
        notes.append(
            "compute_precision.*.sharding_strategy: FSDP's; dino_jax shards by compute.mesh."
        )
    return notes


def _map_schedule_keys(config: ml_collections.ConfigDict, flat: dict) -> list[str]:
    """The official run's checkpoint period (train.py: do_train's PeriodicCheckpointer, every
    3 epochs, the newest 3 kept) and its teacher saves (do_test, every eval_period_iterations)
    as dino_jax's checkpoints and k-NN monitor."""
    config.checkpoint.every_steps = 3 * config.train.OFFICIAL_EPOCH_LENGTH
    config.checkpoint.keep = 3
    period = flat.pop("evaluation.eval_period_iterations", 0)
    if not isinstance(period, int):
        raise ValueError(f"evaluation.eval_period_iterations={period!r} must be an integer.")
    if period <= 0:
        return []
    config.eval.knn_every_steps = period
    return [
        f"evaluation.eval_period_iterations={period}: the official saves "
        "eval/<iteration>/teacher_checkpoint.pth; dino_jax runs its k-NN monitor "
        "(eval.knn_every_steps) and keeps the teacher in its checkpoints."
    ]


def recipe_source(
    config: ml_collections.ConfigDict,
    notes: list[str],
    yaml_name: str,
    world_size: int,
    recipe_name: str = "RECIPE.py",
) -> str:
    """The recipe file `recipe_name` (configs/*.py) whose get_config(arg) builds `config`:
    dinov2_config() with the keys that differ set, the notes in its docstring; `:smoke` and the
    variants of dino_jax.core.config.apply_variants apply."""
    base = _flat(dinov2_config().to_dict())
    lines = [
        f"    c.{key} = {_literal(value)}\n"
        for key, value in _flat(config.to_dict()).items()
        if key not in base or base[key] != value
    ]
    notes = [textwrap.fill(n, 96, initial_indent="- ", subsequent_indent="  ") for n in notes]
    doc = "\n".join(
        [
            f"DINOv2 recipe from the official {yaml_name}, at {world_size} GPUs x "
            f"{config.train.rank_batch_size} images.",
            "",
            f"    python -m dino_jax.convert config {yaml_name} --world-size {world_size} "
            f"--out {recipe_name}",
            f"    python -m dino_jax.train --config {recipe_name} --workdir WORKDIR",
            "",
            f"train.batch_size={config.train.batch_size} is global; the lr follows it "
            f"(optim.lr x sqrt(batch / 1024) = {scaled_lr(config):.6g}).",
            *(["", "Not honoured:", *notes] if notes else []),
        ]
    )
    return (
        f'"""{doc.replace(chr(92), chr(92) * 2)}\n"""\n\n'
        "from dino_jax.core.config import apply_variants, dinov2_config\n\n\n"
        "def get_config(arg=None):\n"
        "    c = dinov2_config()\n" + "".join(lines) + "    return apply_variants(c, arg)\n"
    )


def _literal(value: Any) -> str:
    """Python source for a config value, strings double-quoted as ruff formats them."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        items = ", ".join(_literal(v) for v in value)
        return f"({items},)" if isinstance(value, tuple) and len(value) == 1 else f"({items})"
    return repr(value)
