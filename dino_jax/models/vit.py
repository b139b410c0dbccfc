"""The DINO Vision Transformer backbone (ViT-T/S/B) and its bicubic position-embedding resize.

Written in the blocks of `models.layers` (stock Flax and JAX unless a platform's set is given).
Parameter names follow the reference state dict (`blocks.3.attn.qkv.weight` is
`blocks_3/attn/qkv/kernel` here), so converting a released checkpoint is a rename plus transposes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.models.layers import IN_CHANS, STOCK, Layers, explicit_attention, normal_init
from dino_jax.models.registry import ARCH_SPECS

# torch's bicubic kernel constant; jax.image.resize uses -0.5, hence our own resize.
CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weights of the taps at offsets -1, 0, 1, 2 for fractional positions t in [0, 1)."""

    def near(d: np.ndarray) -> np.ndarray:  # |d| <= 1
        return ((CUBIC_A + 2) * d - (CUBIC_A + 3)) * d * d + 1

    def far(d: np.ndarray) -> np.ndarray:  # 1 < |d| < 2
        return ((CUBIC_A * d - 5 * CUBIC_A) * d + 8 * CUBIC_A) * d - 4 * CUBIC_A

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """[out_size, in_size] float64 matrix of torch's bicubic upsample along one axis.

    torch maps output index i to source coordinate (i + 0.5) / scale - 0.5 with the scale it was
    GIVEN (not in_size / out_size), does not clamp that coordinate, and clamps each tap's index.
    """
    dst = np.arange(out_size)
    src = (1.0 / scale) * (dst + 0.5) - 0.5
    base = np.floor(src)
    matrix = np.zeros((out_size, in_size))
    for offset, weight in zip((-1, 0, 1, 2), _cubic_weights(src - base), strict=True):
        taps = np.clip(base + offset, 0, in_size - 1).astype(np.int64)
        np.add.at(matrix, (dst, taps), weight)
    return matrix


def resize_pos_embed(pos_embed: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """Resize [1, 1+N, D] position embeddings of a square grid to [1, 1+grid_h*grid_w, D].

    Matches the reference's `interpolate_pos_encoding` exactly: torch bicubic with
    scale_factor (grid + 0.1) / sqrt(N) per axis; the +0.1 shifts the sampling positions, so a plain
    resize to (grid_h, grid_w) gives different numbers. The cls embedding is kept.
    """
    num_patches = pos_embed.shape[1] - 1
    if grid_h * grid_w == num_patches and grid_h == grid_w:
        return pos_embed
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, not a square grid")
    dim = pos_embed.shape[2]
    # floor(side * (grid + 0.1) / sqrt(N)) == grid, the output size torch computes.
    rows = _bicubic_matrix(side, grid_h, (grid_h + 0.1) / math.sqrt(num_patches))
    cols = _bicubic_matrix(side, grid_w, (grid_w + 0.1) / math.sqrt(num_patches))
    grid = pos_embed[0, 1:].reshape(side, side, dim)
    hp = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("hi,ijd->hjd", jnp.asarray(rows, pos_embed.dtype), grid, precision=hp)
    grid = jnp.einsum("wj,hjd->hwd", jnp.asarray(cols, pos_embed.dtype), grid, precision=hp)
    return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, grid_h * grid_w, dim)], axis=1)


class Attention(nn.Module):
    """Multi-head self-attention; returns the projected output and, on request, the weights."""

    num_heads: int
    dtype: Any = jnp.float32
    layers: Layers = STOCK

    @nn.compact
    def __call__(
        self, x: jax.Array, need_weights: bool = False, cls_only: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, N, D] -> (out [B, Q, D] in dtype, attn [B, heads, Q, N] float32 or None), Q = N
        or, with cls_only, 1: the cls token's query alone.

        Without weights, `layers.attention` computes the same softmax attention (the cls query
        alone is a matrix-vector product per head, `explicit_attention`'s).
        """
        batch, _, dim = x.shape
        qkv = self.layers.qkv(dim, self.num_heads, self.dtype, name="qkv")
        q, k, v = qkv(x, cls_only)  # [B, Q|N, heads, hd]
        scale = (dim // self.num_heads) ** -0.5
        if need_weights or cls_only:
            out, attn = explicit_attention(q, k, v, scale)
            attn = attn if need_weights else None
        else:
            out, attn = self.layers.attention(q, k, v, scale), None
        out = out.reshape(batch, q.shape[1], dim)
        return self.layers.dense(dim, self.dtype, name="proj")(out), attn


class Mlp(nn.Module):
    """Linear(D, hidden) -> exact erf GELU -> Linear(hidden, D)."""

    hidden_dim: int
    dtype: Any = jnp.float32
    layers: Layers = STOCK

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, N, D] -> [B, N, D] in dtype."""
        h = self.layers.gelu(self.layers.dense(self.hidden_dim, self.dtype, name="fc1")(x))
        return self.layers.dense(x.shape[-1], self.dtype, name="fc2")(h)


class Block(nn.Module):
    """Pre-norm transformer block with per-sample stochastic depth on both residual branches."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    layers: Layers = STOCK

    def _drop_path(self, branch: jax.Array, train: bool) -> jax.Array:
        """Zero the branch of whole samples with prob. rate, scale the kept ones by 1/keep_prob."""
        if not train or self.drop_path_rate == 0.0:
            return branch
        keep_prob = 1.0 - self.drop_path_rate
        shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
        noise = jax.random.uniform(self.make_rng("drop_path"), shape, branch.dtype)
        # One multiply of the branch by a per-sample 0 or 1/keep_prob (the reference divides,
        # then masks: the same to a rounding, with one pass less over the branch).
        return branch * (jnp.floor(keep_prob + noise) / keep_prob)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, need_weights: bool = False, cls_only: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, N, D] float32 -> (x [B, Q, D] float32, attention [B, heads, Q, N] or None),
        Q = N or, with cls_only, 1: the cls token's output alone, which attends to all N tokens
        (the others' outputs are never computed: ~7% of a 12-block ViT's FLOPs, by count)."""
        layers = self.layers
        attention = Attention(self.num_heads, self.dtype, layers, name="attn")
        branch, attn = attention(layers.layer_norm("norm1")(x), need_weights, cls_only)
        x = x[:, :1] if cls_only else x  # the residual stream of the tokens computed
        x = x + self._drop_path(branch.astype(jnp.float32), train)
        hidden = int(x.shape[-1] * self.mlp_ratio)
        branch = Mlp(hidden, self.dtype, layers, name="mlp")(layers.layer_norm("norm2")(x))
        return x + self._drop_path(branch.astype(jnp.float32), train), attn


REMAT_POLICIES = {
    "block": None,  # keep only each block's input, recompute the rest
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
}
REMATS = ("none", *REMAT_POLICIES)


def remat_block(remat: str) -> type[Block]:
    """Block, or Block rematerialised in the backward pass under the named policy."""
    if remat == "none":
        return Block
    if remat not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat={remat!r}; choose one of {', '.join(REMATS)}.")
    # train, need_weights and cls_only (positions 2-4 counting self) are Python bools.
    return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(2, 3, 4))


class VisionTransformer(nn.Module):
    """ViT backbone: NHWC images -> normed cls features; any size divisible by the patch size."""

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    img_size: int = 224  # pos_embed is built for (img_size // patch_size) ** 2 patches
    dtype: Any = jnp.float32  # matmul compute dtype; params, residuals and outputs stay float32
    remat: str = "none"  # recompute in the backward pass: "none", "block" or "dots_saveable"
    layers: Layers = STOCK  # the platform's blocks (`dino_jax.core.platforms.model_layers`)

    def setup(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        layers = self.layers
        self.patch_embed = layers.patch_embed(self.embed_dim, self.patch_size, self.dtype)
        num_patches = (self.img_size // self.patch_size) ** 2
        self.cls_token = self.param("cls_token", normal_init, (1, 1, self.embed_dim))
        self.pos_embed = self.param("pos_embed", normal_init, (1, 1 + num_patches, self.embed_dim))
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        block = remat_block(self.remat)
        self.blocks = [
            block(self.num_heads, self.mlp_ratio, float(rate), self.dtype, layers) for rate in rates
        ]
        self.norm = layers.layer_norm()

    def _tokens(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, 3] -> [B, 1 + (H/p)(W/p), D] float32: patches, cls token, positions."""
        batch, height, width, chans = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by patch_size={self.patch_size}; "
                "crop or resize it to a multiple"
            )
        if chans != IN_CHANS:
            raise ValueError(f"expected {IN_CHANS} channels (NHWC), got x.shape={x.shape}")
        patches = self.patch_embed(x).astype(jnp.float32)  # [B, H/p, W/p, D]
        grid_h, grid_w = patches.shape[1:3]
        cls = jnp.broadcast_to(self.cls_token, (batch, 1, self.embed_dim))
        tokens = jnp.concatenate([cls, patches.reshape(batch, -1, self.embed_dim)], axis=1)
        return tokens + resize_pos_embed(self.pos_embed, grid_h, grid_w)

    def _encode(
        self, x: jax.Array, train: bool, need_weights: bool = False, cls_only: bool = False
    ) -> tuple[list[jax.Array], jax.Array | None]:
        """x [B, H, W, 3] -> (each block's output [B, 1+N, D], the last block's attention
        [B, h, 1+N, 1+N] if need_weights else None). With cls_only, the last block's output is
        the cls token's alone, [B, 1, D]."""
        h = self._tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            h = self.layers.residual(h)
            h, attn = block(h, train, need_weights and last, cls_only and last)
            outputs.append(h)
        return outputs, attn

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """x [B, H, W, 3] -> cls features [B, D] float32 after the final LayerNorm. The features
        are the cls token's alone, so of the other tokens the last block computes only the keys
        and values that the cls query attends to."""
        outputs, _ = self._encode(x, train, cls_only=True)
        return self.norm(outputs[-1])[:, 0]

    def get_last_selfattention(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, 3] -> last block's softmax attention [B, heads, 1+N, 1+N] float32."""
        return self._encode(x, train=False, need_weights=True)[1]

    def get_intermediate_layers(self, x: jax.Array, n: int = 1) -> list[jax.Array]:
        """x [B, H, W, 3] -> outputs of the last n blocks, each final-normed, [B, 1+N, D]."""
        if not 1 <= n <= self.depth:
            raise ValueError(f"n={n} must be between 1 and depth={self.depth}")
        outputs, _ = self._encode(x, train=False)
        return [self.norm(h) for h in outputs[-n:]]


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-T of the registry (models/registry.py)."""
    return _registered("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-S of the registry (models/registry.py)."""
    return _registered("vit_small", patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-B of the registry (models/registry.py)."""
    return _registered("vit_base", patch_size, **kwargs)


def _registered(arch: str, patch_size: int, **kwargs: Any) -> VisionTransformer:
    spec = ARCH_SPECS[arch]
    return VisionTransformer(
        patch_size=patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        **kwargs,
    )
