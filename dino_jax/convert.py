"""The official PyTorch DINO checkpoints (.pth) in, and our teacher back out in their layout.

Reads the backbone-only release files (`dino_deitsmall16_pretrain.pth`, ..., a flat state dict)
and the full training checkpoints (`student`, `teacher`, `dino_loss`, `epoch`, ...), writes our
teacher backbone as a state dict that the reference's models load with `strict=True`.
Only the names and layouts differ: torch Linear weights are (out, in), Flax kernels (in, out);
torch convs are (out, in, kh, kw), Flax's (kh, kw, in, out). PyTorch is imported only when a
function needs it (the `torch` extra).

    python -m dino_jax.convert import dino_deitsmall16_pretrain.pth --out exported/
    python -m dino_jax.convert export runs/demo --out teacher_backbone.pth
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from dino_jax.config import base_config

# Embedding width -> (arch, heads) of the reference's ViTs (heads cannot be read off the weights).
VIT_WIDTHS = {192: ("vit_tiny", 3), 384: ("vit_small", 6), 768: ("vit_base", 12)}
VIT_DEPTH = 12
# Buffers of torch BatchNorm that have no counterpart here (the momentum is fixed).
IGNORED_BUFFERS = ("num_batches_tracked",)
# weight_g of a norm_last_layer=True head is fixed at 1; allow float rounding of a saved 1.
WEIGHT_G_ATOL = 1e-6
# Keys under which a one-network file may keep its state dict (utils.py: load_pretrained_weights's
# checkpoint_key "teacher", and the usual wrappers).
WRAPPER_KEYS = ("teacher", "student", "state_dict", "model")
NETWORKS = ("student", "teacher")

StateDict = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Names: a Flax param path <-> a reference state-dict key.

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
}
_MODULE_TO_TORCH = {
    "patch_embed": "patch_embed.proj",
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
    "kernel_v": "weight_v",
}


def backbone_key(names: tuple[str, ...]) -> str:
    """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight' (ViT and ResNet)."""
    *modules, leaf = names
    parts = [
        _MODULE_TO_TORCH.get(m, re.sub(r"^(blocks|layer\d)_(\d+)$", r"\1.\2", m)) for m in modules
    ]
    return ".".join([*parts, _LEAF_TO_TORCH.get(leaf, leaf)])


def head_key(names: tuple[str, ...], *, use_bn: bool, nlayers: int) -> str:
    """('mlp_1', 'kernel') -> 'mlp.2.weight' (or 'mlp.3.weight' with BN); the reference's
    nn.Sequential interleaves Linear, [BatchNorm1d,] GELU; a 1-layer head's mlp is one Linear."""
    *modules, leaf = names
    stride = 3 if use_bn else 2
    module = modules[0]
    if module == "last_layer":
        return f"last_layer.{_MODULE_TO_TORCH.get(leaf, leaf)}"
    kind, index = module.rsplit("_", 1)
    if nlayers == 1:
        prefix = "mlp"
    else:
        prefix = f"mlp.{int(index) * stride + (kind == 'bn')}"
    return f"{prefix}.{_LEAF_TO_TORCH.get(leaf, leaf)}"


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """A Flax array as its torch tensor layout: kernels (and weight_g, weight_v) transposed."""
    if leaf in ("kernel", "kernel_v", "weight_g") and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """The inverse of `to_torch_layout`."""
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return to_torch_layout(leaf, value)


# ---------------------------------------------------------------------------------------------
# Reading .pth files.


def torch_load(path: str | epath.PathLike) -> Any:
    """The object in a .pth file, tensors on the CPU. Unpickles only tensors, containers and the
    reference's argparse.Namespace of arguments (torch's safe `weights_only` loader)."""
    import torch

    with epath.Path(path).open("rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(f, map_location="cpu", weights_only=True)


def to_numpy(state_dict) -> StateDict:
    """torch tensors -> float32 (or integer) NumPy arrays, keys unchanged."""
    out = {}
    for key, tensor in state_dict.items():
        value = tensor.detach().cpu()
        out[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
    return out


def is_full_checkpoint(obj: Any) -> bool:
    """True for the reference's training checkpoints (student, teacher, optimizer, ...)."""
    return isinstance(obj, dict) and "teacher" in obj and "student" in obj


def network_state_dict(checkpoint: dict, which: str) -> StateDict:
    """The `which` ("teacher"/"student") network of a full checkpoint, without DDP's `module.`."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}; choose 'teacher' or 'student'.")
    state = to_numpy(checkpoint[which])
    return {key.removeprefix("module."): value for key, value in state.items()}


def split_network(state: StateDict) -> tuple[StateDict, StateDict]:
    """A MultiCropWrapper state dict -> (backbone, head) state dicts, prefixes removed."""
    parts: dict[str, StateDict] = {"backbone": {}, "head": {}}
    others = []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts:
            parts[prefix][rest] = value
        else:
            others.append(key)
    if others:
        raise ValueError(
            f"Keys outside backbone./head. in the network's state dict: {sorted(others)}."
        )
    return parts["backbone"], parts["head"]


def backbone_state_dict(obj: Any, which: str = "teacher") -> StateDict:
    """The backbone state dict of a release file (flat) or of a full checkpoint's network."""
    if is_full_checkpoint(obj):
        return split_network(network_state_dict(obj, which))[0]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(
            f"Not a DINO checkpoint: expected a state dict or a training checkpoint, got "
            f"{type(obj).__name__}."
        )
    if which != "teacher":
        raise ValueError(
            "A backbone-only release file holds one network (the teacher); which='student' "
            "needs a full training checkpoint."
        )
    return _unwrapped_backbone(obj)


def _unwrapped_backbone(obj: dict) -> StateDict:
    """A one-network file's backbone, read as utils.py: load_pretrained_weights reads it: the
    state dict under a wrapper key, without 'module.' and 'backbone.' prefixes; head keys are
    dropped (the reference loads with strict=False, which ignores them)."""
    key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
    state = {k.removeprefix("module."): v for k, v in (obj if key is None else obj[key]).items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k[:9] == "backbone."}
    others = sorted(k for k, v in state.items() if not hasattr(v, "detach"))
    if others:
        raise ValueError(
            f"Not a state dict of tensors: {others[:5]} are not tensors (a wrapper other than "
            f"{', '.join(WRAPPER_KEYS)}?)."
        )
    return to_numpy(state)


# ---------------------------------------------------------------------------------------------
# Inferring the model from the tensors.


def infer_backbone_config(state: StateDict) -> ml_collections.ConfigDict:
    """base_config() with arch, patch_size, img_size and a ViT's depth read off a backbone
    state dict: arch from the width (192/384/768) or ResNet keys, the patch from the patch
    conv, the grid pos_embed was built for, the number of blocks."""
    config = base_config()
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        config.arch = "resnet50"
        return config
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(
            "Cannot tell the architecture: the state dict has neither ViT keys (cls_token, "
            "patch_embed.proj.weight) nor ResNet keys (conv1.weight, layer1.0.conv1.weight). "
            f"It starts with {sorted(state)[:5]}."
        )
    width = state["cls_token"].shape[-1]
    if width not in VIT_WIDTHS:
        raise ValueError(
            f"Embedding width {width} is none of the reference's ViTs "
            f"({', '.join(f'{d}: {a}' for d, (a, _) in VIT_WIDTHS.items())})."
        )
    config.arch = VIT_WIDTHS[width][0]
    config.patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    config.img_size = side * config.patch_size
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    config.depth = 0 if depth == VIT_DEPTH else depth
    return config


def infer_head_config(head: StateDict, config: ml_collections.ConfigDict) -> None:
    """Set config's out_dim, head sizes, use_bn_in_head and norm_last_layer from a head state
    dict (norm_last_layer=True when weight_g is all ones)."""
    out_dim, bottleneck = head["last_layer.weight_v"].shape
    config.out_dim, config.head_bottleneck_dim = int(out_dim), int(bottleneck)
    linears = sorted(
        (int(m.group(1)) for k in head if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k))),
    )
    linears = [i for i in linears if head[f"mlp.{i}.weight"].ndim == 2]
    config.use_bn_in_head = any(k.endswith("running_mean") for k in head)
    config.head_nlayers = max(len(linears), 1)
    if linears:
        config.head_hidden_dim = int(head[f"mlp.{linears[0]}.weight"].shape[0])
    weight_g = head.get("last_layer.weight_g")
    config.norm_last_layer = weight_g is None or bool(
        np.allclose(weight_g, 1.0, rtol=0, atol=WEIGHT_G_ATOL)
    )


def check_requested(config, arch: str | None, patch_size: int | None, source) -> None:
    """Refuse an explicit arch / patch_size that disagrees with the tensors of `source`."""
    if arch is not None and arch != config.arch:
        raise ValueError(
            f"{source} holds a {config.arch}, not the requested arch={arch!r}; leave arch=None "
            "to infer it."
        )
    if patch_size is not None and config.arch != "resnet50" and patch_size != config.patch_size:
        raise ValueError(
            f"{source} holds patch_size={config.patch_size}, not the requested "
            f"patch_size={patch_size}; leave patch_size=None to infer it."
        )


# ---------------------------------------------------------------------------------------------
# State dict <-> Flax variables, checked against the shapes the model expects.


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax array of `shape` (the layout change of `to_torch_layout`)."""
    return to_torch_layout(leaf, np.broadcast_to(np.zeros((), np.bool_), shape)).shape


def match_keys(
    state: StateDict, abstract: dict, key_of: Callable[[tuple[str, ...]], str], what: str
) -> dict[str, tuple[str, ...]]:
    """{state-dict key: Flax path (collection first)} for a state dict that fits `abstract`
    ({"params": ..., maybe "batch_stats": ...} of arrays or ShapeDtypeStructs).

    Raises ValueError listing every unknown key, missing key and mismatched shape. Only shapes
    are read, so it checks full-size models without touching their values.
    """
    expected = {
        key_of(path[1:]): (path, leaf.shape)
        for collection in abstract
        for path, leaf in _flat({collection: abstract[collection]}).items()
    }
    given = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in IGNORED_BUFFERS}
    mismatched = []
    for key in sorted(set(given) & set(expected)):
        path, shape = expected[key]
        want = torch_shape(path[-1], shape)
        if tuple(given[key].shape) != want:
            mismatched.append(f"{key}: file {tuple(given[key].shape)}, model {want}")
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys)}"
        for label, keys in (
            ("unknown keys", sorted(set(given) - set(expected))),
            ("missing keys", sorted(set(expected) - set(given))),
            ("mismatched shapes", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"The {what} does not fit the model: " + "; ".join(problems) + ". Check the arch, "
            "patch_size and size overrides (embed_dim, depth, out_dim, head_*) of the config."
        )
    return {key: path for key, (path, _) in expected.items()}


def from_state_dict(
    state: StateDict, abstract: dict, key_of: Callable[[tuple[str, ...]], str], what: str
) -> dict:
    """A torch state dict -> float32 Flax variables shaped like `abstract` (see `match_keys`,
    whose ValueError lists whatever does not fit)."""
    paths = match_keys(state, abstract, key_of, what)
    # Always a copy: student and teacher may be read from one state dict, and must not share
    # buffers (the train step donates the state).
    flat = {
        path: np.array(to_flax_layout(path[-1], state[key]), np.float32, order="C")
        for key, path in paths.items()
    }
    return _nest(flat)


def to_state_dict(variables: dict, key_of: Callable[[tuple[str, ...]], str]) -> StateDict:
    """Flax variables ({"params": ..., "batch_stats": ...}) -> a reference-layout state dict of
    contiguous NumPy arrays."""
    state = {}
    for path, value in _flat(variables).items():
        value = np.asarray(value)
        state[key_of(path[1:])] = np.ascontiguousarray(to_torch_layout(path[-1], value))
    return state


def _head_key_fn(config) -> Callable[[tuple[str, ...]], str]:
    return lambda names: head_key(names, use_bn=config.use_bn_in_head, nlayers=config.head_nlayers)


def head_from_state_dict(head: StateDict, abstract: dict, config, what: str) -> dict:
    """Head variables from a reference head state dict. With norm_last_layer=True our head has
    no weight_g (fixed at 1), so the file's must be all ones."""
    head = dict(head)
    has_g = "weight_g" in abstract["params"].get("last_layer", {})
    if not has_g and "last_layer.weight_g" in head:
        weight_g = head.pop("last_layer.weight_g")
        if not np.allclose(weight_g, 1.0, rtol=0, atol=WEIGHT_G_ATOL):
            raise ValueError(
                f"The {what}'s last_layer.weight_g is not all ones (it ranges over "
                f"[{weight_g.min():.4g}, {weight_g.max():.4g}]): it was trained with "
                "norm_last_layer=False. Set config.norm_last_layer=False to import it."
            )
    return from_state_dict(head, abstract, _head_key_fn(config), what)


def head_to_state_dict(variables: dict, config) -> StateDict:
    """A head's reference-layout state dict; a fixed weight_g (norm_last_layer=True) is written
    as the ones the reference stores."""
    state = to_state_dict(variables, _head_key_fn(config))
    if "last_layer.weight_g" not in state:
        out_dim = state["last_layer.weight_v"].shape[0]
        state["last_layer.weight_g"] = np.ones((out_dim, 1), np.float32)
    return state


def _split_variables(variables: dict, part: str) -> dict:
    """{"params": {"backbone": ..}, ...} -> that part's {"params": .., "batch_stats": ..}."""
    return {c: tree[part] for c, tree in variables.items() if tree and part in tree}


def _with_bn_counters(state: StateDict) -> StateDict:
    """Adds torch BatchNorm's num_batches_tracked (0: the count is not kept here) next to every
    running_mean, so that `load_state_dict(strict=True)` finds all of its keys."""
    out = dict(state)
    for key in state:
        if key.endswith(".running_mean"):
            out[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Public entry points.


def load_torch_backbone(
    path: str | epath.PathLike,
    arch: str | None = None,
    patch_size: int | None = None,
    which: str = "teacher",
):
    """(backbone module, variables, config) of an official .pth: a release file or the
    `which` network of a full checkpoint. arch and patch_size are inferred when None."""
    from dino_jax.hub import backbone_of

    state = backbone_state_dict(torch_load(path), which)
    config = infer_backbone_config(state)
    check_requested(config, arch, patch_size, path)
    model = backbone_of(config)
    abstract = _abstract_variables(model, config)
    variables = from_state_dict(state, abstract, backbone_key, f"backbone in {path}")
    return model, variables, config


def checkpoint_config(path: str | epath.PathLike) -> ml_collections.ConfigDict:
    """base_config() with the model keys of a .pth read off its tensors: arch, patch_size,
    img_size and depth; for a full checkpoint also out_dim, head_*, use_bn_in_head and
    norm_last_layer (False when the student's weight_g is not all ones). Set the data and batch
    keys, then `import_full_checkpoint(path, config)`."""
    obj = torch_load(path)
    config = infer_backbone_config(backbone_state_dict(obj))
    if is_full_checkpoint(obj):
        infer_head_config(split_network(network_state_dict(obj, "student"))[1], config)
    return config


def _abstract_variables(model, config) -> dict:
    size = config.img_size if config.arch != "resnet50" else 64
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def import_full_checkpoint(
    path: str | epath.PathLike, config: ml_collections.ConfigDict, mesh=None
):
    """A reference training checkpoint as a TrainState, to continue training in JAX.

    Student, teacher, their BatchNorm statistics and the center are imported; `step` is the
    checkpoint's epoch (the next one to run) times `config.steps_per_epoch`; the optimizer state
    is fresh (Adam moments restart from 0). `config` must describe the same model (arch,
    patch_size, size overrides, out_dim, head_*, use_bn_in_head, norm_last_layer): every
    unknown or missing key and every mismatched shape is listed in the ValueError otherwise.
    With a mesh, the state is placed with the shardings of `step.state_sharding`.
    """
    from dino_jax import step as dino_step
    from dino_jax.config import steps_per_epoch

    checkpoint = torch_load(path)
    if not is_full_checkpoint(checkpoint):
        raise ValueError(
            f"{path} is not a full training checkpoint (no 'student' and 'teacher'): a "
            "backbone-only file cannot resume training; load it with dino_jax.load_pretrained."
        )
    center = _center(checkpoint)
    if center is None:
        raise ValueError(f"{path} has no dino_loss.center: not a DINO training checkpoint.")
    center = _checked_center(center, (1, config.out_dim), config, f"dino_loss.center of {path}")
    abstract = jax.eval_shape(lambda key: dino_step.init_state(config, key), jax.random.key(0))
    networks = {w: split_network(network_state_dict(checkpoint, w)) for w in NETWORKS}
    step = int(checkpoint["epoch"]) * steps_per_epoch(config)
    return _state_with(abstract, networks, center, step, config, path, mesh)


def init_state_from(
    source: str | epath.PathLike, config: ml_collections.ConfigDict, rng, mesh=None
):
    """(TrainState, what was taken) to start a NEW run from trained weights (the training
    command's `config.init_checkpoint`): step 0, a fresh optimizer state, and from `source`

    - an official full training checkpoint (main_dino.py: train_dino's checkpoint.pth): its
      student, teacher, BatchNorm statistics and center;
    - a one-network .pth (a release file, or a state dict under 'teacher'/'state_dict'): its
      backbone for both student and teacher;
    - a dino_jax training workdir: the student, teacher and center of its latest checkpoint;
    - a dino_jax export: its teacher for both student and teacher.
    What the source lacks (a head, the center) is as `step.init_state(config, rng, mesh)` makes
    it. A source of another model is refused with a one-line ValueError naming what differs.
    """
    from dino_jax import step as dino_step

    path = epath.Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"init_checkpoint: no .pth file, dino_jax export or workdir at {path}."
        )
    found = _dino_jax_source(path) if path.is_dir() else _torch_source(path)
    # Shapes first, so that a wrong file fails before the model is initialised.
    abstract = jax.eval_shape(lambda key: dino_step.init_state(config, key), rng)
    backbone = found.networks["student"][0]
    _check_backbone_fits(backbone, abstract.student["backbone"], config, found.num_heads, path)
    center = found.center
    if center is not None:
        center = _checked_center(center, (config.out_dim,), config, f"The center of {path}")
    for which, (backbone, head) in found.networks.items():
        _network_variables(backbone, head, which, abstract, config, path)
    fresh = dino_step.init_state(config, rng, mesh)
    state = _state_with(fresh, found.networks, center, 0, config, path, mesh)
    return state, found.what


class _Source(NamedTuple):
    """Weights to start from: {network: (backbone, head or None)} reference-layout state
    dicts, the center (or None), the backbone's attention heads where known, and a description."""

    networks: dict[str, tuple[StateDict, StateDict | None]]
    center: np.ndarray | None
    num_heads: int | None
    what: str


def _torch_source(path: epath.Path) -> _Source:
    obj = torch_load(path)
    if is_full_checkpoint(obj):
        networks = {w: split_network(network_state_dict(obj, w)) for w in NETWORKS}
        center = _center(obj)
        center = None if center is None else center.reshape(-1)
        what = "the student, teacher and center of a full training checkpoint"
        if center is None:
            what = "the student and teacher of a full training checkpoint (no center: zeros)"
    else:
        backbone = backbone_state_dict(obj)
        networks = {w: (backbone, None) for w in NETWORKS}
        center, what = None, "its backbone for student and teacher (fresh head, zero center)"
    width = networks["student"][0].get("cls_token", np.zeros((0,))).shape[-1]
    # The reference's ViTs of each width have a fixed number of heads (vision_transformer.py).
    heads = VIT_WIDTHS[width][1] if width in VIT_WIDTHS else None
    return _Source(networks, center, heads, what)


def _dino_jax_source(path: epath.Path) -> _Source:
    from dino_jax import checkpoint, hub

    if (path / "checkpoints").exists():
        names = ("student", "teacher", "center", "batch_stats")
        saved, arrays = hub.latest_checkpoint_arrays(path / "checkpoints", names)
        stats = arrays.get("batch_stats") or {}
        variables = {w: (arrays[w], stats.get(w, {})) for w in NETWORKS}
        center = np.asarray(arrays["center"])
        what = "the student, teacher and center of its latest checkpoint"
    elif (export := hub.export_of(path)) is not None:
        saved, params, stats = checkpoint.load_exported(export)
        variables = {w: (params, stats) for w in NETWORKS}
        center, what = None, "its exported teacher for student and teacher (zero center)"
    else:
        raise ValueError(
            f"init_checkpoint {path} is neither a .pth file, a dino_jax export (config.json + "
            "variables/) nor a training workdir (checkpoints/ or export/)."
        )
    # Through the reference layout, so that every source is checked and reported alike.
    networks = {}
    for which, (params, batch_stats) in variables.items():
        both = {"params": params, "batch_stats": batch_stats or {}}
        backbone = to_state_dict(_split_variables(both, "backbone"), backbone_key)
        head = None
        if "head" in params:  # an export of `convert import` holds a backbone only
            head = head_to_state_dict(_split_variables(both, "head"), saved)
        networks[which] = (backbone, head)
    heads = getattr(hub.backbone_of(saved), "num_heads", None)
    return _Source(networks, center, heads, what)


def _vit_geometry(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What a backbone's reference-layout shapes say of its model."""
    if not {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(shapes):
        return {"arch": "resnet50" if "conv1.weight" in shapes else "not a ViT"}
    patch = shapes["patch_embed.proj.weight"][-1]
    return {
        "arch": "ViT",
        "embed_dim": shapes["cls_token"][-1],
        "depth": len({key.split(".")[1] for key in shapes if key.startswith("blocks.")}),
        "patch_size": patch,
        "img_size": math.isqrt(shapes["pos_embed"][1] - 1) * patch,
    }


def _check_backbone_fits(state: StateDict, abstract: dict, config, num_heads, source) -> None:
    """One line naming what differs (arch, width, depth, patch, grid, heads) between the
    backbone in `source` and the config's, before `match_keys` lists keys and shapes."""
    from dino_jax.hub import backbone_of

    model = {backbone_key(p): torch_shape(p[-1], leaf.shape) for p, leaf in _flat(abstract).items()}
    got = _vit_geometry({key: tuple(value.shape) for key, value in state.items()})
    want = _vit_geometry(model)
    model_heads = getattr(backbone_of(config), "num_heads", None)
    # Heads do not show in the shapes: a wrong count would load and compute something else.
    if got["arch"] == want["arch"] == "ViT" and num_heads and model_heads:
        got["num_heads"], want["num_heads"] = num_heads, model_heads
    diffs = [key for key in want if got.get(key) != want[key]]
    if got["arch"] == "not a ViT":
        return  # match_keys lists its keys
    if got["arch"] != want["arch"]:
        diffs = ["arch"]  # the rest does not compare
    if diffs:
        raise ValueError(
            f"init_checkpoint {source} has "
            + ", ".join(f"{key} {got[key]}" for key in diffs)
            + f"; the config (arch {config.arch}) builds "
            + ", ".join(f"{key} {want[key]}" for key in diffs)
            + ". Set arch, patch_size, img_size and embed_dim/depth/num_heads to the file's."
        )


def _state_with(base, networks: dict, center, step: int, config, source, mesh):
    """`base` (a TrainState, or its eval_shape when `networks` holds every part) with the parts
    in `networks` ({network: (backbone, head or None)} reference state dicts, checked against
    base's shapes) and `center` (None: base's), a fresh optimizer state and `step`."""
    from dino_jax import step as dino_step
    from dino_jax.optim import init_hyperparams, make_optimizer

    params, stats = {}, {}
    for which, (backbone, head) in networks.items():
        loaded = _network_variables(backbone, head, which, base, config, source)
        params[which] = {**getattr(base, which), **loaded["params"]}
        if base.batch_stats:
            stats[which] = {**base.batch_stats[which], **loaded["batch_stats"]}
    state = dino_step.TrainState(
        step=jnp.asarray(step, jnp.int32),
        student=params["student"],
        teacher=params["teacher"],
        center=base.center if center is None else center,
        opt_state=make_optimizer(config, init_hyperparams()).init(params["student"]),
        batch_stats=stats,
    )
    if mesh is not None:
        return jax.device_put(state, dino_step.state_sharding(config, mesh))
    return jax.tree.map(jnp.asarray, state)


def _network_variables(backbone, head, which: str, abstract, config, source) -> dict:
    """{"params", "batch_stats"} of the given parts (a head may be None) of the MultiCrop
    network `which`, checked against `abstract`."""
    params = getattr(abstract, which)
    stats = abstract.batch_stats.get(which, {}) if abstract.batch_stats else {}
    parts = {}
    for part, state in (("backbone", backbone), ("head", head)):
        if state is None:
            continue
        part_abstract = {"params": params[part]}
        if stats.get(part):
            part_abstract["batch_stats"] = stats[part]
        what = f"{which} {part} in {source}"
        if part == "backbone":
            parts[part] = from_state_dict(state, part_abstract, backbone_key, what)
        else:
            parts[part] = head_from_state_dict(state, part_abstract, config, what)
    return {
        "params": {part: v["params"] for part, v in parts.items()},
        "batch_stats": {part: v["batch_stats"] for part, v in parts.items() if "batch_stats" in v},
    }


def _center(checkpoint: dict) -> np.ndarray | None:
    """dino_loss.center of a reference checkpoint (main_dino.py: train_dino saves the DINOLoss
    state dict), [1, out_dim]; None when absent."""
    center = checkpoint.get("dino_loss", {}).get("center")
    return None if center is None else center.detach().float().numpy()


def _checked_center(center: np.ndarray, shape: tuple, config, what: str) -> np.ndarray:
    if tuple(center.shape) != shape:
        raise ValueError(
            f"{what} has shape {tuple(center.shape)}, the config's out_dim={config.out_dim} "
            f"needs {shape}."
        )
    return np.asarray(center, np.float32).reshape(-1)


def export_backbone(source, path: str | epath.PathLike) -> dict:
    """Writes the teacher backbone of `source` (a dino_jax export dir, a training workdir or an
    official .pth) as a reference-layout state dict to the .pth `path`, which the reference's
    `vits.__dict__[arch](patch_size=...)` (or torchvision's resnet50 without fc) loads with
    `strict=True`. Returns the state dict (torch tensors)."""
    import torch

    from dino_jax.hub import load_pretrained

    _, variables = load_pretrained(source)
    state = backbone_to_torch(variables)
    with epath.Path(path).open("wb") as f:
        torch.save(state, f)
    return state


def backbone_to_torch(variables: dict) -> dict:
    """Backbone variables ({"params", maybe "batch_stats"}) -> reference state dict of tensors."""
    import torch

    state = _with_bn_counters(to_state_dict(variables, backbone_key))
    return {key: torch.from_numpy(np.array(value)) for key, value in state.items()}


def network_to_torch(variables: dict, config) -> dict:
    """A MultiCrop network's variables -> the reference's `backbone.*` / `head.*` state dict."""
    import torch

    state = {}
    for part in ("backbone", "head"):
        part_vars = _split_variables(variables, part)
        if part == "backbone":
            part_state = _with_bn_counters(to_state_dict(part_vars, backbone_key))
        else:
            part_state = _with_bn_counters(head_to_state_dict(part_vars, config))
        state.update({f"{part}.{k}": torch.from_numpy(np.array(v)) for k, v in part_state.items()})
    return state


# ---------------------------------------------------------------------------------------------
# Command line.


def _import_command(args: argparse.Namespace) -> None:
    """A .pth's backbone as a dino_jax export directory (config.json + the backbone variables)."""
    from dino_jax import checkpoint, step

    _, variables, config = load_torch_backbone(args.pth, args.arch, args.patch_size, args.which)
    params = {"backbone": variables["params"]}
    stats = {"backbone": variables["batch_stats"]} if "batch_stats" in variables else {}
    state = step.TrainState(
        step=np.zeros((), np.int32),
        student=params,
        teacher=params,
        center=np.zeros(0),
        opt_state=(),
        batch_stats={"teacher": stats} if stats else {},
    )
    checkpoint.export_teacher(args.out, state, config)
    print(f"Wrote the {config.arch} backbone of {args.pth} to {args.out}")


def _export_command(args: argparse.Namespace) -> None:
    state = export_backbone(args.source, args.out)
    print(f"Wrote {len(state)} tensors of the teacher backbone of {args.source} to {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.convert",
        description="Convert DINO checkpoints between the official PyTorch layout and dino_jax.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser(
        "import", help="official .pth (release file or full checkpoint) -> dino_jax export dir"
    )
    imp.add_argument("pth", help="the .pth file")
    imp.add_argument("--out", required=True, help="export directory to write")
    imp.add_argument("--arch", default=None, help="expected arch (inferred when omitted)")
    imp.add_argument("--patch-size", type=int, default=None, help="expected patch size")
    imp.add_argument(
        "--which",
        default="teacher",
        choices=("teacher", "student"),
        help="network of a full checkpoint",
    )
    imp.set_defaults(run=_import_command)
    exp = commands.add_parser(
        "export", help="dino_jax export dir or workdir -> official backbone .pth"
    )
    exp.add_argument("source", help="dino_jax export directory or training workdir")
    exp.add_argument("--out", required=True, help=".pth file to write")
    exp.set_defaults(run=_export_command)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
