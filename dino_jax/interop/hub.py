"""The small public API for notebooks and evaluation: load a pretrained backbone, get features,
attention maps and intermediate layers.

`load_pretrained` returns the BACKBONE module and the variables dict that `model.apply` takes:
`{"params": ...}`, plus `"batch_stats"` for a ResNet (its BatchNorm running statistics), so that
`model.apply(variables, images)` works for every architecture.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from dino_jax import checkpoint
from dino_jax.core.augment_laws import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.interop import hf
from dino_jax.interop.state_dict import check_requested, load_torch_backbone
from dino_jax.models import VisionTransformer, backbone_of

# ImageNet normalisation of the reference's transforms, for uint8 input.
WHICH = ("teacher", "student")


def load_pretrained(
    path: str | epath.PathLike,
    arch: str | None = None,
    patch_size: int | None = None,
    which: str = "teacher",
) -> tuple[Any, dict]:
    """A pretrained backbone: (flax module, variables for `model.apply(variables, images)`).

    `path` is one of
    - an official DINO `.pth`: a backbone-only release file or a full training checkpoint
      (`which` picks its "teacher", the default, or "student"); `arch` and `patch_size` are
      inferred from the tensors when not given;
    - an official DINOv2 `.pth`: a release file or a training run's teacher_checkpoint.pth;
    - a Hugging Face directory (config.json + model.safetensors) of a ViTModel, Dinov2Model or
      Dinov2WithRegistersModel (`dino_jax.interop.hf`);
    - a dino_jax export directory (`<workdir>/export`: config.json + the teacher);
    - a dino_jax training workdir: its export/ if present, else the newest checkpoint.
    Given `arch` / `patch_size` must agree with what the file holds (ValueError otherwise).
    Variables are host NumPy arrays: `{"params": ...}` plus `"batch_stats"` for ResNet-50.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r}; choose 'teacher' or 'student'.")
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint, export or workdir at {path}.")
    if not path.is_dir():
        model, variables, _ = load_torch_backbone(path, arch, patch_size, which)
        return model, variables
    if hf.is_hf_dir(path):
        model, variables, config = hf.load_hf(path)
        check_requested(config, arch, patch_size, path)
        return model, variables
    config, params, batch_stats = _load_dino_jax(path, which)
    check_requested(config, arch, patch_size, path)
    return backbone_of(config), _backbone_variables(params, batch_stats)


def _backbone_variables(params: dict, batch_stats: dict) -> dict:
    """The backbone's part of a MultiCrop's variables (the head is not part of a backbone)."""
    variables = {"params": params["backbone"]}
    if batch_stats and batch_stats.get("backbone"):
        variables["batch_stats"] = batch_stats["backbone"]
    return variables


def _load_dino_jax(path: epath.Path, which: str):
    """(config, params, batch_stats) of the network `which` in an export dir or a workdir."""
    export = export_of(path)
    if export is not None and which == "teacher":
        return checkpoint.load_exported(export)
    if (path / "checkpoints").exists():
        return _load_latest_checkpoint(path / "checkpoints", which)
    if export is not None:
        raise ValueError(
            f"{export} is an export, which holds only the teacher; which='student' needs the "
            "training workdir with its checkpoints/."
        )
    raise ValueError(
        f"{path} is neither a dino_jax export (config.json + variables/), a training workdir "
        "(export/ or checkpoints/) nor a .pth file."
    )


def export_of(path: epath.Path) -> epath.Path | None:
    """The export directory that `path` is or holds (`<workdir>/export`), or None."""
    if (path / "config.json").exists() and (path / "variables").exists():
        return path
    return path / "export" if (path / "export" / "variables").exists() else None


def _load_latest_checkpoint(directory: epath.Path, which: str):
    """(config, params, batch_stats) of one network in the newest complete checkpoint, as NumPy.

    Reads only that network's arrays (not the optimizer state), on any device count.
    """
    config, restored = checkpoint.latest_arrays(directory, (which, "batch_stats"))
    return config, restored[which], (restored.get("batch_stats") or {}).get(which, {})


def prepare_images(images) -> jax.Array:
    """NHWC images as float32 model input: uint8 [0, 255] is scaled and normalised with the
    ImageNet mean/std; floating-point input is taken as already normalised."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images [B, H, W, 3], got shape {images.shape}")
    if images.dtype == jnp.uint8:
        mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
        return (images.astype(jnp.float32) / 255.0 - mean) / std
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images of dtype {images.dtype}: pass uint8 or normalised floats")
    return images.astype(jnp.float32)


def extract_features(model, variables: dict, images) -> jax.Array:
    """[B, H, W, 3] images (uint8, or floats already normalised) -> features [B, D] float32:
    the final-normed cls token of a ViT, the pooled 2048-d output of a ResNet-50."""
    return _apply(model, variables, prepare_images(images))


def attention_maps(model, variables: dict, images) -> jax.Array:
    """[B, H, W, 3] images -> the last block's cls-to-patch attention [B, heads, H/p, W/p]
    (ViT only), one map per head; each map sums to at most 1 (the rest goes to the cls token)."""
    x = prepare_images(images)
    _require_vit(model, "attention_maps")
    attn = _apply(model, variables, x, method="get_last_selfattention")
    grid_h, grid_w = x.shape[1] // model.patch_size, x.shape[2] // model.patch_size
    patches = attn[:, :, 0, 1 + model.num_register_tokens :]
    return patches.reshape(attn.shape[0], attn.shape[1], grid_h, grid_w)


def patch_features(model, variables: dict, images) -> jax.Array:
    """[B, H, W, 3] images -> the final-normed patch tokens [B, H/p, W/p, D] float32 (DINOv2's
    x_norm_patchtokens on the grid; registers dropped); ViT only."""
    x = prepare_images(images)
    _require_vit(model, "patch_features")
    patches = _apply(model, variables, x, method="forward_features")["x_norm_patchtokens"]
    grid_h, grid_w = x.shape[1] // model.patch_size, x.shape[2] // model.patch_size
    return patches.reshape(x.shape[0], grid_h, grid_w, -1)


def forward_features(model, variables: dict, images, masks=None) -> dict[str, jax.Array]:
    """[B, H, W, 3] images (masks [B, N] bool for a DINOv2 ViT) -> DINOv2's forward_features:
    x_norm_clstoken, x_norm_regtokens, x_norm_patchtokens, x_prenorm; ViT only."""
    x = prepare_images(images)
    _require_vit(model, "forward_features")
    if masks is None:
        return _apply(model, variables, x, method="forward_features")
    return _jitted(model, "forward_features", ())(variables, x, jnp.asarray(masks, bool))


def intermediate_layers(model, variables: dict, images, n: int = 1) -> list[jax.Array]:
    """[B, H, W, 3] images -> the final-normed outputs of the last n blocks, each [B, T, D] with
    T = 1 + R + N (cls token first, then any registers, then the patches row by row), as DINO's
    get_intermediate_layers gives them; ViT only."""
    x = prepare_images(images)
    _require_vit(model, "intermediate_layers")
    return _apply(model, variables, x, n, method="block_outputs")


def get_intermediate_layers(
    model,
    variables: dict,
    images,
    n: int = 1,
    reshape: bool = False,
    return_class_token: bool = False,
    norm: bool = True,
) -> tuple:
    """DINOv2's get_intermediate_layers of [B, H, W, 3] images: the last n blocks' patch tokens
    [B, N, D] ([B, H/p, W/p, D] with reshape), paired with their cls tokens with
    return_class_token; ViT only (`VisionTransformer.get_intermediate_layers`)."""
    x = prepare_images(images)
    _require_vit(model, "get_intermediate_layers")
    static = (n, reshape, return_class_token, norm)
    return _apply(model, variables, x, *static, method="get_intermediate_layers")


def _require_vit(model, what: str) -> None:
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{what} needs a Vision Transformer, got {type(model).__name__}")


def _apply(model, variables: dict, x: jax.Array, *static, method: str = "__call__"):
    """`model.apply(variables, x, *static, method=method)` jitted once per model and method."""
    return _jitted(model, method, static)(variables, x)


@functools.lru_cache(maxsize=32)
def _jitted(model, method: str, static: tuple):
    return jax.jit(lambda variables, *x: model.apply(variables, *x, *static, method=method))
