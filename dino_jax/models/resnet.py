"""torchvision's ResNet-50 (bottleneck v1.5) without the classifier, as a DINO backbone.

Layout, padding, initialisation and parameter names follow torchvision so that its checkpoints
convert one-to-one: `conv1`, `bn1`, `layer{1..4}_{i}/{conv,bn}{1,2,3}`, `downsample_{conv,bn}`.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from dino_jax.models.batchnorm import BatchNorm

EXPANSION = 4  # Bottleneck output channels = planes * EXPANSION.

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal with
# std sqrt(2 / (out * kh * kw)); flax's fan_out of a (kh, kw, in, out) kernel is out * kh * kw.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """Bias-free conv with torch's symmetric padding kernel // 2 ("SAME" pads asymmetrically)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        name=name,
    )


class Bottleneck(nn.Module):
    """1x1 → 3x3 (carries the stride, v1.5) → 1x1 (planes * 4), plus identity or downsample."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        """x [B, H, W, C] → [B, H / stride, W / stride, planes * 4]."""
        out_features = self.planes * EXPANSION
        y = conv(self.planes, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train=train))
        y = conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train=train))
        y = conv(out_features, 1, 1, self.dtype, "conv3")(y)
        y = BatchNorm(dtype=self.dtype, name="bn3")(y, train=train)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = conv(out_features, 1, self.stride, self.dtype, "downsample_conv")(x)
            x = BatchNorm(dtype=self.dtype, name="downsample_bn")(x, train=train)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Bottleneck ResNet ending in global average pooling; `resnet50()` is torchvision's.

    Convs run in `dtype` with float32 params; BatchNorm statistics are float32 and, under jit with
    a sharded batch, global. train=True normalises with batch statistics (and updates the running
    ones when "batch_stats" is mutable); train=False uses the running statistics.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    dtype: Any = jnp.float32

    @property
    def embed_dim(self) -> int:
        """Feature size of the output: the last stage's planes times the bottleneck expansion."""
        return self.width * 2 ** (len(self.stage_sizes) - 1) * EXPANSION

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x [B, H, W, 3] (NHWC) → pooled features [B, embed_dim] float32."""
        x = conv(self.width, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train=train))
        # reduce_window pads with the init value -inf, so padding never wins the max (as torch).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                block = Bottleneck(
                    planes=self.width * 2**stage,
                    stride=stride,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{i}",
                )
                x = block(x, train=train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resnet50(**kwargs: Any) -> ResNet:
    """torchvision's ResNet-50 without `fc`: 23,508,032 params, 2048-d output."""
    return ResNet(stage_sizes=(3, 4, 6, 3), **kwargs)
