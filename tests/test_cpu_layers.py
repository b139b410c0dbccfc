"""dino_jax.cpu's tuned layers: each op against torch or NumPy, and the whole model and train step
against the stock layers (values and gradients), which accelerators run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_tiny_config
from test_vit import assert_close, images
from torch import nn as tnn

from dino_jax import cpu
from dino_jax.core import parallel, platforms
from dino_jax.core.step import init_state, make_train_step
from dino_jax.cpu.layers import (
    QKV,
    gelu,
    gradient_barrier,
    layer_norm,
    linear,
    scaled_matmul,
    sum_rows,
)
from dino_jax.models import build_dino
from dino_jax.models import layers as stock


def test_gradient_barrier_is_the_identity():
    x = images(4, 2, 8, 8)
    cotangent = images(5, 2, 8, 8)
    _, vjp = jax.vjp(jax.jit(gradient_barrier), x)
    np.testing.assert_array_equal(gradient_barrier(x), x)
    np.testing.assert_array_equal(jax.jit(vjp)(cotangent)[0], cotangent)


@pytest.mark.parametrize("qkv", [QKV, functools.partial(stock.qkv, dtype=jnp.float32, name=None)])
def test_qkv_is_one_linear_layer_split_like_the_reference(qkv):
    """One [D, 3D] kernel split as the reference's qkv(x).reshape(B, N, 3, h, hd): the CPU's
    three products and the stock one."""
    x = images(6, 2, 5, 12)[..., 0]  # [2, 5, 12]
    module = qkv(12, 3)
    params = module.init(jax.random.key(1), x)["params"]
    assert params["kernel"].shape == (12, 36) and params["bias"].shape == (36,)
    params = {"kernel": params["kernel"], "bias": jnp.linspace(-1.0, 1.0, 36)}
    got = module.apply({"params": params}, x)
    x64, kernel = np.asarray(x, np.float64), np.asarray(params["kernel"], np.float64)
    want = (x64 @ kernel + np.asarray(params["bias"])).reshape(2, 5, 3, 3, 4)
    for i in range(3):
        np.testing.assert_allclose(got[i], want[:, :, i], rtol=1e-5, atol=1e-6)


def test_layer_norm_and_its_gradient_match_torch():
    """`layer_norm`'s written-out gradient against torch's LayerNorm backward in float64, on rows
    far from zero mean (the centring matters) with a non-trivial scale and bias."""
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(3, 5, 64))
    scale, bias, cotangent = rng.normal(size=64), rng.normal(size=64), rng.normal(size=(3, 5, 64))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    got, vjp = jax.vjp(jax.jit(layer_norm), f32(x), f32(scale), f32(bias))
    got_grads = vjp(f32(cotangent))

    tx, tscale, tbias = (torch.tensor(a, requires_grad=True) for a in (x, scale, bias))
    want = tnn.functional.layer_norm(tx, (64,), tscale, tbias, eps=1e-6)
    want.backward(torch.from_numpy(cotangent))
    assert_close(got, want.detach().numpy())
    for g, w in zip(got_grads, (tx.grad, tscale.grad, tbias.grad), strict=True):
        assert_close(g, w.numpy())


@pytest.mark.parametrize("gelu", [gelu, stock.exact_gelu], ids=["cpu", "stock"])
def test_gelu_and_its_gradient_match_torch(gelu):
    """Exact (erf) GELU and its gradient against torch in float64, including the tails where the
    gradient is 0 or 1; bfloat16 stays bfloat16."""
    x = np.linspace(-9.0, 9.0, 2001)
    got, vjp = jax.vjp(jax.jit(gelu), jnp.asarray(x, jnp.float32))
    got_grad = vjp(jnp.ones(x.shape, jnp.float32))[0]
    tx = torch.tensor(x, requires_grad=True)
    want = tnn.functional.gelu(tx)
    want.sum().backward()
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_grad, tx.grad.numpy(), rtol=1e-6, atol=1e-6)
    half = jnp.asarray(x, jnp.bfloat16)
    assert gelu(half).dtype == jax.grad(lambda v: gelu(v).sum())(half).dtype == jnp.bfloat16


def test_linear_value_and_gradients_match_numpy():
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=(3, 5, 8)), rng.normal(size=(8, 12))
    bias, cotangent = rng.normal(size=(12,)), rng.normal(size=(3, 5, 12))

    def loss(x, kernel, bias):
        return jnp.sum(linear(x, kernel, bias) * jnp.float32(cotangent))

    args = [jnp.float32(a) for a in (x, kernel, bias)]
    value = linear(*args)
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    rows_x, rows_g = x.reshape(-1, 8), cotangent.reshape(-1, 12)
    np.testing.assert_allclose(value, x @ kernel + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], cotangent @ kernel.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1], rows_x.T @ rows_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[2], rows_g.sum(0), rtol=1e-5, atol=1e-5)


def test_bfloat16_products_accumulate_in_float32():
    """The forward, input-gradient and kernel-gradient products of a bfloat16 `linear` take
    bfloat16 operands and give float32 results (the form XLA:CPU runs on AMX)."""
    x, kernel, bias = jnp.ones((6, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16), jnp.ones(16)

    def loss(x, kernel):
        return jnp.sum(linear(x, kernel, bias.astype(jnp.bfloat16)) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 3, dots
    for line in dots:
        operands, result = line.rsplit("->", 1)
        assert operands.count("bf16>") == 2 and result.strip().endswith("xf32>"), line


def test_linear_keeps_bfloat16_gradients_close_to_float32():
    rng = np.random.default_rng(1)
    x, kernel, bias = rng.normal(size=(40, 16)), rng.normal(size=(16, 24)), rng.normal(size=24)

    def grads(dtype):
        args = [jnp.asarray(a, dtype) for a in (x, kernel, bias)]
        return jax.grad(lambda *a: jnp.sum(linear(*a).astype(jnp.float32) ** 2), (0, 1, 2))(*args)

    for low, full in zip(grads(jnp.bfloat16), grads(jnp.float32), strict=True):
        assert low.dtype == jnp.bfloat16  # each gradient in its argument's dtype
        scale = float(jnp.max(jnp.abs(full)))
        np.testing.assert_allclose(np.float32(low), full, atol=0.03 * scale)


def test_sum_rows_sums_all_leading_axes():
    x = np.random.default_rng(2).normal(size=(4, 3, 7))
    got = sum_rows(jnp.float32(x))
    assert got.shape == (7,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, x.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_scaled_matmul_value_and_gradients_match_numpy():
    rng = np.random.default_rng(5)
    x, v, scale = rng.normal(size=(6, 8)), rng.normal(size=(8, 20)), rng.uniform(0.5, 2, size=20)
    cotangent = rng.normal(size=(6, 20))
    args = [jnp.float32(a) for a in (x, v, scale)]
    got = scaled_matmul(*args)
    grads = jax.grad(lambda *a: jnp.sum(scaled_matmul(*a) * jnp.float32(cotangent)), (0, 1, 2))(
        *args
    )
    np.testing.assert_allclose(got, (x @ v) * scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], (cotangent * scale) @ v.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1], x.T @ (cotangent * scale), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[2], np.sum(cotangent * (x @ v), 0), rtol=1e-5, atol=1e-5)


def _max_relative_gap(got, want) -> float:
    """The largest gap between two pytrees' leaves, each relative to its leaf's largest entry or,
    for a leaf of near-zero entries (a bias feeding BatchNorm), to the whole tree's."""
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    gaps = [
        float(jnp.max(jnp.abs(g - w))) / max(float(jnp.max(jnp.abs(w))), 1e-3 * scale)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ]
    return max(gaps)


@pytest.mark.parametrize("use_bn", [False, True])
def test_model_values_and_gradients_equal_the_stock_layers(use_bn):
    """The whole multi-crop network, student mode (drop path on), on the same params and crops:
    the CPU layers give the stock layers' logits and every parameter's gradient to float32
    rounding. Every block of the set is exercised (attention by the C++ kernel: head size 16)."""
    assert cpu.layers.attention_kernel.available()
    config = make_tiny_config(use_bn_in_head=use_bn, drop_path_rate=0.2, norm_last_layer=False)
    global_crops = jax.random.normal(jax.random.key(1), (4, 2, 32, 32, 3))
    local_crops = jax.random.normal(jax.random.key(2), (4, 2, 16, 16, 3))
    weights = jax.random.normal(jax.random.key(3), (4, 4, config.dino.head_n_prototypes))
    variables = build_dino(config).init(jax.random.key(0), global_crops)

    def loss_and_grads(layers):
        model = build_dino(config, layers=layers)

        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params},
                global_crops,
                local_crops,
                train=True,
                rngs={"drop_path": jax.random.key(4)},
                mutable=["batch_stats"],
            )
            return jnp.sum(logits * weights), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (_, want_logits), want_grads = loss_and_grads(stock.STOCK)
    (_, got_logits), got_grads = loss_and_grads(cpu.LAYERS)
    assert_close(got_logits, want_logits)
    assert _max_relative_gap(got_grads, want_grads) < 1e-4


@pytest.mark.slow
def test_cpu_step_equals_the_stock_step():
    """Two train steps on 8 CPU devices: the CPU layers (the default on a CPU mesh) against
    `cpu_tuning=False` (the stock layers, the accelerators' program): the same loss, gradient norm
    and teacher statistics each step. (Adam's first updates are ~lr * sign(g), so entries whose
    gradient is ~0 may differ by ~lr after them: the metrics are the sharp comparison.)"""
    rng = np.random.default_rng(0)
    batch = {
        "global": rng.normal(size=(8, 2, 32, 32, 3)).astype(np.float32),
        "local": rng.normal(size=(8, 2, 16, 16, 3)).astype(np.float32),
    }
    runs = []
    for tuning in (True, False):
        config = make_tiny_config(cpu_tuning=tuning)
        mesh = parallel.make_mesh(config.compute.mesh)
        state = init_state(config, jax.random.key(0), mesh)
        step = make_train_step(config, mesh)
        metrics = []
        for _ in range(2):
            state, step_metrics = step(state, parallel.to_global(batch, mesh))
            metrics.append({k: float(v) for k, v in step_metrics.items()})
        runs.append(metrics)
    for tuned, plain in zip(*runs, strict=True):
        assert tuned.keys() == plain.keys()
        for key in tuned:
            np.testing.assert_allclose(tuned[key], plain[key], rtol=2e-5, err_msg=key)


def test_cpu_mesh_takes_the_cpu_layers_unless_switched_off():
    mesh = parallel.make_mesh((("data", -1),))
    assert platforms.model_layers(make_tiny_config(), mesh) is cpu.LAYERS
    assert platforms.model_layers(make_tiny_config(cpu_tuning=False), mesh) == stock.STOCK
    # Named explicitly, the platform wins over the mesh's devices: a TPU's program on this host.
    assert platforms.model_layers(make_tiny_config(platform="tpu"), mesh) == stock.STOCK
