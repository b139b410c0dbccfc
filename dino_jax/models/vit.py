"""The Vision Transformer of the DINO family and its bicubic position-embedding resize.

One module is both DINO's `VisionTransformer` (dino/vision_transformer.py) and DINOv2's
`DinoVisionTransformer` (dinov2/models/vision_transformer.py, with `dinov2=True`): LayerScale, a
SwiGLU FFN, register tokens, a mask token, both position-embedding interpolations and DINOv2's
stochastic depth are options that DINO's ViT leaves off. Written in the blocks of `models.layers`
(stock Flax and JAX unless a platform's set is given). Parameter names follow the official state
dicts (`blocks.3.attn.qkv.weight` is `blocks_3/attn/qkv/kernel` here), so converting a released
checkpoint is a rename plus transposes.
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


def _antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 matrix of torch's bicubic resize with antialias=True to a
    given size (aten's separable AA kernels, as PIL): the cubic kernel with A = -0.5, widened by
    the scale when shrinking, its taps normalised to sum 1."""
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)

    def cubic(d: np.ndarray) -> np.ndarray:
        a, d = -0.5, np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return np.where(d < 1, near, np.where(d < 2, far, 0.0))

    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = cubic((taps - center + 0.5) * inv)
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix


def resize_pos_embed(
    pos_embed: jax.Array,
    grid_h: int,
    grid_w: int,
    offset: float = 0.1,
    antialias: bool = False,
    prefix: int = 1,
) -> jax.Array:
    """Resize [1, prefix+N, D] position embeddings of a square grid of N patches to
    [1, prefix+grid_h*grid_w, D], the first `prefix` (the cls token's) kept.

    As the official `interpolate_pos_encoding`: torch bicubic (A = -0.75) with scale_factor
    (grid + offset) / sqrt(N) per axis when offset is non-zero (DINO's and DINOv2's 0.1 shifts
    the sampling positions, so a plain resize to (grid_h, grid_w) gives different numbers), or to
    the size (grid_h, grid_w) when it is 0; antialias as torch's antialiased bicubic (DINOv2's
    hub models with registers: offset 0, antialias).
    """
    num_patches = pos_embed.shape[1] - prefix
    if grid_h * grid_w == num_patches and grid_h == grid_w:
        return pos_embed
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, not a square grid")
    dim = pos_embed.shape[2]
    if antialias:
        if offset:
            raise ValueError("an antialiased resize takes a size, not a scale: set offset=0")
        rows, cols = (
            _antialiased_bicubic_matrix(side, grid_h),
            _antialiased_bicubic_matrix(side, grid_w),
        )
    else:
        # With the offset, floor(side * (grid + offset) / side) == grid, torch's output size.
        rows = _bicubic_matrix(side, grid_h, (grid_h + offset) / side if offset else grid_h / side)
        cols = _bicubic_matrix(side, grid_w, (grid_w + offset) / side if offset else grid_w / side)
    grid = pos_embed[0, prefix:].reshape(side, side, dim)
    hp = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("hi,ijd->hjd", jnp.asarray(rows, pos_embed.dtype), grid, precision=hp)
    grid = jnp.einsum("wj,hjd->hwd", jnp.asarray(cols, pos_embed.dtype), grid, precision=hp)
    resized = grid.reshape(1, grid_h * grid_w, dim)
    return jnp.concatenate([pos_embed[:, :prefix], resized], axis=1)


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


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
    """DINOv2's SwiGLUFFNFused hidden width: 2/3 of the MLP's, rounded up to a multiple of 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """DINOv2's SwiGLUFFNFused: w12 (D -> 2 hidden, rows [w1; w2]), silu(w1 x) * (w2 x), w3."""

    hidden_dim: int
    dtype: Any = jnp.float32
    layers: Layers = STOCK

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, N, D] -> [B, N, D] in dtype."""
        x12 = self.layers.dense(2 * self.hidden_dim, self.dtype, name="w12")(x)
        x1, x2 = jnp.split(x12, 2, axis=-1)
        return self.layers.dense(x.shape[-1], self.dtype, name="w3")(jax.nn.silu(x1) * x2)


class LayerScale(nn.Module):
    """DINOv2's LayerScale: the branch times a learned per-channel gamma."""

    init_values: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],))
        return x * gamma


FFN_LAYERS = ("mlp", "swiglufused", "swiglu")  # "swiglu" is DINOv2's name for the same layer
# DINOv2's Block uses its batch-subset stochastic depth above this rate, per-sample DropPath below.
SUBSET_DROP_PATH_ABOVE = 0.1


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches: DINO's Block,
    or with `dinov2` DINOv2's (optional LayerScale and SwiGLU FFN)."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    layers: Layers = STOCK
    layerscale: float | None = None  # LayerScale's initial gamma; None: no LayerScale
    ffn_layer: str = "mlp"
    # DINOv2's stochastic depth above a rate of 0.1: each branch runs on a random subset of
    # int(b (1 - rate)) samples, added back scaled by b / subset (dinov2/layers/block.py:
    # drop_add_residual_stochastic_depth); DINO's per-sample DropPath otherwise.
    dinov2: bool = False
    # The subsets are drawn in this many contiguous groups of the batch, each its own, as each
    # official GPU draws from its own samples: a group stays on its devices.
    drop_path_groups: int = 1

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

    def _residual(self, x: jax.Array, branch, train: bool, cls_only: bool = False) -> jax.Array:
        """x's residual stream (its cls token alone with cls_only) + the stochastic-depth-dropped
        branch(x)."""
        stream = x[:, :1] if cls_only else x
        if train and self.dinov2 and self.drop_path_rate > SUBSET_DROP_PATH_ABOVE:
            groups = self.drop_path_groups
            if groups == 1:
                batch = x.shape[0]
                subset = max(int(batch * (1 - self.drop_path_rate)), 1)
                index = jax.random.permutation(self.make_rng("drop_path"), batch)[:subset]
                self.sow("intermediates", "drop_path_subset", index)  # for tests and inspection
                return stream.at[index].add(branch(x[index]) * (batch / subset))
            return self._grouped_subset_residual(x, stream, branch)
        return stream + self._drop_path(branch(x), train)

    def _grouped_subset_residual(self, x: jax.Array, stream: jax.Array, branch) -> jax.Array:
        """The batch-subset residual drawn in `drop_path_groups` contiguous groups."""
        groups = self.drop_path_groups
        if x.shape[0] % groups:
            raise ValueError(f"a batch of {x.shape[0]} is not {groups} equal drop-path groups")
        batch = x.shape[0] // groups
        subset = max(int(batch * (1 - self.drop_path_rate)), 1)
        keys = jax.random.split(self.make_rng("drop_path"), groups)
        index = jax.vmap(lambda k: jax.random.permutation(k, batch)[:subset])(keys)
        self.sow("intermediates", "drop_path_subset", index)  # [groups, subset], per group
        x = x.reshape(groups, batch, *x.shape[1:])
        picked = jax.vmap(lambda rows, i: rows[i])(x, index)  # [groups, subset, ...]
        out = branch(picked.reshape(groups * subset, *x.shape[2:])) * (batch / subset)
        out = out.reshape(groups, subset, *out.shape[1:])
        grouped = stream.reshape(groups, batch, *stream.shape[1:])
        added = jax.vmap(lambda rows, i, y: rows.at[i].add(y))(grouped, index, out)
        return added.reshape(stream.shape)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, need_weights: bool = False, cls_only: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, N, D] float32 -> (x [B, Q, D] float32, attention [B, heads, Q, N] or None),
        Q = N or, with cls_only, 1: the cls token's output alone, which attends to all N tokens
        (the others' outputs are never computed: ~7% of a 12-block ViT's FLOPs, by count)."""
        layers = self.layers
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"Unknown ffn_layer={self.ffn_layer!r}; choose one of {FFN_LAYERS}.")
        attention = Attention(self.num_heads, self.dtype, layers, name="attn")
        norm1, norm2 = layers.layer_norm("norm1"), layers.layer_norm("norm2")
        if self.ffn_layer == "mlp":
            ffn = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, layers, name="mlp")
        else:
            hidden = swiglu_hidden_dim(x.shape[-1], self.mlp_ratio)
            ffn = SwiGLUFFN(hidden, self.dtype, layers, name="mlp")
        if self.layerscale is None:
            ls1 = ls2 = lambda y: y
        else:
            ls1, ls2 = (
                LayerScale(self.layerscale, name="ls1"),
                LayerScale(self.layerscale, name="ls2"),
            )
        attns = []

        def attention_branch(h: jax.Array) -> jax.Array:
            out, attn = attention(norm1(h), need_weights, cls_only)
            attns.append(attn)
            return ls1(out.astype(jnp.float32))

        x = self._residual(x, attention_branch, train, cls_only)
        x = self._residual(x, lambda h: ls2(ffn(norm2(h)).astype(jnp.float32)), train)
        return x, attns[0]


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
    """ViT backbone: NHWC images -> normed cls features; any size divisible by the patch size.

    DINO's VisionTransformer by default; with `dinov2`, DINOv2's DinoVisionTransformer: a mask
    token (replacing masked patches before the position embedding), cls and register tokens
    initialised N(0, 1e-6) and DINOv2's stochastic depth; LayerScale, the SwiGLU FFN, register
    tokens and the interpolation settings are its options."""

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
    dinov2: bool = False  # DINOv2's DinoVisionTransformer (see the class docstring)
    layerscale: float | None = None  # LayerScale's initial gamma (DINOv2); None: none
    ffn_layer: str = "mlp"  # or "swiglufused" (DINOv2)
    num_register_tokens: int = 0  # DINOv2's registers, after cls, without position embedding
    interpolate_offset: float = 0.1  # the position-embedding resize (`resize_pos_embed`)
    interpolate_antialias: bool = False
    drop_path_uniform: bool = False  # every block at drop_path_rate (DINOv2), not a linear rise
    # DINOv2's batch-subset stochastic depth drawn per group of the batch (Block's).
    drop_path_groups: int = 1
    # Run the blocks but the last as one jax.lax.scan over their stacked parameters, so that a
    # deep model's step compiles one block instead of depth copies. The parameters keep one
    # subtree per block (blocks_{i}); the stack is made inside the step. Needs one drop-path
    # rate for every block.
    scan_blocks: bool = False

    def setup(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if not self.dinov2 and (
            self.layerscale is not None or self.ffn_layer != "mlp" or self.num_register_tokens
        ):
            raise ValueError(
                "layerscale, ffn_layer and num_register_tokens are DINOv2's: set dinov2=True "
                "(a dinov2_* arch)."
            )
        layers, dim = self.layers, self.embed_dim
        self.patch_embed = layers.patch_embed(dim, self.patch_size, self.dtype)
        num_patches = (self.img_size // self.patch_size) ** 2
        # dinov2/models/vision_transformer.py: init_weights (DINO: trunc_normal_ std 0.02).
        token_init = nn.initializers.normal(1e-6) if self.dinov2 else normal_init
        self.cls_token = self.param("cls_token", token_init, (1, 1, dim))
        self.pos_embed = self.param("pos_embed", normal_init, (1, 1 + num_patches, dim))
        if self.num_register_tokens:
            shape = (1, self.num_register_tokens, dim)
            self.register_tokens = self.param("register_tokens", token_init, shape)
        if self.dinov2:
            self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, dim))
        if self.drop_path_uniform:
            rates = np.full(self.depth, self.drop_path_rate)
        else:
            rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        if self.scan_blocks and len(set(rates.tolist())) > 1:
            raise ValueError(
                "scan_blocks runs every block with one drop-path rate: set drop_path_uniform "
                "(DINOv2's) or drop_path_rate=0."
            )
        block = remat_block(self.remat)
        self.blocks = [self._block(block, float(rate)) for rate in rates]
        self.norm = layers.layer_norm()

    def _block(self, block_class: type[Block], rate: float, **kwargs: Any) -> Block:
        """A block of this ViT (`block_class`: Block or its remat) at drop-path `rate`."""
        return block_class(
            self.num_heads,
            self.mlp_ratio,
            rate,
            self.dtype,
            self.layers,
            self.layerscale,
            self.ffn_layer,
            self.dinov2,
            self.drop_path_groups,
            **kwargs,
        )

    def _tokens(self, x: jax.Array, masks: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, 3] -> [B, 1 + R + (H/p)(W/p), D] float32: patches (the masked ones, masks
        [B, (H/p)(W/p)] True, replaced by the mask token), cls token, positions, registers."""
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
        patches = patches.reshape(batch, -1, self.embed_dim)
        if masks is not None:
            if not self.dinov2:
                raise ValueError("masks need DINOv2's mask token: a dinov2_* arch")
            if masks.shape != patches.shape[:2]:
                raise ValueError(f"masks of shape {masks.shape}, not {patches.shape[:2]}")
            patches = jnp.where(masks[..., None], self.mask_token[None], patches)
        cls = jnp.broadcast_to(self.cls_token, (batch, 1, self.embed_dim))
        tokens = jnp.concatenate([cls, patches], axis=1)
        offset, antialias = self.interpolate_offset, self.interpolate_antialias
        tokens = tokens + resize_pos_embed(self.pos_embed, grid_h, grid_w, offset, antialias)
        if not self.num_register_tokens:
            return tokens
        registers = jnp.broadcast_to(self.register_tokens, (batch, *self.register_tokens.shape[1:]))
        return jnp.concatenate([tokens[:, :1], registers, tokens[:, 1:]], axis=1)

    def _encode(
        self,
        x: jax.Array,
        train: bool,
        need_weights: bool = False,
        cls_only: bool = False,
        masks: jax.Array | None = None,
        all_outputs: bool = False,
    ) -> tuple[list[jax.Array], jax.Array | None]:
        """x [B, H, W, 3] -> (the blocks' outputs [B, T, D], T = 1+R+N: every block's with
        all_outputs or without scan_blocks, else the last block's alone; the last block's
        attention [B, h, T, T] if need_weights else None). With cls_only, the last block's
        output is the cls token's alone, [B, 1, D]."""
        h = self._tokens(x, masks)
        outputs, scanned = [], 0
        if self.scan_blocks and not all_outputs and not self.is_initializing():
            scanned = self.depth - 1
            h = self._scan(h, train, scanned)
        for i, block in enumerate(self.blocks[scanned:], start=scanned):
            last = i == len(self.blocks) - 1
            h = self.layers.residual(h)
            h, attn = block(h, train, need_weights and last, cls_only and last)
            outputs.append(h)
        return outputs, attn

    def _scan(self, h: jax.Array, train: bool, count: int) -> jax.Array:
        """The first `count` blocks as one scan over their parameters, stacked here."""
        blocks = [self.variables["params"][f"blocks_{i}"] for i in range(count)]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
        # Applied functionally to each block's parameters, not a submodule.
        block = self._block(Block, self.drop_path_rate, parent=None)
        keys = None
        if train and self.drop_path_rate > 0:
            keys = jax.random.split(self.make_rng("drop_path"), count)

        def body(h: jax.Array, xs) -> tuple[jax.Array, None]:
            params, key = xs
            rngs = {} if key is None else {"drop_path": key}
            h, _ = block.apply({"params": params}, self.layers.residual(h), train, rngs=rngs)
            return h, None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        return jax.lax.scan(body, h, (stacked, keys))[0]

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """x [B, H, W, 3] -> cls features [B, D] float32 after the final LayerNorm. The features
        are the cls token's alone, so of the other tokens the last block computes only the keys
        and values that the cls query attends to."""
        outputs, _ = self._encode(x, train, cls_only=True)
        return self.norm(outputs[-1])[:, 0]

    def forward_features(
        self, x: jax.Array, masks: jax.Array | None = None, *, train: bool = False
    ) -> dict[str, jax.Array]:
        """x [B, H, W, 3] (masks [B, N] bool: patches replaced by the mask token) -> DINOv2's
        outputs: x_norm_clstoken [B, D], x_norm_regtokens [B, R, D], x_norm_patchtokens
        [B, N, D] and x_prenorm [B, 1+R+N, D], float32."""
        outputs, _ = self._encode(x, train, masks=masks)
        prenorm = outputs[-1]
        normed = self.norm(prenorm)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : 1 + r],
            "x_norm_patchtokens": normed[:, 1 + r :],
            "x_prenorm": prenorm,
        }

    def get_last_selfattention(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, 3] -> last block's softmax attention [B, heads, T, T] float32 over the
        tokens [cls, registers, patches], T = 1+R+N."""
        return self._encode(x, train=False, need_weights=True)[1]

    def block_outputs(self, x: jax.Array, n: int = 1, norm: bool = True) -> list[jax.Array]:
        """x [B, H, W, 3] -> the outputs of the last n blocks, [B, 1+R+N, D] each, final-normed
        unless norm=False (DINO's get_intermediate_layers, which always norms)."""
        if not 1 <= n <= self.depth:
            raise ValueError(f"n={n} must be between 1 and depth={self.depth}")
        outputs, _ = self._encode(x, train=False, all_outputs=n > 1)
        return [self.norm(h) if norm else h for h in outputs[-n:]]

    def get_intermediate_layers(
        self,
        x: jax.Array,
        n: int = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """DINOv2's get_intermediate_layers: for each of the last n blocks its patch tokens
        [B, N, D] (registers dropped), final-normed unless norm=False, as [B, H/p, W/p, D] with
        reshape (NHWC: the official's NCHW transposed), paired with its cls token [B, D] with
        return_class_token."""
        outputs = self.block_outputs(x, n, norm)
        r, (batch, height, width, _) = self.num_register_tokens, x.shape
        patches = [out[:, 1 + r :] for out in outputs]
        if reshape:
            grid = (batch, height // self.patch_size, width // self.patch_size, -1)
            patches = [p.reshape(grid) for p in patches]
        if return_class_token:
            return tuple(zip(patches, [out[:, 0] for out in outputs], strict=True))
        return tuple(patches)


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-T of the registry (models/registry.py)."""
    return _registered("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-S of the registry (models/registry.py)."""
    return _registered("vit_small", patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-B of the registry (models/registry.py)."""
    return _registered("vit_base", patch_size, **kwargs)


def dinov2_vit(arch: str, patch_size: int = 14, **kwargs: Any) -> VisionTransformer:
    """A DINOv2 ViT of the registry ("dinov2_vit_small", ..., "dinov2_vit_giant2")."""
    return _registered(arch, patch_size, **kwargs)


def _registered(arch: str, patch_size: int, **kwargs: Any) -> VisionTransformer:
    spec = ARCH_SPECS[arch]
    sizes = {"embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads}
    return VisionTransformer(
        patch_size=patch_size, dinov2=spec.family == "dinov2_vit", **{**sizes, **kwargs}
    )
