"""XLA:CPU-tuned model layers: the stock layers' parameters and functions, with gradients written
out where XLA:CPU runs autodiff's form in more passes, and attention as a C++ kernel.

Each op here computes what its stock counterpart in `dino_jax.models.layers` computes (tests
compare values and gradients); only the program XLA:CPU is given differs. Used on CPU meshes only,
where `dino_jax.core.platforms` picks them; accelerators get the stock layers.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.cpu import attention_kernel
from dino_jax.models.layers import (
    LN_EPS,
    Layers,
    normal_init,
    patch_embed,
)


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """Identity whose gradient is materialised where it passes (see _barrier_bwd)."""
    return x


def _barrier_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _barrier_bwd(_: None, grad: jax.Array) -> tuple[jax.Array]:
    # XLA's CPU fusion otherwise duplicates the residual stream's chain of gradient adds into
    # every consumer (quadratic in depth), and it drops optimization barriers before fusing. A
    # conditional is a fusion boundary it keeps; a non-finite gradient gives NaN either way.
    finite = jnp.isfinite(grad.reshape(-1)[0])
    return (jax.lax.cond(finite, lambda g: g, lambda g: jnp.full_like(g, jnp.nan), grad),)


gradient_barrier.defvjp(_barrier_fwd, _barrier_bwd)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x/2 (1 + erf(x / sqrt 2)), with its gradient Phi(x) + x phi(x) written out.

    `nn.gelu(approximate=False)` is the same function written with erfc, whose XLA expansion costs
    several times more on CPU; and autodiff would keep erf(x / sqrt 2) as a residual, this keeps
    only x.
    """
    return 0.5 * x * (1.0 + _erf(x))


def _erf(x: jax.Array) -> jax.Array:
    # erf(x / sqrt 2), evaluated in float32 for 16-bit inputs as torch does.
    return jax.lax.erf(x.astype(jnp.float32) * np.float32(1 / math.sqrt(2))).astype(x.dtype)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu(x), x


def _gelu_bwd(x: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
    # erf is odd, so this is the forward's 1 + erf(x / sqrt 2) to the bit; written with -x, XLA
    # does not merge it with the forward's erf, which would keep that erf as a residual after all.
    cdf = 0.5 * (1.0 - _erf(-x))
    pdf = jnp.exp(-0.5 * x * x) * np.float32(1 / math.sqrt(2 * math.pi)).astype(x.dtype)
    return (grad * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def sum_rows(x: jax.Array) -> jax.Array:
    """x [..., F] summed over all but the last axis -> [F] float32, as ones @ x: XLA:CPU reduces
    over leading axes several times slower than it runs that matrix-vector product."""
    rows = x.reshape(-1, x.shape[-1])
    ones = jnp.ones(rows.shape[0], x.dtype)
    return jnp.matmul(
        ones, rows, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b accumulated in float32, returned in a's dtype. XLA:CPU runs a bfloat16 product on
    the CPU's matrix units (AMX) only when its output is float32."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x [..., D] @ kernel [D, F] + bias [F] in x's dtype, float32 kernel and bias gradients.

    The backward is autodiff's, but the bias gradient is `sum_rows`, and the kernel gradient
    contracts the rows of x and grad as they lie (autodiff's form made XLA:CPU write grad
    transposed first).
    """
    return matmul(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)


def _linear_fwd(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> tuple[jax.Array, tuple]:
    return linear(x, kernel, bias), (x, kernel, bias)


def _linear_bwd(saved: tuple, grad: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, kernel, bias = saved
    rows_x, rows_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    contract_rows = (((0,), (0,)), ((), ()))
    grad_kernel = jax.lax.dot_general(
        rows_x, rows_grad, contract_rows, preferred_element_type=jnp.float32
    ).astype(kernel.dtype)
    grad_x = matmul(grad, kernel.T.astype(grad.dtype))
    return grad_x, grad_kernel, sum_rows(grad).astype(bias.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nn.Module):
    """`layers.Dense`'s parameters (kernel [D, F] N(0, 0.02), bias [F] zeros, float32), applied
    as `linear` in `dtype`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", normal_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return linear(x.astype(self.dtype), kernel, bias)


def dense(features: int, dtype: Any, name: str) -> Dense:
    return Dense(features, dtype, name=name)


@jax.custom_vjp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """torch's LayerNorm over the last axis in float32: two-pass variance, eps 1e-6.

    The gradient is written out (see _layer_norm_bwd): autodiff of the same maths keeps the
    centred input and broadcasts of 1/sigma and of the scale, full-size arrays that XLA:CPU writes
    and reads again.
    """
    return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_fwd(
    x: jax.Array, scale: jax.Array, bias: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + LN_EPS)
    return (x - mean) * rstd * scale + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(
    saved: tuple[jax.Array, ...], grad: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, mean, rstd, scale = saved
    normed = (x - mean) * rstd
    grad_normed = grad * scale
    grad_x = rstd * (
        grad_normed
        - jnp.mean(grad_normed, axis=-1, keepdims=True)
        - normed * jnp.mean(grad_normed * normed, axis=-1, keepdims=True)
    )
    return grad_x, sum_rows(grad * normed), sum_rows(grad)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters (scale, bias), in float32 with the gradient of `layer_norm`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (dim,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)
        return layer_norm(x.astype(jnp.float32), scale, bias)


def make_layer_norm(name: str | None = None) -> LayerNorm:
    return LayerNorm(name=name)


class QKV(nn.Module):
    """`layers.QKV`'s one kernel [D, 3D] and bias [3D], applied as three products, one each for
    q, k and v: one product then a slice gives the same numbers, but XLA:CPU assembles its
    gradient in the [B, N, 3D] layout (pads and adds over the activations); three products
    assemble it on the [D, 3D] kernel instead, a far smaller array."""

    dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, cls_only: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        dim = self.dim
        kernel = self.param("kernel", normal_init, (dim, 3 * dim), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (3 * dim,), jnp.float32)
        x = x.astype(self.dtype)

        def project(i: int, rows: jax.Array) -> jax.Array:
            part = slice(i * dim, (i + 1) * dim)
            y = linear(rows, kernel[:, part], bias[part])
            return y.reshape(*rows.shape[:2], self.num_heads, dim // self.num_heads)

        return project(0, x[:, :1] if cls_only else x), project(1, x), project(2, x)


def qkv(dim: int, num_heads: int, dtype: Any, name: str) -> QKV:
    return QKV(dim, num_heads, dtype, name=name)


@jax.custom_vjp
def softmax(logits: jax.Array) -> jax.Array:
    """softmax over the last axis, with its gradient y (g - sum(g y)) written out: the same
    maths as autodiff's, which XLA:CPU runs in more passes."""
    return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    probs = jax.nn.softmax(logits, axis=-1)
    return probs, probs


def _softmax_bwd(probs: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
    return (probs * (grad - jnp.sum(grad * probs, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T scale) v for q, k, v [B, N, heads, hd] with heads-first products, which
    XLA:CPU runs faster than `jax.nn.dot_product_attention`'s tokens-first ones."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = softmax(logits * scale)
    out = jnp.einsum(
        "bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    ).astype(v.dtype)
    return out.transpose(0, 2, 1, 3)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T scale) v for q, k, v [B, N, heads, hd]: the C++ kernel where it is built
    and the head size a multiple of 8 (16-bit inputs widened to float32 for it, still faster
    than XLA:CPU's 16-bit batched products), else `explicit_attention`."""
    wide = [t.astype(jnp.float32) for t in (q, k, v)]
    if attention_kernel.supports(wide[0]):
        return attention_kernel.attention(*wide, scale).astype(q.dtype)
    return explicit_attention(q, k, v, scale)


def column_norms(v: jax.Array) -> jax.Array:
    """||v[:, j]|| for v [D, K] -> [K] float32, summed by `sum_rows` (XLA:CPU's reduction over
    the leading axis is several times slower than that matrix-vector product)."""
    v = v.astype(jnp.float32)
    return jnp.sqrt(sum_rows(v * v))


@jax.custom_vjp
def scaled_matmul(x: jax.Array, v: jax.Array, scale: jax.Array) -> jax.Array:
    """(x @ v) * scale: x [M, D], v [D, K] (one float dtype), scale [K] -> [M, K] float32.

    The backward is written out so that the scale's gradient is `sum_rows` of dy * (x v):
    autodiff reduces over the rows inside a fusion with the [D, K] update, which XLA:CPU runs
    ~10x slower.
    """
    return jnp.matmul(x, v, preferred_element_type=jnp.float32) * scale


def _scaled_matmul_fwd(x: jax.Array, v: jax.Array, scale: jax.Array) -> tuple[jax.Array, tuple]:
    product = jnp.matmul(x, v, preferred_element_type=jnp.float32)
    return product * scale, (x, v, scale, product)


def _scaled_matmul_bwd(saved: tuple, grad: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, v, scale, product = saved
    grad_product = (grad * scale).astype(v.dtype)
    grad_scale = sum_rows(grad * product)
    grad_x = jnp.matmul(grad_product, v.T, preferred_element_type=jnp.float32)
    grad_v = jnp.matmul(x.T, grad_product, preferred_element_type=jnp.float32)
    return grad_x.astype(x.dtype), grad_v.astype(v.dtype), grad_scale


scaled_matmul.defvjp(_scaled_matmul_fwd, _scaled_matmul_bwd)


def weight_norm_logits(x: jax.Array, v: jax.Array, g: jax.Array) -> jax.Array:
    """`layers.weight_norm_logits`: x [M, D] @ (v g / ||v||) -> [M, K] float32."""
    return scaled_matmul(x, v.astype(x.dtype), g / column_norms(v))


LAYERS = Layers(
    dense=dense,
    layer_norm=make_layer_norm,
    qkv=qkv,
    patch_embed=patch_embed,
    gelu=gelu,
    attention=attention,
    weight_norm_logits=weight_norm_logits,
    residual=gradient_barrier,
)
