"""The DINO projection head: MLP → L2-normalise → weight-normalised linear layer to K logits.

Follows `DINOHead` of facebookresearch/dino (vision_transformer.py). Parameter names, for checkpoint
conversion: Dense `mlp_{i}` in order, BatchNorm `bn_{i}`, and `last_layer` with `kernel_v`
[bottleneck, K] and, only when trainable (norm_last_layer=False), `weight_g` [1, K].
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from dino_jax.models.batchnorm import BatchNorm
from dino_jax.models.layers import STOCK, Layers

# torch's default Linear init, kaiming_uniform(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# i.e. variance 1 / (3 fan_in). The reference's N(0, 0.02) init runs before the last layer exists,
# so the last layer keeps this default.
last_layer_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x [..., D] / max(||x||, eps) along the last axis, as torch `F.normalize`."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


class WeightNormDense(nn.Module):
    """Bias-free linear layer with W = g · v / ||v||, the norm taken per output unit.

    With `trainable_g=False`, g is fixed at 1 and is not a parameter at all, so no optimizer
    or weight decay can touch it. Otherwise `weight_g` is [1, K]: 2-D like the reference's
    (K, 1) tensor, so it is weight-decayed as there.
    """

    features: int
    trainable_g: bool = False
    dtype: Any = jnp.float32
    layers: Layers = STOCK

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [..., D] → [..., features] float32."""
        v = self.param("kernel_v", last_layer_init, (x.shape[-1], self.features), jnp.float32)
        g = jnp.ones((self.features,), jnp.float32)
        if self.trainable_g:
            g = self.param("weight_g", nn.initializers.ones, (1, self.features), jnp.float32)[0]
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        logits = self.layers.weight_norm_logits(rows, v, g)
        return logits.reshape(*x.shape[:-1], self.features)


class DINOHead(nn.Module):
    """Linear(D, hidden) [BN] GELU, (nlayers - 2) x Linear(hidden, hidden) [BN] GELU,
    Linear(hidden, bottleneck), L2-normalise, weight-normalised Linear(bottleneck, out_dim).

    nlayers=1 makes the MLP a single Linear(D, bottleneck). BatchNorm normalises over all leading
    axes (torch BatchNorm1d over all rows) and uses batch statistics when train=True. Matmuls run in
    `dtype`; params, the normalisation and the output are float32. With norm_last_layer=True the
    logits are cosines in [-1, 1].
    """

    out_dim: int
    use_bn: bool = False
    norm_last_layer: bool = True
    nlayers: int = 3
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    dtype: Any = jnp.float32
    layers: Layers = STOCK

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x [..., D] (any leading axes, e.g. [B, n_crops, D]) → logits [..., out_dim] float32."""
        if self.nlayers < 1:
            raise ValueError(f"DINOHead nlayers={self.nlayers} must be at least 1")
        dense = self.layers.dense
        for i in range(self.nlayers - 1):
            x = dense(self.hidden_dim, self.dtype, f"mlp_{i}")(x)
            if self.use_bn:
                x = BatchNorm(dtype=self.dtype, name=f"bn_{i}")(x, train=train)
            x = self.layers.gelu(x)
        x = dense(self.bottleneck_dim, self.dtype, f"mlp_{self.nlayers - 1}")(x)
        x = l2_normalize(x.astype(jnp.float32))
        last = WeightNormDense(
            self.out_dim, not self.norm_last_layer, self.dtype, self.layers, name="last_layer"
        )
        return last(x)
