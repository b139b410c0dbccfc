"""The model registry: each architecture's name, family, sizes and what it can output, the one
description that building, checkpoints, state-dict conversion, platform layers and monitors read."""

from __future__ import annotations

import dataclasses

import ml_collections

# The config keys that describe a backbone: a checkpoint's arrays fit only a config that agrees on
# every one of them.
BACKBONE_KEYS = (
    "arch",
    "patch_size",
    "img_size",
    "embed_dim",
    "depth",
    "num_heads",
    "layerscale",
    "ffn_layer",
    "num_register_tokens",
    "interpolate_offset",
    "interpolate_antialias",
)
CONFIG_KEYS = tuple(f"student.{k}" for k in BACKBONE_KEYS)
VIT_OUTPUTS = ("cls", "patch_tokens", "intermediate_layers", "attention")
# DINOv2's ViTs add register tokens and the mask token's masked forward.
DINOV2_OUTPUTS = (*VIT_OUTPUTS, "register_tokens", "masked_features")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """An architecture: `family` ("vit": DINO's ViT, "dinov2_vit": DINOv2's, or "resnet"), its
    feature width `embed_dim`, its `depth` (ViT blocks) and attention `num_heads` (0 for a
    ResNet), and what it can output."""

    family: str
    embed_dim: int
    depth: int
    num_heads: int
    outputs: tuple[str, ...]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads if self.num_heads else 0


# vision_transformer.py: vit_tiny/vit_small/vit_base; torchvision's resnet50 without fc.
ARCH_SPECS = {
    "vit_tiny": ArchSpec("vit", 192, 12, 3, VIT_OUTPUTS),
    "vit_small": ArchSpec("vit", 384, 12, 6, VIT_OUTPUTS),
    "vit_base": ArchSpec("vit", 768, 12, 12, VIT_OUTPUTS),
    "resnet50": ArchSpec("resnet", 2048, 0, 0, ("cls",)),
    # dinov2/models/vision_transformer.py: vit_small/vit_base/vit_large/vit_giant2.
    "dinov2_vit_small": ArchSpec("dinov2_vit", 384, 12, 6, DINOV2_OUTPUTS),
    "dinov2_vit_base": ArchSpec("dinov2_vit", 768, 12, 12, DINOV2_OUTPUTS),
    "dinov2_vit_large": ArchSpec("dinov2_vit", 1024, 24, 16, DINOV2_OUTPUTS),
    "dinov2_vit_giant2": ArchSpec("dinov2_vit", 1536, 40, 24, DINOV2_OUTPUTS),
}
ARCHS = tuple(ARCH_SPECS)
VIT_ARCHS = tuple(n for n, s in ARCH_SPECS.items() if s.family in ("vit", "dinov2_vit"))
DINOV2_ARCHS = tuple(n for n, s in ARCH_SPECS.items() if s.family == "dinov2_vit")


def model_spec(config: ml_collections.ConfigDict) -> ArchSpec:
    """The spec of `student.arch` with the config's size overrides (`student.embed_dim`, `depth`,
    `num_heads` where set) applied to a ViT."""
    if config.student.arch not in ARCH_SPECS:
        raise ValueError(
            f"Unknown student.arch={config.student.arch!r}; choose one of {', '.join(ARCHS)}."
        )
    spec = ARCH_SPECS[config.student.arch]
    if spec.family not in ("vit", "dinov2_vit"):
        return spec
    student = config.student
    overrides = {k: student[k] for k in ("embed_dim", "depth", "num_heads") if student[k]}
    return dataclasses.replace(spec, **overrides)
