"""Whole training states from trained weights: a reference training checkpoint resumed as a
TrainState, a new run started from any checkpoint or export, and a teacher backbone written back
as a reference .pth.

DINO's checkpoints (main_dino.py: train_dino's checkpoint.pth) and DINOv2's (SSLMetaArch's state
dict, dinov2/train/ssl_meta_arch.py, with its teacher_checkpoint.pth and release backbones) are read
as the config's method asks. The names and layouts of the weights are state_dict.py's; this module
assembles them into the TrainState of step.py.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from dino_jax import checkpoint
from dino_jax.core import step as dino_step
from dino_jax.core.config import steps_per_epoch
from dino_jax.core.optim import group_of, init_hyperparams
from dino_jax.interop import hub
from dino_jax.interop.state_dict import (
    DINOV2_PARTS,
    DINOV2_WIDTHS,
    IGNORED_BUFFERS,
    NETWORKS,
    VIT_WIDTHS,
    StateDict,
    backbone_key,
    backbone_state_dict,
    backbone_to_torch,
    dinov2_networks_from_state_dict,
    dinov2_networks_to_state_dict,
    flat_tree,
    from_state_dict,
    head_from_state_dict,
    head_key,
    head_to_state_dict,
    infer_backbone_config,
    infer_head_config,
    is_full_checkpoint,
    network_state_dict,
    split_dinov2_network,
    split_network,
    split_variables,
    to_numpy,
    to_state_dict,
    torch_load,
    torch_shape,
)
from dino_jax.methods import get_method
from dino_jax.models import model_spec

log = logging.getLogger("dino_jax")

# SSLMetaArch's buffers beside its networks (dinov2/loss/dino_clstoken_loss.py: DINOLoss.center
# [1, K]; dinov2/loss/ibot_patch_loss.py: iBOTPatchLoss.center [1, 1, K']) and the DinoV2
# method_state entries that hold them.
DINOV2_CENTERS = {"dino_loss.center": "dino_center", "ibot_patch_loss.center": "ibot_center"}
# dinov2/fsdp/__init__.py: FSDPCheckpointer.save writes each rank's LOCAL_STATE_DICT (its shard
# of every FSDP module's flat parameter) to `<name>.rank_<r>.pth`.
_RANK_FILE = re.compile(r"\.rank_\d+\.pth$")
_CONSOLIDATE = (
    "consolidate it to a full state dict first: load it into the official SSLMetaArch with "
    "FSDPCheckpointer on the same number of GPUs, then torch.save({'model': model.state_dict(), "
    "'iteration': N}) inside FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT); or "
    "start a new run from eval/<iteration>/teacher_checkpoint.pth"
)


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


def import_full_checkpoint(
    path: str | epath.PathLike, config: ml_collections.ConfigDict, mesh=None
):
    """A reference training checkpoint as a TrainState, to continue training in JAX.

    Student, teacher, their BatchNorm statistics, the center and the optimizer state (AdamW's
    moments and step count, SGD's or LARS' momentum buffers) are imported, so that the next
    iteration is the reference's; a file without optimizer state starts the moments at zero
    (logged). `step` is the checkpoint's epoch (the next one to run) times
    `config.train.OFFICIAL_EPOCH_LENGTH`. `config` must describe the same model (arch,
    patch_size, size overrides, out_dim, head_*, use_bn_in_head, norm_last_layer): every
    unknown or missing key and every mismatched shape is listed in the ValueError otherwise.
    With a mesh, the state is placed with the shardings of `step.state_sharding`.

    With config.method="dinov2" the file is DINOv2's SSLMetaArch state dict, as a full state
    dict: {"model": state dict, "iteration": N, ...} or the bare state dict, with
    `student.{backbone,dino_head,ibot_head}.*`, `teacher.*` alike, `dino_loss.center` [1, K] and
    `ibot_patch_loss.center` [1, 1, K']. Student, teacher and both centers are imported;
    `step` is iteration + 1, where the official resumes (dinov2/train/train.py: do_train's
    start_iter; 0 without an iteration). The optimizer state starts fresh (AdamW's moments at
    zero, its count at 0): the official FSDPCheckpointer saves each rank's shard of it, which
    no full state dict carries. The centers are the saved buffers, as the official's own resume
    uses them (its last lazy center update is never saved). An FSDP per-rank file (flat_param
    keys) is refused: consolidate it first.
    """
    if config.method == "dinov2":
        return _import_dinov2_checkpoint(epath.Path(path), config, mesh)
    checkpoint = torch_load(path)
    if not is_full_checkpoint(checkpoint):
        if _ssl_meta_arch(checkpoint)[0] is not None:
            raise ValueError(
                f"{path} is a DINOv2 training checkpoint (SSLMetaArch's state dict): set "
                "config.method='dinov2' (dino_jax.interop.official_config.config_from_yaml "
                "reads the run's config.yaml)."
            )
        raise ValueError(
            f"{path} is not a full training checkpoint (no 'student' and 'teacher'): a "
            "backbone-only file cannot resume training; load it with dino_jax.load_pretrained."
        )
    center = _center(checkpoint)
    if center is None:
        raise ValueError(f"{path} has no dino_loss.center: not a DINO training checkpoint.")
    center = _checked_center(
        center, (1, config.dino.head_n_prototypes), config, f"dino_loss.center of {path}"
    )
    abstract = jax.eval_shape(lambda key: dino_step.init_state(config, key), jax.random.key(0))
    networks = {w: split_network(network_state_dict(checkpoint, w)) for w in NETWORKS}
    step = int(checkpoint["epoch"]) * steps_per_epoch(config)
    state = _state_with(abstract, networks, center, step, config, path, None)
    student = network_state_dict(checkpoint, "student")
    state = state.replace(
        opt_state=_optimizer_state(checkpoint, student, state.opt_state, abstract, config, path)
    )
    if mesh is not None:
        return jax.device_put(state, dino_step.state_sharding(config, mesh))
    return state


def init_state_from(
    source: str | epath.PathLike, config: ml_collections.ConfigDict, rng, mesh=None
):
    """(TrainState, what was taken) to start a NEW run from trained weights (the training
    command's `config.train.init_checkpoint`): step 0, a fresh optimizer state, and from `source`

    - an official full training checkpoint (main_dino.py: train_dino's checkpoint.pth): its
      student, teacher, BatchNorm statistics and center;
    - a one-network .pth (a release file, or a state dict under 'teacher'/'state_dict'): its
      backbone for both student and teacher;
    - a dino_jax training workdir: the student, teacher and center of its latest checkpoint;
    - a dino_jax export: its teacher for both student and teacher.
    What the source lacks (a head, the center) is as `step.init_state(config, rng, mesh)` makes
    it. A source of another model is refused with a one-line ValueError naming what differs.

    With config.method="dinov2" (`_init_dinov2_from`): DINOv2's full training checkpoint (the
    SSLMetaArch state dict of `import_full_checkpoint`: student, teacher, centers), its
    `teacher_checkpoint.pth` (dinov2/train/train.py: do_test saves {"teacher": backbone and
    heads}: the teacher for both networks), a backbone-only file (a release file or
    student.pretrained_weights: the backbone for both, heads and centers new), or a DINOv2
    dino_jax workdir or export, read alike.
    """
    path = epath.Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"init_checkpoint: no .pth file, dino_jax export or workdir at {path}."
        )
    if config.method == "dinov2":
        return _init_dinov2_from(path, config, rng, mesh)
    found = _dino_jax_source(path) if path.is_dir() else _torch_source(path)
    # Shapes first, so that a wrong file fails before the model is initialised.
    abstract = jax.eval_shape(lambda key: dino_step.init_state(config, key), rng)
    backbone = found.networks["student"][0]
    _check_backbone_fits(backbone, abstract.student["backbone"], config, found.num_heads, path)
    center = found.center
    if center is not None:
        center = _checked_center(
            center, (config.dino.head_n_prototypes,), config, f"The center of {path}"
        )
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
    if (path / "checkpoints").exists():
        # "center": a checkpoint of the layout before methods, whose state held it at the top.
        names = ("student", "teacher", "method_state", "center", "batch_stats")
        saved, arrays = checkpoint.latest_arrays(path / "checkpoints", names)
        stats = arrays.get("batch_stats") or {}
        variables = {w: (arrays[w], stats.get(w, {})) for w in NETWORKS}
        center = np.asarray((arrays.get("method_state") or {}).get("center", arrays.get("center")))
        what = "the student, teacher and center of its latest checkpoint"
    elif (export := hub.export_of(path)) is not None:
        saved, params, stats = checkpoint.load_exported(export)
        variables = {w: (params, stats) for w in NETWORKS}
        center, what = None, "its exported teacher for student and teacher (zero center)"
    else:
        raise ValueError(_not_a_source(path))
    # Through the reference layout, so that every source is checked and reported alike.
    networks = {}
    for which, (params, batch_stats) in variables.items():
        both = {"params": params, "batch_stats": batch_stats or {}}
        backbone = to_state_dict(split_variables(both, "backbone"), backbone_key)
        head = None
        if "head" in params:  # an export of `convert import` holds a backbone only
            head = head_to_state_dict(split_variables(both, "head"), saved)
        networks[which] = (backbone, head)
    heads = model_spec(saved).num_heads or None
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
    model = {
        backbone_key(p): torch_shape(p[-1], leaf.shape) for p, leaf in flat_tree(abstract).items()
    }
    got = _vit_geometry({key: tuple(value.shape) for key, value in state.items()})
    want = _vit_geometry(model)
    model_heads = model_spec(config).num_heads or None
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
            + f"; the config (arch {config.student.arch}) builds "
            + ", ".join(f"{key} {want[key]}" for key in diffs)
            + ". Set arch, patch_size, img_size and embed_dim/depth/num_heads to the file's."
        )


def _state_with(base, networks: dict, center, step: int, config, source, mesh):
    """`base` (a TrainState, or its eval_shape when `networks` holds every part) with the parts
    in `networks` ({network: (backbone, head or None)} reference state dicts, checked against
    base's shapes) and `center` (None: base's), a fresh optimizer state and `step`."""
    params, stats = {}, {}
    for which, (backbone, head) in networks.items():
        loaded = _network_variables(backbone, head, which, base, config, source)
        params[which] = {**getattr(base, which), **loaded["params"]}
        if base.batch_stats:
            stats[which] = {**base.batch_stats[which], **loaded["batch_stats"]}
    method_state = base.method_state if center is None else {"center": center}
    return _assembled(params, method_state, stats, step, config, mesh)


def _assembled(params: dict, method_state, batch_stats, step: int, config, mesh):
    """The TrainState of `params` ({"student", "teacher"}), `method_state`, `batch_stats` and
    `step`, with a fresh optimizer state; placed with the state's shardings on `mesh`."""
    state = dino_step.TrainState(
        step=jnp.asarray(step, jnp.int32),
        student=params["student"],
        teacher=params["teacher"],
        method_state=method_state,
        opt_state=dino_step.optimizer(
            config, get_method(config), init_hyperparams(), params["student"]
        ).init(params["student"]),
        batch_stats=batch_stats,
    )
    if mesh is not None:
        return jax.device_put(state, dino_step.state_sharding(config, mesh))
    return jax.tree.map(jnp.asarray, state)


# The per-parameter state of each reference optimizer (torch.optim.AdamW, torch.optim.SGD, utils.py:
# LARS) and the optax state that holds the same numbers.
_TORCH_BUFFERS = {
    "adamw": {"exp_avg": "mu", "exp_avg_sq": "nu"},
    "sgd": {"momentum_buffer": "trace"},
    "lars": {"mu": "trace"},
}


def _optimizer_state(checkpoint: dict, student: StateDict, fresh, abstract, config, source):
    """The optax state of `make_optimizer(config)` holding the reference optimizer's state of
    `checkpoint["optimizer"]` (main_dino.py: train_dino saves `optimizer.state_dict()`).

    The reference's parameter groups (utils.py: get_params_groups) list the student's trainable
    parameters in `named_parameters` order, decayed ones first; a parameter that never had a
    gradient (the last layer while frozen) has no state and starts at zero. `fresh` is the state
    to fill, `student` the student's state dict without `module.`.
    """
    saved = checkpoint.get("optimizer") or {}
    if not saved.get("state"):
        log.info("%s holds no optimizer state: the moments start at zero.", source)
        return fresh
    names = _trainable_names(student, config)
    groups = saved["param_groups"]
    sizes = [len(group["params"]) for group in groups]
    if len(groups) != 2 or sizes != [len(n) for n in names]:
        raise ValueError(
            f"The optimizer of {source} has parameter groups of sizes {sizes}; the student's "
            f"decayed and non-decayed parameters number {[len(n) for n in names]} "
            "(utils.py: get_params_groups). Its model differs from the config's."
        )
    by_name = {}
    for group, group_names in zip(groups, names, strict=True):
        for index, name in zip(group["params"], group_names, strict=True):
            by_name[name] = saved["state"].get(index, {})
    buffers = _TORCH_BUFFERS[config.optim.optimizer]
    found = {key for entry in by_name.values() for key in entry if key != "step"}
    if found and not found <= set(buffers):
        raise ValueError(
            f"The optimizer state of {source} holds {sorted(found)}, not the state of "
            f"optim.optimizer={config.optim.optimizer!r} ({sorted(buffers)}). Set the optimizer "
            "the run was trained with."
        )
    counts = _step_counts(by_name, abstract.student, config, source)
    trees = {
        field: _student_tree(by_name, buffer, student, abstract, config, source)
        for buffer, field in buffers.items()
    }

    def fill(path, state):
        label = next(k.key for k in path if getattr(k, "key", None) in counts)
        if isinstance(state, optax.ScaleByAdamState):
            return state._replace(
                count=jnp.asarray(counts[label], state.count.dtype),
                mu=_filled(state.mu, trees["mu"]),
                nu=_filled(state.nu, trees["nu"]),
            )
        if isinstance(state, optax.TraceState):
            return state._replace(trace=_filled(state.trace, trees["trace"]))
        return state

    is_state = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.TraceState))  # noqa: E731
    return jax.tree_util.tree_map_with_path(fill, fresh, is_leaf=is_state)


def _trainable_names(student: StateDict, config) -> tuple[list[str], list[str]]:
    """(decayed, non-decayed) names of the student's trainable parameters in the reference's
    order: biases and 1-D tensors are not decayed; a fixed weight_g (norm_last_layer) is not
    trainable (main_dino.py: DINOHead sets its requires_grad to False)."""
    decayed, other = [], []
    for name, value in student.items():
        if name.rsplit(".", 1)[-1] in (*IGNORED_BUFFERS, "running_mean", "running_var"):
            continue
        if config.dino.norm_last_layer and name.endswith("last_layer.weight_g"):
            continue
        (other if name.endswith(".bias") or value.ndim == 1 else decayed).append(name)
    return decayed, other


def _step_counts(by_name: dict, params, config, source) -> dict[str, int]:
    """The step count of each parameter group of the optimizer (by its label): every parameter
    of a group has taken the same number of steps, or none (no state: 0)."""
    rules = dino_step.param_rules(config, get_method(config))
    steps = {}
    for path in flat_tree(params):
        part, *rest = path
        if part == "backbone":
            name = f"backbone.{backbone_key(tuple(rest))}"
        else:
            key = head_key(
                tuple(rest), use_bn=config.dino.use_bn_in_head, nlayers=config.dino.head_nlayers
            )
            name = f"head.{key}"
        entry = by_name.get(name) or {}
        label = group_of("/".join(path), rules).label
        steps.setdefault(label, set()).add(int(entry.get("step", 0)))
    counts = {}
    for label, found in steps.items():
        if len(found) > 1:
            raise ValueError(
                f"The optimizer state of {source} has parameters at different step counts "
                f"{sorted(found)} in one group ({label}): it cannot continue as one optimizer."
            )
        counts[label] = found.pop()
    return counts


def _student_tree(by_name: dict, buffer: str, student: StateDict, abstract, config, source):
    """One per-parameter buffer of the reference optimizer as a tree shaped like the student's
    params (zeros where a parameter has no state)."""
    state = {
        name: entry[buffer].detach().float().numpy() if buffer in entry else np.zeros_like(value)
        for name, value in student.items()
        if name in by_name
        for entry in [by_name[name]]
    }
    backbone, head = split_network(state)
    what = f"optimizer state ({buffer}) of the student in {source}"
    return {
        "backbone": from_state_dict(
            backbone, {"params": abstract.student["backbone"]}, backbone_key, what
        )["params"],
        "head": head_from_state_dict(head, {"params": abstract.student["head"]}, config, what)[
            "params"
        ],
    }


def _filled(masked_tree, values):
    """`masked_tree` (a partition's moments: arrays, and optax.MaskedNode for the parameters of
    the other partition) with each array replaced by the one at its path in `values`."""

    def take(path, leaf):
        node = values
        for key in path:
            node = node[key.key]
        return jnp.asarray(node, leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, masked_tree)


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
            f"{what} has shape {tuple(center.shape)}, the config's "
            f"dino.head_n_prototypes={config.dino.head_n_prototypes} needs {shape}."
        )
    return np.asarray(center, np.float32).reshape(-1)


def export_backbone(source, path: str | epath.PathLike) -> dict:
    """Writes the teacher backbone of `source` (a dino_jax export dir, a training workdir or an
    official .pth) as a reference-layout state dict to the .pth `path`, which the reference's
    `vits.__dict__[arch](patch_size=...)` (or torchvision's resnet50 without fc) loads with
    `strict=True`. Returns the state dict (torch tensors)."""
    import torch

    _, variables = hub.load_pretrained(source)
    state = backbone_to_torch(variables)
    with epath.Path(path).open("wb") as f:
        torch.save(state, f)
    return state


# ---------------------------------------------------------------------------------------------
# DINOv2: SSLMetaArch's state dict, its teacher_checkpoint.pth and backbone files.


def _import_dinov2_checkpoint(path: epath.Path, config, mesh):
    """`import_full_checkpoint` for config.method="dinov2"."""
    obj = _official_object(path)
    model, iteration = _ssl_meta_arch(obj)
    if model is None:
        raise ValueError(_not_ssl_meta_arch(obj, path))
    networks, centers = _split_ssl_meta_arch(model, path)
    abstract = jax.eval_shape(lambda key: dino_step.init_state(config, key), jax.random.key(0))
    params = {
        which: _dinov2_params(networks[which], getattr(abstract, which), config, which, path)
        for which in NETWORKS
    }
    method_state = _dinov2_centers(centers, config, path)
    if iteration is None:
        log.info("%s holds no iteration: the imported state starts at step 0.", path)
    step = 0 if iteration is None else int(iteration) + 1
    return _assembled(params, method_state, {}, step, config, mesh)


class _DinoV2Source(NamedTuple):
    """DINOv2 weights to start from: {network: reference state dict of its parts
    ("backbone.…", "dino_head.…", ...)}, the centers of an official checkpoint (by their
    SSLMetaArch keys) or the method_state of a dino_jax run (or neither), the backbone's
    attention heads where known, and a description."""

    networks: dict[str, StateDict]
    centers: StateDict | None
    method_state: dict[str, np.ndarray] | None
    num_heads: int | None
    what: str


def _init_dinov2_from(path: epath.Path, config, rng, mesh):
    """`init_state_from` for config.method="dinov2"."""
    found = _dinov2_dino_jax_source(path) if path.is_dir() else _dinov2_torch_source(path)
    # Shapes first, so that a wrong file fails before the model is initialised.
    abstract = jax.eval_shape(lambda key: dino_step.init_state(config, key), rng)
    backbone = split_dinov2_network(found.networks["student"], f"student in {path}")
    _check_backbone_fits(
        backbone.get("backbone", {}), abstract.student["backbone"], config, found.num_heads, path
    )
    loaded = {
        which: _dinov2_params(
            found.networks[which], getattr(abstract, which), config, which, path, whole=False
        )
        for which in NETWORKS
    }
    method_state = None
    if found.centers is not None:
        method_state = _dinov2_centers(found.centers, config, path)
    elif found.method_state is not None:
        method_state = _checked_method_state(found.method_state, abstract.method_state, path)
    fresh = dino_step.init_state(config, rng, mesh)
    params = {which: {**getattr(fresh, which), **loaded[which]} for which in NETWORKS}
    if method_state is None:
        method_state = fresh.method_state
    return _assembled(params, method_state, {}, 0, config, mesh), found.what


def _official_object(path: epath.Path) -> Any:
    """The object in an official DINOv2 .pth; FSDP's per-rank files are refused, by their name
    (their sharded tensors do not unpickle here) or by their flat_param keys."""
    if _RANK_FILE.search(path.name):
        raise ValueError(
            f"{path} is one rank's shard of an official FSDP checkpoint: {_CONSOLIDATE}."
        )
    obj = torch_load(path)
    model = obj.get("model") if isinstance(obj, dict) else None
    model = model if isinstance(model, dict) else obj
    if isinstance(model, dict) and any(str(k).endswith("flat_param") for k in model):
        raise ValueError(
            f"{path} is an FSDP local (per-rank) state dict with flat_param keys: {_CONSOLIDATE}."
        )
    return obj


def _ssl_meta_arch(obj: Any) -> tuple[dict | None, int | None]:
    """(SSLMetaArch state dict, its iteration or None) of a file holding one: under "model"
    (fvcore's Checkpointer.save, dinov2/fsdp/__init__.py: FSDPCheckpointer) or bare; (None,
    None) for other files."""
    if not isinstance(obj, dict):
        return None, None
    wrapped = isinstance(obj.get("model"), dict)
    model = obj["model"] if wrapped else obj
    prefixes = {str(key).partition(".")[0] for key in model}
    if not {"student", "teacher"} <= prefixes or "student" in model:
        return None, None
    return model, obj.get("iteration") if wrapped else None


def _not_ssl_meta_arch(obj: Any, path) -> str:
    """Why `obj` cannot be imported as a DINOv2 training checkpoint, in one line."""
    if is_full_checkpoint(obj):
        return (
            f"{path} is a DINO training checkpoint (main_dino.py: 'student'/'teacher' with one "
            "'head'), not DINOv2's SSLMetaArch state dict: import it with config.method='dino'."
        )
    return (
        f"{path} is not a DINOv2 training checkpoint (no student.* and teacher.* keys of "
        "SSLMetaArch's state dict): start a new run from it with train.init_checkpoint instead."
    )


def _split_ssl_meta_arch(model: dict, path) -> tuple[dict[str, StateDict], StateDict]:
    """SSLMetaArch's state dict -> ({network: its NumPy state dict}, {center key: center})."""
    networks: dict[str, StateDict] = {which: {} for which in NETWORKS}
    centers, others = {}, []
    for key, value in to_numpy(model).items():
        which, _, rest = key.partition(".")
        if which in networks:
            networks[which][rest] = value
        elif key in DINOV2_CENTERS:
            centers[key] = value
        else:
            others.append(key)
    if others:
        raise ValueError(
            f"{path} has keys outside student.*, teacher.* and the centers: {sorted(others)[:5]}; "
            "it is not SSLMetaArch's state dict."
        )
    return networks, centers


def _dinov2_params(state: StateDict, abstract, config, which: str, source, whole=True) -> dict:
    """The params of the DINOv2 network `which` in `state`: every part the config builds, or
    with whole=False also the backbone alone (the heads are then the caller's)."""
    what = f"{which} in {source}"
    params = dinov2_networks_from_state_dict(state, abstract, config, what)
    if set(params) == set(abstract) or (not whole and set(params) == {"backbone"}):
        return params
    missing = [part for part in abstract if part not in params]
    raise ValueError(
        f"The {what} has no {', '.join(missing)}, which the config builds (ibot.separate_head="
        f"{config.ibot.separate_head}, ibot.loss_weight={config.ibot.loss_weight}): set them "
        "as the run that wrote it."
    )


def _dinov2_centers(found: StateDict, config, source) -> dict[str, np.ndarray]:
    """The DinoV2 method_state holding the official centers `found` ({"dino_loss.center":
    [1, K], "ibot_patch_loss.center": [1, 1, K']}): SSLMetaArch has DINOLoss only with
    dino.loss_weight > 0 and iBOTPatchLoss only with ibot.loss_weight > 0; an unused center
    stays at zero."""
    method = get_method(config)
    fresh = {k: np.asarray(v) for k, v in method.init_state().items()}
    used = {"dino_loss.center": method.do_dino, "ibot_patch_loss.center": method.do_ibot}
    wanted = sorted(key for key, on in used.items() if on)
    if sorted(found) != wanted:
        raise ValueError(
            f"{source} holds the centers {sorted(found)}; the config (dino.loss_weight="
            f"{config.dino.loss_weight}, ibot.loss_weight={config.ibot.loss_weight}) has "
            f"{wanted}: set the loss weights as the run that wrote it."
        )
    centers = dict(fresh)
    for key, value in found.items():
        ours = DINOV2_CENTERS[key]
        shape = (1,) * (2 if ours == "ibot_center" else 1) + fresh[ours].shape
        if tuple(value.shape) != shape:
            section = "ibot" if ours == "ibot_center" and method.separate_head else "dino"
            raise ValueError(
                f"{key} of {source} has shape {tuple(value.shape)}; the config's "
                f"{section}.head_n_prototypes={fresh[ours].shape[0]} needs {shape}."
            )
        centers[ours] = np.asarray(value, np.float32).reshape(-1)
    return centers


def _checked_method_state(found: dict, abstract: dict, source) -> dict[str, np.ndarray]:
    """A dino_jax DINOv2 run's method_state, checked against the config's shapes."""
    for key, leaf in abstract.items():
        got = np.shape(found.get(key))
        if got != leaf.shape:
            raise ValueError(
                f"The {key} of {source} has shape {got}; the config's needs {leaf.shape}: set "
                "dino.head_n_prototypes and ibot.* as the run that wrote it."
            )
    return {key: np.asarray(found[key], np.float32) for key in abstract}


def _dinov2_torch_source(path: epath.Path) -> _DinoV2Source:
    obj = _official_object(path)
    model, _ = _ssl_meta_arch(obj)
    if model is not None:
        networks, centers = _split_ssl_meta_arch(model, path)
        what = "the student, teacher and centers of a DINOv2 training checkpoint"
        return _DinoV2Source(networks, centers, None, _dinov2_heads(networks["student"]), what)
    if is_full_checkpoint(obj):
        raise ValueError(_not_ssl_meta_arch(obj, path))
    teacher = obj.get("teacher") if isinstance(obj, dict) else None
    if isinstance(teacher, dict) and any(k.startswith("dino_head.") for k in teacher):
        # dinov2/train/train.py: do_test saves {"teacher": model.teacher.state_dict()}.
        state = to_numpy(teacher)
        what = "the teacher's backbone and heads (teacher_checkpoint.pth) for student and teacher"
    else:
        state = {f"backbone.{k}": v for k, v in backbone_state_dict(obj).items()}
        what = "its backbone for student and teacher (new heads and centers)"
    networks = {which: state for which in NETWORKS}
    return _DinoV2Source(networks, None, None, _dinov2_heads(state), what)


def _dinov2_dino_jax_source(path: epath.Path) -> _DinoV2Source:
    if (path / "checkpoints").exists():
        names = ("student", "teacher", "method_state")
        saved, arrays = checkpoint.latest_arrays(path / "checkpoints", names)
        params = {which: arrays[which] for which in NETWORKS}
        method_state = arrays.get("method_state") or None
        what = "the student, teacher and centers of its latest checkpoint"
    elif (export := hub.export_of(path)) is not None:
        saved, teacher, _ = checkpoint.load_exported(export)
        params = {which: teacher for which in NETWORKS}
        method_state, what = None, "its exported teacher for student and teacher (new centers)"
    else:
        raise ValueError(_not_a_source(path))
    # Through the reference layout, so that every source is checked and reported alike.
    networks = {
        which: dinov2_networks_to_state_dict(
            {part: tree for part, tree in network.items() if part in DINOV2_PARTS}, saved
        )
        for which, network in params.items()
    }
    return _DinoV2Source(networks, None, method_state, model_spec(saved).num_heads or None, what)


def _not_a_source(path) -> str:
    return (
        f"init_checkpoint {path} is neither a .pth file, a dino_jax export (config.json + "
        "variables/) nor a training workdir (checkpoints/ or export/)."
    )


def _dinov2_heads(network: StateDict) -> int | None:
    """The attention heads of the official DINOv2 ViT of the network's width, or None."""
    width = network.get("backbone.cls_token", np.zeros((0,))).shape[-1]
    return DINOV2_WIDTHS[width][1] if width in DINOV2_WIDTHS else None
