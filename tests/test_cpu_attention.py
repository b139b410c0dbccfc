"""The CPU attention kernel against torch float64 autograd, under a sharded mesh, and its build."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dino_jax.cpu import attention_kernel as cpu_attention

# Where a compiler is, the kernel must build: a broken build fails here instead of skipping.
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler on this machine"
)


def test_builds_where_a_compiler_is():
    assert cpu_attention.available()


def torch_attention(q, k, v, grad, scale):
    """The reference's attention in float64, [B, N, heads, hd] in and out, with autograd."""
    q, k, v = (
        torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (q, k, v)
    )
    qh, kh, vh = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    attn = ((qh @ kh.transpose(-2, -1)) * scale).softmax(dim=-1)
    out = (attn @ vh).permute(0, 2, 1, 3)
    out.backward(torch.tensor(np.asarray(grad), dtype=torch.float64))
    return out.detach().numpy(), [x.grad.numpy() for x in (q, k, v)], attn.detach().numpy()


def random_qkvg(shape, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(spread * rng.standard_normal(shape), jnp.float32) for _ in range(4)]


def kernel_value_and_grads(q, k, v, grad, scale):
    def loss(q, k, v):
        return jnp.sum(cpu_attention.attention(q, k, v, scale) * grad)

    out = jax.jit(lambda q, k, v: cpu_attention.attention(q, k, v, scale))(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


# Token counts below, at and above the vector width (8 or 16 lanes), ViT-S/16's 197 and 37; a
# head size of 24, an odd number of 8-float halves (the products' last strip on 16 lanes).
@pytest.mark.parametrize(
    "shape",
    [(2, 1, 1, 16), (2, 9, 3, 16), (1, 16, 2, 32), (2, 21, 3, 24), (3, 37, 6, 64), (1, 197, 2, 64)],
)
def test_values_and_gradients_match_torch_float64(shape):
    q, k, v, grad = random_qkvg(shape, seed=sum(shape))
    scale = shape[-1] ** -0.5
    out, grads = kernel_value_and_grads(q, k, v, grad, scale)
    want_out, want_grads, _ = torch_attention(q, k, v, grad, scale)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)
    for name, got, want in zip("qkv", grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6, err_msg=f"d{name}")


def test_saved_probabilities_are_the_softmax():
    shape = (2, 23, 3, 16)
    q, k, v, grad = random_qkvg(shape, seed=1)
    _, probs = jax.jit(lambda q, k, v: cpu_attention._call_forward(q, k, v, 0.25))(q, k, v)
    _, _, want = torch_attention(q, k, v, grad, 0.25)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-6)


def test_large_logits_stay_finite_and_exact():
    """Logits up to ~+-300: the row maximum is subtracted before exp, as torch's softmax does."""
    shape = (2, 40, 2, 16)
    q, k, v, grad = random_qkvg(shape, seed=2, spread=6.0)
    out, grads = kernel_value_and_grads(q, k, v, grad, 0.5)
    want_out, want_grads, _ = torch_attention(q, k, v, grad, 0.5)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3 * np.abs(want).max())


def test_nan_propagates():
    q, k, v, _ = random_qkvg((1, 10, 1, 16), seed=3)
    out = cpu_attention.attention(q.at[0, 4, 0, 3].set(jnp.nan), k, v, 0.25)
    assert np.all(np.isnan(out[0, 4])) and np.all(np.isfinite(np.delete(out[0], 4, axis=0)))


def test_sharded_batch_and_heads_stay_sharded():
    """On a 4 x 2 mesh of CPU devices the kernel runs on each device's own images and heads: no
    gather in the compiled program, and the same numbers as on one device."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8])
    shape = (8, 21, 4, 16)
    q, k, v, grad = random_qkvg(shape, seed=4)
    sharding = NamedSharding(mesh, P("data", None, "model", None))
    args = [jax.device_put(x, sharding) for x in (q, k, v, grad)]

    def value_and_grads(q, k, v, grad):
        out, vjp = jax.vjp(lambda *a: cpu_attention.attention(*a, 0.25), q, k, v)
        return out, vjp(grad)

    step = jax.jit(value_and_grads, out_shardings=sharding)
    hlo = step.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert "f32[2,21,2,16]" in hlo  # each device's shard of [8, 21, 4, 16]
    out, grads = step(*args)
    want_out, want_grads, _ = torch_attention(q, k, v, grad, 0.25)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6)


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_without_compiler_the_model_keeps_xla_attention(tmp_path):
    """No compiler (and no cached build): a warning, available() False, and the CPU layers'
    attention falls back to XLA's products with the same numbers."""
    result = run_python(
        """
        import jax.numpy as jnp, numpy as np
        from dino_jax.cpu import attention_kernel as cpu_attention
        from dino_jax.cpu.layers import attention, explicit_attention
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 1, 16)), jnp.float32)
        assert not cpu_attention.available()
        got = attention(x, x, x, 0.25)
        np.testing.assert_array_equal(got, explicit_attention(x, x, x, 0.25))
        print("fallback ok")
        """,
        CXX="no-such-compiler",
        DINO_JAX_CACHE=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
    assert "CPU attention kernel unavailable" in result.stderr
    assert "no-such-compiler" in result.stderr


@pytest.mark.slow
def test_switched_off_by_environment():
    result = run_python(
        "from dino_jax.cpu import attention_kernel; print(attention_kernel.available())",
        DINO_JAX_CPU_KERNELS="0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.slow
def test_build_is_cached_per_source(tmp_path):
    """The first process compiles into the cache, the next loads that file without compiling."""
    code = """
        from dino_jax.cpu import attention_kernel as cpu_attention
        assert cpu_attention.available()
        print(cpu_attention._build())
    """
    first = run_python(code, DINO_JAX_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    built = sorted(tmp_path.iterdir())
    assert [p.suffix for p in built] == [".so"], built  # no temporary file left behind
    mtime = built[0].stat().st_mtime_ns
    second = run_python(code, DINO_JAX_CACHE=str(tmp_path), CXX="no-such-compiler")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout and built[0].stat().st_mtime_ns == mtime
