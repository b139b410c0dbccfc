"""The model registry: each architecture's name, family, sizes and what it can output, the one
description that building, checkpoints, state-dict conversion, platform layers and monitors read."""

from __future__ import annotations

import dataclasses

import ml_collections

# The config keys that describe a backbone: a checkpoint's arrays fit only a config that agrees on
# every one of them.
CONFIG_KEYS = tuple(
    f"student.{k}" for k in ("arch", "patch_size", "img_size", "embed_dim", "depth", "num_heads")
)
VIT_OUTPUTS = ("cls", "patch_tokens", "intermediate_layers", "attention")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """An architecture: `family` ("vit" or "resnet"), its feature width `embed_dim`, its `depth`
    (ViT blocks) and attention `num_heads` (0 for a ResNet), and what it can output."""

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
}
ARCHS = tuple(ARCH_SPECS)
VIT_ARCHS = tuple(name for name, spec in ARCH_SPECS.items() if spec.family == "vit")


def model_spec(config: ml_collections.ConfigDict) -> ArchSpec:
    """The spec of `student.arch` with the config's size overrides (`student.embed_dim`, `depth`,
    `num_heads` where set) applied to a ViT."""
    if config.student.arch not in ARCH_SPECS:
        raise ValueError(
            f"Unknown student.arch={config.student.arch!r}; choose one of {', '.join(ARCHS)}."
        )
    spec = ARCH_SPECS[config.student.arch]
    if spec.family != "vit":
        return spec
    student = config.student
    overrides = {k: student[k] for k in ("embed_dim", "depth", "num_heads") if student[k]}
    return dataclasses.replace(spec, **overrides)
