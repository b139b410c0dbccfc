"""The DINO Vision Transformer backbone (ViT-T/S/B) and its bicubic position-embedding resize.

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

from dino_jax.kernels import cpu_attention

IN_CHANS = 3  # RGB images
LN_EPS = 1e-6
INIT_STD = 0.02
# torch's bicubic kernel constant; jax.image.resize uses -0.5, hence our own resize.
CUBIC_A = -0.75

# The reference's trunc_normal_(std=0.02) truncates at ±2 absolute (±100 std): a plain normal.
_normal_init = nn.initializers.normal(INIT_STD)


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


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """Identity whose gradient is materialised where it passes (see _barrier_bwd)."""
    return x


def _barrier_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _barrier_bwd(_: None, grad: jax.Array) -> tuple[jax.Array]:
    # XLA's CPU fusion otherwise duplicates the residual stream's chain of gradient adds into
    # every consumer (quadratic in depth: 30% of a ViT-S/16 step), and it drops optimization
    # barriers before fusing. A conditional is a fusion boundary it keeps; a non-finite gradient
    # gives NaN either way. Accelerators fuse sensibly and would pay a sync for the conditional.
    if jax.default_backend() != "cpu":
        return (grad,)
    finite = jnp.isfinite(grad.reshape(-1)[0])
    return (jax.lax.cond(finite, lambda g: g, lambda g: jnp.full_like(g, jnp.nan), grad),)


gradient_barrier.defvjp(_barrier_fwd, _barrier_bwd)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch computes it, x/2 (1 + erf(x / sqrt 2)), with torch's gradient.

    `nn.gelu(approximate=False)` is the same function written with erfc, whose XLA expansion costs
    several times more on CPU. The gradient is written out, Phi(x) + x phi(x) from x alone, so the
    forward is one pass that keeps nothing but its input (autodiff would also keep erf(x / sqrt 2)).
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


def _uniform_init(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound), for a bias whose fan-in the initializer cannot see."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def sum_rows(x: jax.Array) -> jax.Array:
    """x [..., F] summed over all but the last axis -> [F] float32, as ones @ x: XLA:CPU reduces
    over leading axes several times slower than it runs that matrix-vector product."""
    rows = x.reshape(-1, x.shape[-1])
    ones = jnp.ones(rows.shape[0], x.dtype)
    return jnp.matmul(
        ones, rows, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b accumulated in float32, returned in a's dtype: for float32 the plain product. For
    16-bit inputs every backend accumulates in float32 anyway, and XLA:CPU runs a bfloat16
    product on the CPU's matrix units (AMX) only when its output is float32: 6.4x faster on an
    Intel Xeon (BENCHMARKS.md)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x [..., D] @ kernel [D, F] + bias [F], torch's Linear, with its gradient written out.

    The backward is autodiff's, but the bias gradient is `sum_rows`, and the kernel gradient
    contracts the rows of x and grad as they lie (autodiff's form made XLA:CPU write grad
    transposed first, 0.28 s of the ViT-S/16 step).
    """
    return matmul(x, kernel) + bias


def _linear_fwd(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> tuple[jax.Array, tuple]:
    return linear(x, kernel, bias), (x, kernel)


def _linear_bwd(saved: tuple, grad: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, kernel = saved
    rows_x, rows_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    contract_rows = (((0,), (0,)), ((), ()))
    grad_kernel = jax.lax.dot_general(
        rows_x, rows_grad, contract_rows, preferred_element_type=jnp.float32
    ).astype(kernel.dtype)
    grad_x = matmul(grad, kernel.T)
    return grad_x, grad_kernel, sum_rows(grad).astype(grad.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Linear(nn.Module):
    """nn.Dense's parameters (kernel [D, F] N(0, 0.02), bias [F] zeros, float32), applied as
    `linear` in `dtype`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _normal_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return linear(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


@jax.custom_vjp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """torch's LayerNorm over the last axis in float32: two-pass variance, eps 1e-6.

    The gradient is written out (see _layer_norm_bwd): autodiff of the same maths keeps the
    centred input and broadcasts of 1/sigma and of the scale, full-size arrays that XLA:CPU writes
    and reads again (in the ViT-S/16 step the student's forward LayerNorms took 0.36 s of thread
    time, the teacher's 0.03 s; now 0.23 s, and 0.12 s instead of 0.18 s backward).
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
    """nn.LayerNorm's parameters (scale, bias) and torch's numbers, in float32 whatever the
    compute dtype, with the gradient of `layer_norm`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (dim,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)
        return layer_norm(x.astype(jnp.float32), scale, bias)


@jax.custom_vjp
def softmax(logits: jax.Array) -> jax.Array:
    """softmax over the last axis, with its gradient y (g - sum(g y)) written out: the same
    maths as autodiff's, which XLA:CPU runs in more passes (the attention backward ~1.3x slower)."""
    return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    probs = jax.nn.softmax(logits, axis=-1)
    return probs, probs


def _softmax_bwd(probs: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
    return (probs * (grad - jnp.sum(grad * probs, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def explicit_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    """The reference's attention for q, k, v [B, N, heads, hd]: heads first, (q @ k^T) * scale,
    softmax in float32, @ v. -> (out [B, N, heads, hd], weights [B, heads, N, N] float32)."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = softmax(logits * scale)
    out = jnp.einsum(
        "bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    ).astype(v.dtype)
    return out.transpose(0, 2, 1, 3), weights


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, cpu_kernel: bool = True
) -> jax.Array:
    """softmax(q k^T scale) v for q, k, v [B, N, heads, hd] -> [B, N, heads, hd], the weights
    never returned (softmax in float32 always).

    GPUs with 16-bit inputs: cuDNN's flash attention. Other accelerators: XLA's
    `jax.nn.dot_product_attention`. CPU: with head sizes a multiple of 8, our float32 kernel
    (`kernels.cpu_attention`, the logits kept in cache; 16-bit inputs are widened to float32 for
    it, still faster than XLA:CPU's 16-bit batched products) unless `cpu_kernel` is False,
    else `explicit_attention`, which XLA:CPU runs faster than `dot_product_attention`'s
    tokens-first products (BENCHMARKS.md).
    """
    backend = jax.default_backend()
    if backend == "cpu":
        wide = [t.astype(jnp.float32) for t in (q, k, v)]
        if cpu_kernel and cpu_attention.supports(wide[0]):
            return cpu_attention.attention(*wide, scale).astype(q.dtype)
        return explicit_attention(q, k, v, scale)[0]
    if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (ValueError, NotImplementedError):  # a shape or head size cuDNN does not take
            pass
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


class QKV(nn.Module):
    """The reference's qkv Linear(D, 3D), one kernel [D, 3D] and bias [3D], applied as three
    products, one each for q, k and v: x [B, N, D] -> 3 x [B, N, heads, hd] in dtype.

    One product then a slice gives the same numbers, but XLA:CPU assembles its gradient in the
    [B, N, 3D] layout (pads and adds over the activations); three products assemble it on the
    [D, 3D] kernel instead, a far smaller array.
    """

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, cls_only: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """With cls_only, q is the cls token's alone: [B, 1, heads, hd]."""
        dim = x.shape[-1]
        kernel = self.param("kernel", _normal_init, (dim, 3 * dim), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (3 * dim,), jnp.float32)
        x = x.astype(self.dtype)

        def project(i: int, rows: jax.Array) -> jax.Array:
            part = slice(i * dim, (i + 1) * dim)
            y = linear(rows, kernel[:, part].astype(self.dtype), bias[part].astype(self.dtype))
            return y.reshape(*rows.shape[:2], self.num_heads, dim // self.num_heads)

        return project(0, x[:, :1] if cls_only else x), project(1, x), project(2, x)


class Attention(nn.Module):
    """Multi-head self-attention; returns the projected output and, on request, the weights."""

    num_heads: int
    dtype: Any = jnp.float32
    cpu_kernel: bool = True  # on CPU, `fused_attention`'s kernel

    @nn.compact
    def __call__(
        self, x: jax.Array, need_weights: bool = False, cls_only: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, N, D] -> (out [B, Q, D] in dtype, attn [B, heads, Q, N] float32 or None), Q = N
        or, with cls_only, 1: the cls token's query alone.

        Without weights, `fused_attention` computes the same softmax attention (the cls query
        alone is a matrix-vector product per head, `explicit_attention`'s).
        """
        batch, _, dim = x.shape
        q, k, v = QKV(self.num_heads, self.dtype, name="qkv")(x, cls_only)  # [B, Q|N, heads, hd]
        scale = (dim // self.num_heads) ** -0.5
        if need_weights or cls_only:
            out, attn = explicit_attention(q, k, v, scale)
            attn = attn if need_weights else None
        else:
            out, attn = fused_attention(q, k, v, scale, self.cpu_kernel), None
        out = out.reshape(batch, q.shape[1], dim)
        return Linear(dim, self.dtype, name="proj")(out), attn


class Mlp(nn.Module):
    """Linear(D, hidden) -> exact erf GELU -> Linear(hidden, D)."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, N, D] -> [B, N, D] in dtype."""
        h = gelu(Linear(self.hidden_dim, self.dtype, name="fc1")(x))
        return Linear(x.shape[-1], self.dtype, name="fc2")(h)


class Block(nn.Module):
    """Pre-norm transformer block with per-sample stochastic depth on both residual branches."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    cpu_kernel: bool = True  # on CPU, `fused_attention`'s kernel

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
        (the others' outputs are never computed: ~7% of a 12-block ViT's FLOPs)."""
        attention = Attention(self.num_heads, self.dtype, self.cpu_kernel, name="attn")
        branch, attn = attention(LayerNorm(name="norm1")(x), need_weights, cls_only)
        x = x[:, :1] if cls_only else x  # the residual stream of the tokens computed
        x = x + self._drop_path(branch.astype(jnp.float32), train)
        hidden = int(x.shape[-1] * self.mlp_ratio)
        branch = Mlp(hidden, self.dtype, name="mlp")(LayerNorm(name="norm2")(x))
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


class PatchEmbed(nn.Module):
    """The reference's stride-p conv of p x p patches, [B, H, W, C] -> [B, H/p, W/p, D].

    Its parameters are nn.Conv's (kernel [p, p, C, D], bias [D]), but it runs as one matmul of
    the flattened patches: XLA:CPU runs the strided conv at about half the speed of that matmul,
    forward and weight gradient. The sums are the same products in the same (p, p, C) order.
    """

    features: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, (batch, height, width, chans) = self.patch_size, x.shape
        # torch Conv2d default: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)), bias alike.
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            (p, p, chans, self.features),
        )
        bias = self.param("bias", _uniform_init(1.0 / math.sqrt(chans * p * p)), (self.features,))
        grid = (batch, height // p, width // p)
        patches = x.reshape(*grid[:2], p, grid[2], p, chans).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(*grid, p * p * chans).astype(self.dtype)
        out = matmul(patches, kernel.reshape(-1, self.features).astype(self.dtype))
        return out + bias.astype(self.dtype)


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
    cpu_kernel: bool = True  # on CPU, float32 attention as `kernels.cpu_attention`

    def setup(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, self.dtype)
        num_patches = (self.img_size // self.patch_size) ** 2
        self.cls_token = self.param("cls_token", _normal_init, (1, 1, self.embed_dim))
        self.pos_embed = self.param("pos_embed", _normal_init, (1, 1 + num_patches, self.embed_dim))
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        block = remat_block(self.remat)
        self.blocks = [
            block(self.num_heads, self.mlp_ratio, float(rate), self.dtype, self.cpu_kernel)
            for rate in rates
        ]
        self.norm = LayerNorm()

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
            h, attn = block(gradient_barrier(h), train, need_weights and last, cls_only and last)
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
    """ViT-T: 192 wide, 12 blocks, 3 heads."""
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-S: 384 wide, 12 blocks, 6 heads."""
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, **kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-B: 768 wide, 12 blocks, 12 heads."""
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, **kwargs)
