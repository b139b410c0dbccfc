"""The building blocks the models are written in: stock Flax and JAX layers, one set per platform.

`Layers` names each block the ViT and the DINO head use. `stock()` gives Flax's and JAX's own,
the program XLA optimises for TPUs and GPUs; `dino_jax.cpu.LAYERS` gives XLA:CPU-tuned ones with
the same parameters and the same numbers. The platform's set is chosen once, in the shell, from
the mesh (`dino_jax.core.platforms`), never inside traced code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

IN_CHANS = 3  # RGB images
LN_EPS = 1e-6
INIT_STD = 0.02
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")

# The reference's trunc_normal_(std=0.02) truncates at ±2 absolute (±100 std): a plain normal.
normal_init = nn.initializers.normal(INIT_STD)


def uniform_init(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound), for a bias whose fan-in the initializer cannot see."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# Products of 16-bit activations and float32 parameters: both rounded to 16 bits inside the
# product, accumulated in float32.
_ALGORITHMS = {
    jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
    jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32,
}


def _dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs) -> jax.Array:
    """lax.dot_general into float32 of activations in the compute dtype and a float32 parameter.

    The parameter enters the product as it is, rounded to 16 bits by the product's algorithm,
    not by a cast before it: a cast's transpose would round its gradient to 16 bits, and XLA
    could then all-reduce it in 16 bits. This way the parameter's gradient is a float32 product
    and its reduction over the batch (the data-parallel all-reduce) is float32.
    """
    if lhs.dtype != rhs.dtype:
        precision = _ALGORITHMS[jnp.dtype(lhs.dtype)]
    return jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32
    )


def _inputs_in_dtype(inputs, kernel, bias, *, dtype=None, inexact=True):
    """Flax's promote_dtype for the inputs alone: kernel and bias stay float32 (see
    `_dot_general`; the bias is added to the float32 product)."""
    del inexact
    return (inputs if dtype is None else inputs.astype(dtype)), kernel, bias


def mixed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] in the compute dtype @ float32 w [D, F] -> [..., F] float32 (`_dot_general`)."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return _dot_general(x, w, dims)


class Dense(nn.Dense):
    """nn.Dense with the reference Linear's init (kernel [D, F] N(0, 0.02), bias zeros), float32
    parameters and gradients, products accumulated in float32 and the output in `dtype`."""

    kernel_init: nn.initializers.Initializer = normal_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    dot_general: Any = _dot_general
    promote_dtype: Any = _inputs_in_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x).astype(self.dtype or x.dtype)


def dense(features: int, dtype: Any, name: str) -> Dense:
    return Dense(features, dtype=dtype, name=name)


def layer_norm(name: str | None = None) -> nn.LayerNorm:
    """torch's LayerNorm: eps 1e-6, two-pass variance, float32 whatever the compute dtype."""
    return nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )


class QKV(Dense):
    """The reference's qkv Linear(D, 3D) (kernel [D, 3D], bias [3D]) split as it splits it:
    x [B, N, D] -> q, k, v [B, N, heads, hd] in dtype; with cls_only, q is the cls token's alone,
    [B, 1, heads, hd]."""

    num_heads: int = 1

    def __call__(
        self, x: jax.Array, cls_only: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        batch, tokens, _ = x.shape
        qkv = super().__call__(x).reshape(batch, tokens, 3, self.num_heads, -1)
        q, k, v = (qkv[:, :, i] for i in range(3))
        return (q[:, :1] if cls_only else q), k, v


def qkv(dim: int, num_heads: int, dtype: Any, name: str) -> QKV:
    return QKV(3 * dim, dtype=dtype, num_heads=num_heads, name=name)


class PatchEmbed(nn.Module):
    """The reference's PatchEmbed (vision_transformer.py), a stride-p conv of p x p patches, as
    the one matmul it is: [B, H, W, C] -> [B, H/p, W/p, D] float32. nn.Conv's parameters (kernel
    [p, p, C, D] with torch Conv2d's default init U(±1/sqrt(fan_in)), bias alike) and sums in
    the same (p, p, C) order; the float32 kernel enters the product as `mixed_matmul` feeds it,
    so its gradient and that gradient's all-reduce stay float32 (a conv needs equal dtypes, and
    a cast's transpose would round the gradient to 16 bits)."""

    features: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, (batch, height, width, chans) = self.patch_size, x.shape
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            (p, p, chans, self.features),
        )
        bias = self.param("bias", uniform_init(1.0 / math.sqrt(IN_CHANS * p * p)), (self.features,))
        grid = (batch, height // p, width // p)
        patches = x.reshape(*grid[:2], p, grid[2], p, chans).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(*grid, p * p * chans).astype(self.dtype)
        return mixed_matmul(patches, kernel.reshape(-1, self.features)) + bias


def patch_embed(features: int, patch_size: int, dtype: Any, name: str | None = None) -> PatchEmbed:
    return PatchEmbed(features, patch_size, dtype, name=name)


def exact_gelu(x: jax.Array) -> jax.Array:
    """torch's nn.GELU(): x Phi(x) with the erf, not the tanh approximation."""
    return nn.gelu(x, approximate=False)


def explicit_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    """The reference's attention for q, k, v [B, N, heads, hd]: (q @ k^T) * scale, softmax in
    float32, @ v. -> (out [B, Q, heads, hd] in v's dtype, weights [B, heads, Q, N] float32)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * scale, axis=-1)
    out = jnp.einsum(
        "bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.astype(v.dtype), weights


def weight_norm_logits(x: jax.Array, v: jax.Array, g: jax.Array) -> jax.Array:
    """x [M, D] @ (v g / ||v||) for float32 v [D, K] and g [K], norms per column -> [M, K]
    float32, as (x @ v) * (g / ||v||) with the product in x's dtype: the [D, K] normalised
    weight is never formed."""
    scale = g / jnp.sqrt(jnp.sum(jnp.square(v), axis=0))
    return mixed_matmul(x, v) * scale


def identity(x: jax.Array) -> jax.Array:
    return x


@dataclasses.dataclass(frozen=True)
class Layers:
    """The blocks a model is built from. Every set makes the same parameters (names, shapes,
    init) and computes the same functions; they differ only in how XLA is asked to run them."""

    dense: Callable[..., nn.Module]  # (features, dtype, name) -> x [..., D] -> [..., F] in dtype
    layer_norm: Callable[..., nn.Module]  # (name=None) -> x [..., D] -> float32
    qkv: Callable[..., nn.Module]  # (dim, num_heads, dtype, name) -> (x, cls_only) -> q, k, v
    # (features, patch_size, dtype, name=None) -> [B, H, W, 3] -> [B, H/p, W/p, D] float32
    patch_embed: Callable[..., nn.Module]
    gelu: Callable[[jax.Array], jax.Array]
    # softmax(q k^T scale) v for q, k, v [B, N, heads, hd] -> [B, N, heads, hd]
    attention: Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]
    weight_norm_logits: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    residual: Callable[[jax.Array], jax.Array] = identity  # applied to each block's input


def _dot_product_attention(implementation: str, q, k, v, scale: float) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def stock(attention: str = "xla") -> Layers:
    """Flax's and JAX's own layers; attention by `jax.nn.dot_product_attention` with the given
    implementation ("xla", or "cudnn": cuDNN's flash attention for 16-bit inputs on GPUs)."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        choices = ", ".join(ATTENTION_IMPLEMENTATIONS)
        raise ValueError(f"Unknown attention={attention!r}; choose one of {choices}.")
    return Layers(
        dense=dense,
        layer_norm=layer_norm,
        qkv=qkv,
        patch_embed=patch_embed,
        gelu=exact_gelu,
        attention=partial(_dot_product_attention, attention),
        weight_norm_logits=weight_norm_logits,
    )


STOCK = stock()
