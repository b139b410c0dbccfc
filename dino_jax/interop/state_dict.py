"""The official state dicts <-> our Flax variables: names, layouts, and the model read off the
tensors.

Reads DINO's backbone-only release files (`dino_deitsmall16_pretrain.pth`, ..., a flat state
dict) and the networks of its full training checkpoints (`student`, `teacher`, ...), DINOv2's
release files (`dinov2_vits14_pretrain.pth`, ..., with `blocks.{i}` or FSDP's chunked
`blocks.{chunk}.{i}`) and the teacher of its training runs (`teacher_checkpoint.pth`), and writes
our variables back in the official layout, which its models load with `strict=True`.
Only the names and layouts differ: torch Linear weights are (out, in), Flax kernels (in, out);
torch convs are (out, in, kh, kw), Flax's (kh, kw, in, out). PyTorch is imported only when a
function needs it (the `torch` extra).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from dino_jax.core.config import base_config
from dino_jax.models import ARCH_SPECS, backbone_of

# The official ViTs by embedding width: (arch, num_heads), as heads cannot be read off weights.
VIT_WIDTHS = {s.embed_dim: (a, s.num_heads) for a, s in ARCH_SPECS.items() if s.family == "vit"}
DINOV2_WIDTHS = {
    s.embed_dim: (a, s.num_heads) for a, s in ARCH_SPECS.items() if s.family == "dinov2_vit"
}
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
    """The object in a .pth file, tensors on the CPU. Unpickles only tensors, containers, the
    reference's argparse.Namespace of arguments and NumPy scalars (torch's safe `weights_only`
    loader): the reference sets its optimizer's lr and weight_decay from NumPy arrays
    (main_dino.py: train_one_epoch), so its saved param_groups hold np.float64 values."""
    import torch

    allowed = [argparse.Namespace, np.dtype, type(np.dtype(np.float64))]
    allowed.append(np.float64(0).__reduce__()[0])  # numpy's scalar reconstructor
    with epath.Path(path).open("rb") as f, torch.serialization.safe_globals(allowed):
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


def unchunked_blocks(state: dict) -> dict:
    """`state` with FSDP's chunked block keys `blocks.{chunk}.{i}.` (dinov2/models/
    vision_transformer.py: BlockChunk, for block_chunks > 0; `i` is the block's index in the
    whole ViT) as the released files' `blocks.{i}.`, under any prefix."""
    return {re.sub(r"(^|\.)blocks\.\d+\.(\d+)\.", r"\1blocks.\2.", k): v for k, v in state.items()}


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
    state = unchunked_blocks(state)
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
    """base_config() with the `student` keys read off a backbone state dict: arch from the
    ResNet keys, or from the width and a mask token (DINOv2's) for a ViT; the patch from the
    patch conv, the grid pos_embed was built for, the number of blocks; for DINOv2 also
    LayerScale, the FFN and the registers. Files with registers resize the position
    embedding as the hub's `*_reg` models (offset 0, antialias), others with offset 0.1."""
    config = base_config()
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        config.student.arch = "resnet50"
        return config
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(
            "Cannot tell the architecture: the state dict has neither ViT keys (cls_token, "
            "patch_embed.proj.weight) nor ResNet keys (conv1.weight, layer1.0.conv1.weight). "
            f"It starts with {sorted(state)[:5]}."
        )
    width = state["cls_token"].shape[-1]
    dinov2 = "mask_token" in state
    widths = DINOV2_WIDTHS if dinov2 else VIT_WIDTHS
    if width not in widths:
        raise ValueError(
            f"Embedding width {width} is none of the official {'DINOv2 ' if dinov2 else ''}ViTs "
            f"({', '.join(f'{d}: {a}' for d, (a, _) in widths.items())})."
        )
    student = config.student
    student.arch = widths[width][0]
    student.patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    student.img_size = side * student.patch_size
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    student.depth = None if depth == ARCH_SPECS[student.arch].depth else depth
    if dinov2:
        student.layerscale = 1.0 if "blocks.0.ls1.gamma" in state else None  # the hub's init
        student.ffn_layer = "swiglufused" if "blocks.0.mlp.w12.weight" in state else "mlp"
        registers = state.get("register_tokens")
        set_registers(student, 0 if registers is None else int(registers.shape[1]))
    return config


def set_registers(student: ml_collections.ConfigDict, count: int) -> None:
    """A DINOv2 `student` with `count` register tokens; with registers, the position-embedding
    resize of the hub's `*_reg` models (dinov2/hub/backbones.py: offset 0, antialias)."""
    student.num_register_tokens = count
    if count:
        student.interpolate_offset, student.interpolate_antialias = 0.0, True


def head_sizes(head: StateDict) -> dict[str, int]:
    """The sizes of a reference DINOHead state dict, by the config's names: head_n_prototypes,
    head_bottleneck_dim, head_nlayers and, when the MLP has hidden layers, head_hidden_dim."""
    out_dim, bottleneck = head["last_layer.weight_v"].shape
    sizes = {"head_n_prototypes": int(out_dim), "head_bottleneck_dim": int(bottleneck)}
    linears = sorted(
        (int(m.group(1)) for k in head if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k))),
    )
    linears = [i for i in linears if head[f"mlp.{i}.weight"].ndim == 2]
    sizes["head_nlayers"] = max(len(linears), 1)
    if linears:
        sizes["head_hidden_dim"] = int(head[f"mlp.{linears[0]}.weight"].shape[0])
    return sizes


def infer_head_config(head: StateDict, config: ml_collections.ConfigDict) -> None:
    """Set config's out_dim, head sizes, use_bn_in_head and norm_last_layer from a head state
    dict (norm_last_layer=True when weight_g is all ones)."""
    config.dino.update(head_sizes(head))
    config.dino.use_bn_in_head = any(k.endswith("running_mean") for k in head)
    weight_g = head.get("last_layer.weight_g")
    config.dino.norm_last_layer = weight_g is None or bool(
        np.allclose(weight_g, 1.0, rtol=0, atol=WEIGHT_G_ATOL)
    )


def check_requested(config, arch: str | None, patch_size: int | None, source) -> None:
    """Refuse an explicit arch / patch_size that disagrees with the tensors of `source`."""
    if arch is not None and arch != config.student.arch:
        raise ValueError(
            f"{source} holds a {config.student.arch}, not the requested arch={arch!r}; leave "
            "arch=None to infer it."
        )
    if (
        patch_size is not None
        and config.student.arch != "resnet50"
        and patch_size != config.student.patch_size
    ):
        raise ValueError(
            f"{source} holds patch_size={config.student.patch_size}, not the requested "
            f"patch_size={patch_size}; leave patch_size=None to infer it."
        )


# ---------------------------------------------------------------------------------------------
# State dict <-> Flax variables, checked against the shapes the model expects.


def flat_tree(tree: Any) -> dict[tuple[str, ...], Any]:
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
        for path, leaf in flat_tree({collection: abstract[collection]}).items()
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
    for path, value in flat_tree(variables).items():
        value = np.asarray(value)
        state[key_of(path[1:])] = np.ascontiguousarray(to_torch_layout(path[-1], value))
    return state


def _head_key_fn(config) -> Callable[[tuple[str, ...]], str]:
    return lambda names: head_key(
        names, use_bn=config.dino.use_bn_in_head, nlayers=config.dino.head_nlayers
    )


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
                "norm_last_layer=False. Set config.dino.norm_last_layer=False to import it."
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


def split_variables(variables: dict, part: str) -> dict:
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
# Whole backbones: a .pth in as a Flax module and variables, variables out as torch tensors.


def load_torch_backbone(
    path: str | epath.PathLike,
    arch: str | None = None,
    patch_size: int | None = None,
    which: str = "teacher",
):
    """(backbone module, variables, config) of an official .pth: a release file or the
    `which` network of a full checkpoint. arch and patch_size are inferred when None."""
    state = backbone_state_dict(torch_load(path), which)
    config = infer_backbone_config(state)
    check_requested(config, arch, patch_size, path)
    model = backbone_of(config)
    abstract = _abstract_variables(model, config)
    variables = from_state_dict(state, abstract, backbone_key, f"backbone in {path}")
    return model, variables, config


def _abstract_variables(model, config) -> dict:
    """The shapes of `model`'s variables (a ResNet is checked at a small input)."""
    size = config.student.img_size if config.student.arch != "resnet50" else 64
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


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
        part_vars = split_variables(variables, part)
        if part == "backbone":
            part_state = _with_bn_counters(to_state_dict(part_vars, backbone_key))
        else:
            part_state = _with_bn_counters(head_to_state_dict(part_vars, config))
        state.update({f"{part}.{k}": torch.from_numpy(np.array(v)) for k, v in part_state.items()})
    return state


# ---------------------------------------------------------------------------------------------
# DINOv2's networks: SSLMetaArch's student and teacher ModuleDicts (dinov2/train/ssl_meta_arch.py),
# whose state dicts hold `backbone.*`, `dino_head.*` and, with ibot.separate_head, `ibot_head.*`.

DINOV2_PARTS = ("backbone", "dino_head", "ibot_head")


def dinov2_part_key(part: str, config: ml_collections.ConfigDict) -> Callable[[tuple], str]:
    """The Flax path -> state-dict key function of one part of a DINOv2 network: the backbone's,
    or a head's with its section's nlayers (the iBOT head's is config.ibot.head_nlayers)."""
    if part == "backbone":
        return backbone_key
    if part not in DINOV2_PARTS:
        raise ValueError(f"Unknown DINOv2 network part {part!r}; choose one of {DINOV2_PARTS}.")
    nlayers = (config.dino if part == "dino_head" else config.ibot).head_nlayers
    return lambda names: head_key(names, use_bn=False, nlayers=nlayers)


def split_dinov2_network(state: StateDict, what: str) -> dict[str, StateDict]:
    """A DINOv2 network's state dict ({"backbone.…", "dino_head.…", ...}) -> {part: state dict
    without the prefix}, FSDP's chunked blocks unchunked. Keys of no part are refused."""
    parts: dict[str, StateDict] = {}
    others = []
    for key, value in unchunked_blocks(state).items():
        part, _, rest = key.partition(".")
        if part in DINOV2_PARTS:
            parts.setdefault(part, {})[rest] = value
        else:
            others.append(key)
    if others:
        raise ValueError(
            f"The {what} has keys outside {', '.join(p + '.' for p in DINOV2_PARTS)}: "
            f"{sorted(others)[:5]}; it is not a DINOv2 network (SSLMetaArch's student/teacher)."
        )
    return parts


def dinov2_networks_to_state_dict(
    params: dict, config: ml_collections.ConfigDict, block_chunks: int = 0
) -> StateDict:
    """A DINOv2 network's params ({"backbone", "dino_head", maybe "ibot_head"}) -> the
    reference's `backbone.*` / `dino_head.*` / `ibot_head.*` state dict of NumPy arrays in torch
    layout. With block_chunks > 0 the blocks are keyed as the official training run keys them,
    `blocks.{chunk}.{i}` with chunk = i // (depth // block_chunks) (vision_transformer.py:
    DinoVisionTransformer builds one BlockChunk per chunk)."""
    state = {}
    for part, tree in params.items():
        part_state = to_state_dict({"params": tree}, dinov2_part_key(part, config))
        state.update({f"{part}.{key}": value for key, value in part_state.items()})
    if block_chunks > 0 and "backbone" in params:
        depth = len([name for name in params["backbone"] if name.startswith("blocks_")])
        chunk = max(depth // block_chunks, 1)
        state = {
            re.sub(
                r"^backbone\.blocks\.(\d+)\.",
                lambda m: f"backbone.blocks.{int(m.group(1)) // chunk}.{m.group(1)}.",
                key,
            ): value
            for key, value in state.items()
        }
    return state


def dinov2_networks_from_state_dict(
    state: StateDict, abstract: dict, config: ml_collections.ConfigDict, what: str
) -> dict:
    """A DINOv2 network's reference state dict -> float32 params of the parts it holds, each
    checked against `abstract` ({part: params or ShapeDtypeStructs}, DinoV2Networks' params).

    A part the model lacks (an iBOT head without ibot.separate_head), head sizes other than the
    config's, and any key or shape that does not fit are refused with a ValueError."""
    parts = split_dinov2_network(state, what)
    extra = sorted(set(parts) - set(abstract))
    if extra:
        raise ValueError(
            f"The {what} holds {', '.join(extra)}, which the config does not build (it builds "
            f"{', '.join(abstract)}): set ibot.separate_head=True and ibot.loss_weight > 0 as "
            "the run that wrote it."
        )
    params = {}
    for part, part_state in parts.items():
        if part != "backbone":
            _check_head_sizes(part_state, part, config, what)
        params[part] = from_state_dict(
            part_state, {"params": abstract[part]}, dinov2_part_key(part, config), f"{part} {what}"
        )["params"]
    return params


def _check_head_sizes(head: StateDict, part: str, config, what: str) -> None:
    """One line naming the head sizes of the file that differ from the config's section."""
    name = "dino" if part == "dino_head" else "ibot"
    got = head_sizes(head)
    diffs = [key for key, value in got.items() if value != config[name][key]]
    if diffs:
        raise ValueError(
            f"The {part} of the {what} has "
            + ", ".join(f"{key}={got[key]}" for key in diffs)
            + "; the config has "
            + ", ".join(f"{name}.{key}={config[name][key]}" for key in diffs)
            + ": set them to the file's."
        )
