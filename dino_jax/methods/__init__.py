"""Self-distillation methods: what DINO (and later DINOv2, DINOv3) compute inside the generic
train step of `dino_jax.core.step`, each behind the `Method` interface, chosen by
`config.method`."""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from dino_jax.methods.base import Apply, Method
from dino_jax.methods.dino import Dino
from dino_jax.methods.dinov2 import DinoV2

__all__ = ["METHODS", "Apply", "Dino", "DinoV2", "Method", "get_method"]

METHODS: dict[str, type] = {"dino": Dino, "dinov2": DinoV2}


def get_method(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Method:
    """The method `config.method` names, bound to `config` (and to the `mesh` a step is built
    for, where the method lays out arrays of its own)."""
    if config.method not in METHODS:
        raise ValueError(
            f"Unknown method={config.method!r}; choose one of {', '.join(sorted(METHODS))}."
        )
    return METHODS[config.method](config, mesh)
