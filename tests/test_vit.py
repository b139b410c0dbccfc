"""ViT backbone against an independent PyTorch re-implementation of the reference's behaviour."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as fnn
from torch import nn as tnn
from torch_reference import TorchViT

from dino_jax import cpu
from dino_jax.models.layers import STOCK, PatchEmbed, explicit_attention
from dino_jax.models.vit import (
    VisionTransformer,
    resize_pos_embed,
    vit_base,
    vit_small,
    vit_tiny,
)

# Tiny models keep the suite fast; width 64 with 4 heads still exercises the head split.
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}
RTOL = 1e-5


def assert_close(got, want):
    """Agreement to 1e-5 relative per entry, or to 1e-5 of the tensor's RMS for entries near 0.

    The float64 reference is exact; float32 rounding leaves ~2e-6 absolute error on unit-scale
    LayerNorm outputs (torch float32 itself is off by ~4e-6), so near-zero entries of a unit-scale
    tensor cannot meet a pure 1e-5 relative bound.
    """
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.sqrt(np.mean(want**2)))


def torch_state_dict(params):
    """Flax params -> a reference-named torch state dict (float64), transposing kernels."""
    state = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        value = np.asarray(value, np.float64)
        if names[-1] == "kernel":
            # Linear (in, out) -> (out, in); conv (kh, kw, in, out) -> (out, in, kh, kw).
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
        leaf = {"kernel": "weight", "scale": "weight"}.get(names[-1], names[-1])
        names = [n.replace("blocks_", "blocks.") for n in names[:-1]]
        if names == ["patch_embed"]:
            names = ["patch_embed", "proj"]
        key = ".".join([*names, leaf]) if names else leaf
        state[key] = torch.from_numpy(value.copy())
    return state


def torch_twin(model, params):
    twin = TorchViT(model.patch_size, model.embed_dim, model.depth, model.num_heads, model.img_size)
    twin.load_state_dict(torch_state_dict(params), strict=True)
    return twin.double().eval()


def to_torch(x):
    return torch.from_numpy(np.asarray(x, np.float64).transpose(0, 3, 1, 2))


@functools.cache
def tiny_variables(patch=8, img_size=32):
    """Shared float32 params of a TINY model; drop rate and dtype do not change their tree."""
    model = VisionTransformer(patch_size=patch, img_size=img_size, **TINY)
    return model.init(jax.random.key(0), jnp.zeros((1, img_size, img_size, 3)))


def images(key, batch, height, width):
    return jax.random.normal(jax.random.key(key), (batch, height, width, 3), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Forward parity


@pytest.mark.parametrize(
    ("patch", "img_size", "height", "width"),
    [
        (8, 32, 32, 32),  # native grid: pos_embed used as is
        (8, 32, 24, 24),  # smaller square: bicubic downsample
        (8, 32, 48, 48),  # larger square: bicubic upsample
        (8, 32, 40, 24),  # non-square, H > W
        (8, 32, 16, 64),  # 2x8 grid: same patch count as 4x4 but must still be resized
        (16, 64, 48, 80),  # patch 16, non-square, W > H
    ],
)
@pytest.mark.parametrize("layers", [STOCK, cpu.LAYERS], ids=["stock", "cpu"])
def test_matches_torch_reference(patch, img_size, height, width, layers):
    model = VisionTransformer(patch_size=patch, img_size=img_size, layers=layers, **TINY)
    variables = tiny_variables(patch, img_size)
    x = images(2, 2, height, width)

    @jax.jit
    def outputs(variables, x):
        return (
            model.apply(variables, x),
            model.apply(variables, x, method="get_last_selfattention"),
            model.apply(variables, x, 2, method=VisionTransformer.block_outputs),
        )

    cls, attn, layers = outputs(variables, x)
    twin, xt = torch_twin(model, variables["params"]), to_torch(x)
    with torch.no_grad():
        want_cls = twin(xt).numpy()
        want_attn = twin.get_last_selfattention(xt).numpy()
        want_layers = [t.numpy() for t in twin.get_intermediate_layers(xt, 2)]

    tokens = 1 + (height // patch) * (width // patch)
    assert cls.shape == (2, 64) and cls.dtype == jnp.float32
    assert attn.shape == (2, 4, tokens, tokens) and attn.dtype == jnp.float32
    assert len(layers) == 2 and all(h.shape == (2, tokens, 64) for h in layers)
    assert_close(cls, want_cls)
    assert_close(attn, want_attn)
    for got, want in zip(layers, want_layers, strict=True):
        assert_close(got, want)


def test_cls_features_skip_the_other_tokens_in_the_last_block():
    # The features are the cls token's, so the last block leaves out every other token's query,
    # projection and MLP: at least those matmuls' FLOPs, counted by XLA, are gone from the forward
    # (the values are the full computation's: test_matches_torch_reference).
    model = VisionTransformer(patch_size=8, img_size=32, **TINY)
    variables, x = tiny_variables(), images(1, 2, 32, 32)

    def flops(fn):
        return jax.jit(fn).lower(variables, x).compile().cost_analysis()["flops"]

    cls = flops(model.apply)
    full = flops(lambda v, x: model.apply(v, x, 1, method="block_outputs")[0])
    batch, others, dim = 2, 16, 64  # 4 x 4 patches besides the cls token
    # per token: q and proj (D x D each) and the MLP (D x 4D twice), 2 FLOPs per multiply-add
    skipped = batch * others * 2 * (2 * dim * dim + 2 * dim * 4 * dim)
    assert full - cls >= skipped, (full, cls, skipped)
    assert full - cls < 1.2 * skipped, "more left out than the last block's other tokens"


# ---------------------------------------------------------------------------------------------
# Position-embedding resize


def torch_resize(pos_embed, grid_h, grid_w, *, plus_tenth=True):
    """The reference's interpolation of the patch part (float64), or a plain resize to size."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    grid = torch.from_numpy(np.asarray(pos_embed[:, 1:], np.float64))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if plus_tenth:
        scale = ((grid_h + 0.1) / math.sqrt(n), (grid_w + 0.1) / math.sqrt(n))
        out = tnn.functional.interpolate(grid, scale_factor=scale, mode="bicubic")
    else:
        out = tnn.functional.interpolate(grid, size=(grid_h, grid_w), mode="bicubic")
    return out.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).numpy()


@pytest.mark.parametrize(
    ("grid_h", "grid_w"),
    [(6, 6), (3, 3), (30, 30), (10, 20), (20, 9), (7, 28), (1, 14)],
)
def test_resize_pos_embed_matches_torch_bicubic(grid_h, grid_w):
    pos_embed = jax.random.normal(jax.random.key(3), (1, 197, 16), jnp.float32)
    got = np.asarray(resize_pos_embed(pos_embed, grid_h, grid_w))
    assert got.shape == (1, 1 + grid_h * grid_w, 16)
    np.testing.assert_array_equal(got[:, :1], pos_embed[:, :1])
    want = torch_resize(pos_embed, grid_h, grid_w)
    assert_close(got[:, 1:], want)
    # Resizing to exactly (grid_h, grid_w) samples elsewhere: the +0.1 must be honoured.
    plain = torch_resize(pos_embed, grid_h, grid_w, plus_tenth=False)
    assert np.abs(got[:, 1:] - plain).max() > 1e-3


def test_resize_pos_embed_keeps_native_grid():
    pos_embed = jax.random.normal(jax.random.key(4), (1, 197, 16), jnp.float32)
    np.testing.assert_array_equal(resize_pos_embed(pos_embed, 14, 14), pos_embed)


@pytest.mark.parametrize(("grid_h", "grid_w"), [(6, 6), (30, 30), (10, 20)])
def test_resize_pos_embed_is_not_jax_image_resize(grid_h, grid_w):
    # jax.image.resize uses A=-0.5, antialiases downsampling and ignores the +0.1.
    pos_embed = jax.random.normal(jax.random.key(5), (1, 197, 16), jnp.float32)
    got = resize_pos_embed(pos_embed, grid_h, grid_w)[0, 1:].reshape(grid_h, grid_w, 16)
    grid = pos_embed[0, 1:].reshape(14, 14, 16)
    other = jax.image.resize(grid, (grid_h, grid_w, 16), "bicubic")
    assert jnp.abs(got - other).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Sizes and parameters


def closed_form_count(dim, depth, patch, img_size=224):
    block = 12 * dim * dim + 13 * dim  # qkv 3D²+3D, proj D²+D, fc1 4D²+4D, fc2 4D²+D, 2 LNs 4D
    embed = 3 * patch * patch * dim + dim + dim + (1 + (img_size // patch) ** 2) * dim
    return depth * block + embed + 2 * dim


def param_count(model):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
    ("build", "patch", "want"),
    [
        (vit_small, 16, 21_665_664),
        (vit_base, 16, 85_798_656),
        (vit_small, 8, closed_form_count(384, 12, 8)),
        (vit_small, 14, closed_form_count(384, 12, 14)),
        (vit_tiny, 16, closed_form_count(192, 12, 16)),
    ],
)
def test_parameter_counts(build, patch, want):
    assert param_count(build(patch_size=patch)) == want


def test_parameter_names_follow_the_reference():
    shapes = jax.eval_shape(vit_small().init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    params = shapes["params"]
    assert params["cls_token"].shape == (1, 1, 384)
    assert params["pos_embed"].shape == (1, 197, 384)
    assert params["patch_embed"]["kernel"].shape == (16, 16, 3, 384)
    assert params["blocks_11"]["attn"]["qkv"]["kernel"].shape == (384, 1152)
    assert set(params["blocks_0"]) == {"norm1", "attn", "norm2", "mlp"}
    assert set(params["blocks_0"]["mlp"]) == {"fc1", "fc2"}
    assert "norm" in params


def test_image_not_divisible_by_patch_raises():
    model = VisionTransformer(patch_size=8, img_size=32, **TINY)
    with pytest.raises(ValueError, match=r"30x32.*patch_size=8"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 30, 32, 3)))


# ---------------------------------------------------------------------------------------------
# Stochastic depth


def test_drop_path_rates_rise_linearly():
    model = VisionTransformer(
        patch_size=8, img_size=32, embed_dim=64, depth=5, num_heads=4, drop_path_rate=0.4
    )
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rates = [block.drop_path_rate for block in model.bind(variables).blocks]
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-12)


def test_drop_path_drops_whole_samples_and_rescales_kept_ones():
    # depth 2, rate 0.5: block 0 has rate 0, block 1 drops each branch per sample with p 0.5.
    model = VisionTransformer(patch_size=8, img_size=32, drop_path_rate=0.5, **TINY)
    x = images(6, 16, 32, 32)
    variables = tiny_variables()
    train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"drop_path": key}))
    got = np.asarray(train(variables, x, jax.random.key(7)))

    twin, xt = torch_twin(model, variables["params"]), to_torch(x)
    combos = [(a, m) for a in (0.0, 2.0) for m in (0.0, 2.0)]  # 0 = dropped, 2 = 1 / keep_prob
    with torch.no_grad():
        candidates = np.stack([twin(xt, [(1.0, 1.0), combo]).numpy() for combo in combos])
    seen = set()
    for i in range(len(x)):
        matches = [
            c
            for c, want in zip(combos, candidates[:, i], strict=True)
            if np.allclose(got[i], want, rtol=RTOL, atol=RTOL)
        ]
        assert len(matches) == 1, f"sample {i} matches {matches}"
        seen.add(matches[0])
    assert len(seen) >= 3, f"per-sample masks look shared across the batch: {seen}"


def test_drop_path_off_in_eval():
    dropping = VisionTransformer(patch_size=8, img_size=32, drop_path_rate=0.5, **TINY)
    plain = VisionTransformer(patch_size=8, img_size=32, **TINY)
    x = images(8, 4, 32, 32)
    variables = tiny_variables()
    got = jax.jit(dropping.apply)(variables, x)
    np.testing.assert_array_equal(got, jax.jit(plain.apply)(variables, x))


# ---------------------------------------------------------------------------------------------
# Initialisation and precision


def test_init_statistics():
    params = tiny_variables()["params"]
    blocks = [params["blocks_0"], params["blocks_1"]]
    dense = [
        blk[m][d]
        for blk in blocks
        for m, d in [("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")]
    ]
    kernels = np.concatenate([np.ravel(d["kernel"]) for d in dense])
    assert abs(kernels.std() - 0.02) < 0.02 * 0.02
    # A plain normal: about 4.6% of draws lie beyond 2 std, none would if truncated there.
    assert 0.035 < np.mean(np.abs(kernels) > 0.04) < 0.055
    for d in dense:
        np.testing.assert_array_equal(d["bias"], 0.0)
    for norm in [params["norm"]] + [blk[n] for blk in blocks for n in ("norm1", "norm2")]:
        np.testing.assert_array_equal(norm["scale"], 1.0)
        np.testing.assert_array_equal(norm["bias"], 0.0)
    embeds = np.concatenate([np.ravel(params["cls_token"]), np.ravel(params["pos_embed"])])
    assert abs(embeds.std() - 0.02) < 0.02 * 0.1

    bound = 1 / math.sqrt(3 * 8 * 8)  # torch Conv2d default: U(±1/sqrt(fan_in)) for both
    conv = params["patch_embed"]
    assert np.abs(conv["kernel"]).max() <= bound
    assert abs(np.std(conv["kernel"]) - bound / math.sqrt(3)) < 0.03 * bound
    assert np.abs(conv["bias"]).max() <= bound
    assert np.abs(conv["bias"]).max() > 0.8 * bound


def test_bfloat16_compute_stays_close_with_float32_params():
    model32 = VisionTransformer(patch_size=8, img_size=32, **TINY)
    model16 = VisionTransformer(patch_size=8, img_size=32, dtype=jnp.bfloat16, **TINY)
    x = images(9, 4, 24, 40)
    shapes = jax.eval_shape(model16.init, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    variables = tiny_variables()
    got = jax.jit(model16.apply)(variables, x)
    want = jax.jit(model32.apply)(variables, x)
    assert got.dtype == jnp.float32
    # Features are LayerNorm outputs of unit scale; bfloat16 keeps ~3 significant digits.
    np.testing.assert_allclose(got, want, atol=5e-2)
    attn = jax.jit(lambda v, x: model16.apply(v, x, method="get_last_selfattention"))(variables, x)
    assert attn.dtype == jnp.float32
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients: the training path (stock and CPU layers, rematerialisation)


@pytest.mark.parametrize("remat", ["none", "block", "dots_saveable"])
@pytest.mark.parametrize("layers", [STOCK, cpu.LAYERS], ids=["stock", "cpu"])
def test_gradients_match_torch_reference(remat, layers):
    model = VisionTransformer(patch_size=8, img_size=32, remat=remat, layers=layers, **TINY)
    variables = tiny_variables()
    x = images(3, 2, 40, 24)  # resized position embeddings on the way
    weights = np.random.default_rng(0).normal(size=(2, 64))

    def objective(params):
        return jnp.sum(model.apply({"params": params}, x) * weights)

    grads = jax.jit(jax.grad(objective))(variables["params"])
    twin = torch_twin(model, variables["params"])
    (twin(to_torch(x)) * torch.from_numpy(weights)).sum().backward()
    got = torch_state_dict(grads)
    for name, param in twin.named_parameters():
        want = param.grad.numpy()
        rms = np.sqrt(np.mean(want**2))
        # float32 against float64 through two blocks, forward and backward.
        np.testing.assert_allclose(
            got[name].numpy(), want, rtol=1e-4, atol=1e-4 * rms, err_msg=name
        )


def test_unknown_remat_fails():
    model = VisionTransformer(patch_size=8, img_size=32, remat="everything", **TINY)
    with pytest.raises(ValueError, match="remat='everything'"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_cpu_attention_equals_dot_product_attention():
    """The CPU path (`explicit_attention`) against `jax.nn.dot_product_attention`, which the
    accelerators run: the same values and the same gradients for q, k and v."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 17, 4, 16)), jnp.float32) for _ in range(3))
    cotangent = jnp.asarray(rng.normal(size=(3, 17, 4, 16)), jnp.float32)
    scale = 16**-0.5

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")

    def explicit(q, k, v):
        return explicit_attention(q, k, v, scale)[0]

    (got, got_vjp), (want, want_vjp) = (jax.vjp(jax.jit(f), q, k, v) for f in (explicit, xla))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # The weights it returns are a softmax over keys: rows of positive entries summing to 1.
    weights = explicit_attention(q, k, v, scale)[1]
    assert weights.shape == (3, 4, 17, 17) and float(weights.min()) > 0
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_patch_embed_is_the_strided_conv_with_conv_parameters(dtype):
    """nn.Conv's parameters (names, shapes, the kernel's initial values; torch's bias bound) and
    the conv's numbers, forward and gradient; in bfloat16 too the kernel's gradient is float32."""
    x = jnp.float32(np.random.default_rng(3).normal(size=(2, 32, 48, 3)))
    embed = PatchEmbed(64, 16, dtype)
    params = embed.init(jax.random.key(0), x)
    conv = fnn.Conv(
        64,
        (16, 16),
        strides=(16, 16),
        padding="VALID",
        dtype=dtype,
        kernel_init=fnn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    )
    conv_params = conv.init(jax.random.key(0), x)
    np.testing.assert_array_equal(params["params"]["kernel"], conv_params["params"]["kernel"])
    assert params["params"]["bias"].shape == (64,)
    assert float(jnp.max(jnp.abs(params["params"]["bias"]))) <= 1 / math.sqrt(768)

    got = embed.apply(params, x)
    assert got.shape == (2, 2, 3, 64) and got.dtype == jnp.float32
    want = conv.apply(params, x)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)

    kernel, bias = (np.float64(params["params"][k]) for k in ("kernel", "bias"))
    patches = np.float64(x).reshape(2, 2, 16, 3, 16, 3).transpose(0, 1, 3, 2, 4, 5)
    numpy_out = np.einsum("bijuvc,uvcd->bijd", patches, kernel) + bias
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, numpy_out, rtol=1e-5, atol=1e-5)
        cotangent = np.random.default_rng(4).normal(size=got.shape)
        grad = jax.grad(lambda p: jnp.sum(embed.apply(p, x) * jnp.float32(cotangent)))(params)
        want_kernel = np.einsum("bijuvc,bijd->uvcd", patches, cotangent)
        np.testing.assert_allclose(grad["params"]["kernel"], want_kernel, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(grad["params"]["bias"], cotangent.sum((0, 1, 2)), rtol=1e-5)
    else:
        grad = jax.grad(lambda p: jnp.sum(embed.apply(p, x)))(params)["params"]["kernel"]
        assert grad.dtype == jnp.float32
        rounded = np.float64(np.float32(jnp.bfloat16(patches)))  # the product's 16-bit inputs
        want = np.broadcast_to(rounded.sum((0, 1, 2))[..., None], kernel.shape)
        np.testing.assert_allclose(grad, want, rtol=1e-5)
