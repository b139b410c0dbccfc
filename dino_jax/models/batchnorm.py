"""BatchNorm with PyTorch semantics: float32 statistics, unbiased running variance, global batch.

flax's `nn.BatchNorm` folds the *biased* batch variance into its running average; torch folds the
unbiased one (times n / (n - 1)) while still normalising with the biased one. A ResNet teacher is
evaluated with its running statistics, so the difference is visible: this module follows torch.

Under `jax.jit` a mean over a batch axis that is sharded over devices is a global mean, so the
statistics are those of the whole global batch (torch's SyncBatchNorm) without any `axis_name`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import Array, lax
from jax.nn.initializers import Initializer


class BatchNorm(nn.Module):
    """Normalises `x [..., C]` over all axes but the last, like torch `BatchNorm{1,2}d`.

    Params `scale`, `bias` [C]; collection "batch_stats" holds `mean` (init 0) and `var` (init 1).
    `momentum` follows torch: running = (1 - momentum) * running + momentum * batch.
    Statistics and normalisation are computed in float32; the output is cast to `dtype`.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        """x [..., C] → [..., C]; train=True uses batch statistics and updates the running ones."""
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        x32 = x.astype(jnp.float32)
        if train:
            mean, var = _batch_stats(x32)
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                n = x.size // features
                # torch stores the unbiased variance but normalises with the biased one.
                unbiased = var * (n / (n - 1))
                running_mean.value = _ema(running_mean.value, mean, self.momentum)
                running_var.value = _ema(running_var.value, unbiased, self.momentum)
        else:
            mean, var = running_mean.value, running_var.value

        y = (x32 - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)


def _batch_stats(x: Array) -> tuple[Array, Array]:
    """Mean and biased variance of `x [..., C]` over all axes but the last → ([C], [C])."""
    if x.size // x.shape[-1] < 2:
        raise ValueError(
            f"BatchNorm in train mode needs more than 1 value per channel, got input shape "
            f"{x.shape}; use a larger batch or train=False"
        )
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    # Two-pass variance: E[x²] - E[x]² loses precision when |mean| >> std.
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return mean, var


def _ema(running: Array, batch: Array, momentum: float) -> Array:
    """torch's running-statistics update: (1 - momentum) * running + momentum * batch."""
    return (1.0 - momentum) * running + momentum * batch
