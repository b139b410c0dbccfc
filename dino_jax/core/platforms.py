"""The platform a step runs on, decided once from its mesh, and the model layers for it.

A step traced on one host for other devices (a CPU host compiling for a TPU slice) must build the
program of those devices, so nothing here asks `jax.default_backend()`: the mesh's devices say
which platform it is, or `config.compute.platform` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from dino_jax import cpu
from dino_jax.models import layers, model_spec

PLATFORMS = ("cpu", "gpu", "tpu")
_GPU_NAMES = ("gpu", "cuda", "rocm")


def mesh_platform(mesh: Mesh, requested: str = "auto") -> str:
    """The platform ("cpu", "gpu" or "tpu"): `requested` unless "auto", else the mesh devices'."""
    if requested != "auto":
        if requested not in PLATFORMS:
            raise ValueError(
                f"Unknown platform={requested!r}; choose auto or one of {', '.join(PLATFORMS)}."
            )
        return requested
    platform = mesh.devices.flat[0].platform
    return "gpu" if platform in _GPU_NAMES else platform


def model_layers(config: ml_collections.ConfigDict, mesh: Mesh) -> layers.Layers:
    """The model's blocks for the mesh's platform: on CPU, dino_jax.cpu's tuned layers unless
    `compute.cpu_tuning` is False; on GPUs with a 16-bit compute dtype, cuDNN's flash attention
    where cuDNN takes it; otherwise the stock layers with XLA's attention."""
    platform = mesh_platform(mesh, config.compute.platform)
    if platform == "cpu":
        return cpu.LAYERS if config.compute.cpu_tuning else layers.STOCK
    if platform == "gpu" and config.compute.dtype in ("bfloat16", "float16"):
        head_dim = model_spec(config).head_dim
        if head_dim and cudnn_attention_works(config.compute.dtype, head_dim):
            return layers.stock(attention="cudnn")
    return layers.STOCK


@functools.cache
def cudnn_attention_works(dtype: str, head_dim: int) -> bool:
    """Whether `jax.nn.dot_product_attention(implementation="cudnn")` traces for these inputs:
    it needs cuDNN present (a CPU host compiling for GPUs may lack it) and a head size and dtype
    it takes. Where it does not, XLA's attention runs instead."""
    q = jax.ShapeDtypeStruct((1, 197, 1, head_dim), jnp.dtype(dtype))
    try:
        jax.eval_shape(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, q, q
        )
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True
