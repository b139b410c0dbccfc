"""Backbones, the DINO head, the multi-crop network, and the registry that builds them."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from dino_jax.models.dino import MultiCrop
from dino_jax.models.dinov2 import DinoV2Networks
from dino_jax.models.head import DINOHead
from dino_jax.models.layers import STOCK, Layers
from dino_jax.models.registry import (
    ARCH_SPECS,
    ARCHS,
    DINOV2_ARCHS,
    VIT_ARCHS,
    ArchSpec,
    model_spec,
)
from dino_jax.models.resnet import ResNet, resnet50
from dino_jax.models.vit import (
    FFN_LAYERS,
    REMATS,
    VisionTransformer,
    dinov2_vit,
    vit_base,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHS",
    "ARCH_SPECS",
    "DINOV2_ARCHS",
    "FFN_LAYERS",
    "REMATS",
    "VIT_ARCHS",
    "ArchSpec",
    "DINOHead",
    "DinoV2Networks",
    "Layers",
    "MultiCrop",
    "ResNet",
    "VisionTransformer",
    "backbone_of",
    "build_backbone",
    "build_dino",
    "build_dinov2",
    "dinov2_vit",
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
    **vit_options,
):
    """The backbone named by `arch` (DINO's "vit_tiny", "vit_small", "vit_base", "resnet50";
    DINOv2's "dinov2_vit_small", ..., "dinov2_vit_giant2").

    `vit_options` are VisionTransformer fields: the sizes (embed_dim, depth, num_heads) replace
    a ViT's where set, DINOv2's options (layerscale, ffn_layer, ...) apply as given; `remat`
    (ViTs only) recomputes blocks in the backward pass; `layers` (ViTs only) are the platform's
    blocks (`dino_jax.core.platforms.model_layers`), stock Flax by default.
    """
    if arch in VIT_ARCHS:
        fields = {
            "patch_size": patch_size,
            "drop_path_rate": drop_path_rate,
            "img_size": img_size,
            "dtype": dtype,
            "remat": remat,
            "layers": layers,
        }
        vit = dinov2_vit(arch, **fields) if arch in DINOV2_ARCHS else _VITS[arch](**fields)
        sizes = ("embed_dim", "depth", "num_heads")
        return vit.clone(
            **{k: v for k, v in vit_options.items() if k not in sizes or v is not None}
        )
    if arch == "resnet50":
        return resnet50(dtype=dtype)
    raise ValueError(f"Unknown arch={arch!r}; choose one of {', '.join(ARCHS)}.")


def vit_options(student: ml_collections.ConfigDict) -> dict:
    """The VisionTransformer fields of a config's `student` section beyond arch and patch."""
    if student.arch not in VIT_ARCHS:
        return {}
    options = {
        k: student[k]
        for k in ("embed_dim", "depth", "num_heads", "interpolate_offset", "interpolate_antialias")
    }
    if student.arch in DINOV2_ARCHS:
        keys = ("layerscale", "ffn_layer", "num_register_tokens", "drop_path_uniform")
        options.update({k: student[k] for k in keys})
    return options


def backbone_of(config: ml_collections.ConfigDict):
    """The float32, stochastic-depth-free backbone module that `config` trains."""
    student = config.student
    return build_backbone(
        student.arch,
        patch_size=student.patch_size,
        img_size=student.img_size,
        **vit_options(student),
    )


def _training_backbone(config: ml_collections.ConfigDict, teacher: bool, layers: Layers):
    """The backbone a run trains: the student's with stochastic depth, the teacher's without."""
    student = config.student
    return build_backbone(
        student.arch,
        patch_size=student.patch_size,
        drop_path_rate=0.0 if teacher else student.drop_path_rate,
        img_size=student.img_size,
        dtype=jnp.dtype(config.compute.dtype),
        remat=config.compute.remat,
        layers=layers,
        **vit_options(student),
        **({"scan_blocks": True} if config.compute.scan_blocks else {}),
    )


def build_dino(
    config: ml_collections.ConfigDict, *, teacher: bool = False, layers: Layers = STOCK
) -> MultiCrop:
    """The student (with stochastic depth) or the teacher (without) network of `config`, built
    from `layers` (the platform's, `dino_jax.core.platforms.model_layers`)."""
    dtype = jnp.dtype(config.compute.dtype)
    backbone = _training_backbone(config, teacher, layers)
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


def build_dinov2(
    config: ml_collections.ConfigDict, *, teacher: bool = False, layers: Layers = STOCK
) -> DinoV2Networks:
    """DINOv2's student (with stochastic depth) or teacher (without) of `config`: the backbone,
    the DINO head and, with ibot.separate_head, the iBOT head (dinov2/layers/dino_head.py:
    DINOHead, whose last layer's weight_g is trained)."""
    dtype = jnp.dtype(config.compute.dtype)

    def head(section: ml_collections.ConfigDict) -> DINOHead:
        return DINOHead(
            out_dim=section.head_n_prototypes,
            norm_last_layer=False,
            nlayers=section.head_nlayers,
            hidden_dim=section.head_hidden_dim,
            bottleneck_dim=section.head_bottleneck_dim,
            dtype=dtype,
            layers=layers,
        )

    separate = config.ibot.separate_head and config.ibot.loss_weight > 0
    backbone = _training_backbone(config, teacher, layers)
    # Each rank draws its own stochastic-depth subsets, so that on an accelerator mesh they stay
    # on the rank's devices. The CPU layers' attention kernel partitions only whole-mesh batch
    # splits: on a CPU the subsets are drawn over the whole batch.
    if config.train.rank_batch_size and layers is STOCK:
        backbone = backbone.clone(
            drop_path_groups=config.train.batch_size // config.train.rank_batch_size
        )
    return DinoV2Networks(
        backbone=backbone,
        dino_head=head(config.dino),
        ibot_head=head(config.ibot) if separate else None,
    )
