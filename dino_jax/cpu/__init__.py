"""Opt-in XLA:CPU tuning, used on CPU meshes only: model layers with written-out gradients, the
C++ attention kernel, and host-memory reuse. Accelerators run the stock layers."""

from dino_jax.cpu.layers import LAYERS

__all__ = ["LAYERS"]
