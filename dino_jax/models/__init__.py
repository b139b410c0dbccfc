"""Backbones, the DINO head, the multi-crop network, and the registry that builds them."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from dino_jax.models.dino import MultiCrop
from dino_jax.models.head import DINOHead
from dino_jax.models.layers import STOCK, Layers
from dino_jax.models.registry import ARCH_SPECS, ARCHS, VIT_ARCHS, ArchSpec, model_spec
from dino_jax.models.resnet import ResNet, resnet50
from dino_jax.models.vit import REMATS, VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = [
    "ARCHS",
    "ARCH_SPECS",
    "REMATS",
    "VIT_ARCHS",
    "ArchSpec",
    "DINOHead",
    "Layers",
    "MultiCrop",
    "ResNet",
    "VisionTransformer",
    "backbone_of",
    "build_backbone",
    "build_dino",
    "model_spec",
    "resnet50",
    "vit_base",
    "vit_small",
    "vit_tiny",
]

_VITS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_backbone(
    arch: str,
    patch_size: int = 16,
    drop_path_rate: float = 0.0,
    img_size: int = 224,
    dtype=jnp.float32,
    remat: str = "none",
    layers: Layers = STOCK,
    **vit_overrides: int,
):
    """The backbone named by `arch` ("vit_tiny", "vit_small", "vit_base", "resnet50").

    `vit_overrides` (embed_dim, depth, num_heads) replace a ViT's size where non-zero; `remat`
    (ViTs only) recomputes blocks in the backward pass; `layers` (ViTs only) are the platform's
    blocks (`dino_jax.core.platforms.model_layers`), stock Flax by default.
    """
    if arch in VIT_ARCHS:
        vit = _VITS[arch](
            patch_size=patch_size,
            drop_path_rate=drop_path_rate,
            img_size=img_size,
            dtype=dtype,
            remat=remat,
            layers=layers,
        )
        return vit.clone(**{k: v for k, v in vit_overrides.items() if v})
    if arch == "resnet50":
        return resnet50(dtype=dtype)
    raise ValueError(f"Unknown arch={arch!r}; choose one of {', '.join(ARCHS)}.")


def backbone_of(config: ml_collections.ConfigDict):
    """The float32, stochastic-depth-free backbone module that `config` trains."""
    return build_backbone(
        config.student.arch,
        patch_size=config.student.patch_size,
        img_size=config.student.img_size,
        embed_dim=config.student.embed_dim,
        depth=config.student.depth,
        num_heads=config.student.num_heads,
    )


def build_dino(
    config: ml_collections.ConfigDict, *, teacher: bool = False, layers: Layers = STOCK
) -> MultiCrop:
    """The student (with stochastic depth) or the teacher (without) network of `config`, built
    from `layers` (the platform's, `dino_jax.core.platforms.model_layers`)."""
    dtype = jnp.dtype(config.compute.dtype)
    backbone = build_backbone(
        config.student.arch,
        patch_size=config.student.patch_size,
        drop_path_rate=0.0 if teacher else config.student.drop_path_rate,
        img_size=config.student.img_size,
        dtype=dtype,
        remat=config.compute.remat,
        layers=layers,
        embed_dim=config.student.embed_dim,
        depth=config.student.depth,
        num_heads=config.student.num_heads,
    )
    head = DINOHead(
        out_dim=config.dino.head_n_prototypes,
        use_bn=config.dino.use_bn_in_head,
        norm_last_layer=config.dino.norm_last_layer,
        nlayers=config.dino.head_nlayers,
        hidden_dim=config.dino.head_hidden_dim,
        bottleneck_dim=config.dino.head_bottleneck_dim,
        dtype=dtype,
        layers=layers,
    )
    return MultiCrop(backbone=backbone, head=head)
