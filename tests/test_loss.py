"""The DINO loss, center update and collapse monitors against a NumPy transcription of
main_dino.py: DINOLoss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax.core.loss import dino_loss, teacher_stats, update_center


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_loss(student, teacher, center, temp, student_temp=0.1):
    """The reference's DINOLoss.forward: an explicit loop over (q, v != q) pairs."""
    total, n_terms = 0.0, 0
    for iq in range(teacher.shape[0]):
        q = np_softmax((teacher[iq] - center) / temp)
        for v in range(student.shape[0]):
            if v == iq:
                continue
            total += np.mean(np.sum(-q * np_log_softmax(student[v] / student_temp), axis=-1))
            n_terms += 1
    return total / n_terms


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    n_crops, b, k = 6, 5, 64
    student = rng.normal(size=(n_crops, b, k)).astype(np.float64)
    teacher = rng.normal(size=(2, b, k)).astype(np.float64)
    center = rng.normal(scale=0.1, size=(k,)).astype(np.float64)
    return student, teacher, center


@pytest.mark.parametrize("temp", [0.04, 0.07])
def test_loss_matches_pairwise_reference(logits, temp):
    student, teacher, center = logits
    expected = reference_loss(student, teacher, center, temp)
    got = dino_loss(jnp.float32(student), jnp.float32(teacher), jnp.float32(center), temp)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_loss_with_only_global_crops(logits):
    student, teacher, center = logits
    expected = reference_loss(student[:2], teacher, center, 0.04)
    got = dino_loss(jnp.float32(student[:2]), jnp.float32(teacher), jnp.float32(center), 0.04)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_loss_gradient_matches_analytic_form(logits):
    # d loss / d s_v = sum over q != v of (softmax(s_v / ts) - Pt(q)) / (ts * B * n_pairs).
    student, teacher, center = logits
    temp, ts = 0.04, 0.1
    n, b, _ = student.shape
    n_pairs = 2 * (n - 1)
    pt = np_softmax((teacher - center) / temp)
    ps = np_softmax(student / ts)
    expected = np.zeros_like(student)
    for v in range(n):
        for q in range(2):
            if q != v:
                expected[v] += (ps[v] - pt[q]) / (ts * b * n_pairs)
    grad_s, grad_t = jax.grad(dino_loss, argnums=(0, 1))(
        jnp.float32(student), jnp.float32(teacher), jnp.float32(center), temp
    )
    np.testing.assert_allclose(grad_s, expected, rtol=1e-4, atol=1e-7)
    assert not np.any(grad_t), "the teacher must get no gradient"


def test_center_update_is_ema_of_global_batch_mean(logits):
    _, teacher, center = logits
    expected = 0.9 * center + 0.1 * teacher.reshape(-1, teacher.shape[-1]).mean(0)
    got = update_center(jnp.float32(center), jnp.float32(teacher), 0.9)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_teacher_stats_entropy_and_kl(logits):
    _, teacher, center = logits
    pt = np_softmax((teacher - center) / 0.07)
    entropy = np.mean(-np.sum(pt * np.log(pt), -1))
    mean_pt = pt.reshape(-1, pt.shape[-1]).mean(0)
    kl = np.sum(mean_pt * np.log(mean_pt * pt.shape[-1]))
    got = teacher_stats(jnp.float32(teacher), jnp.float32(center), 0.07)
    np.testing.assert_allclose(got["teacher_entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(got["teacher_kl_uniform"], kl, rtol=1e-4, atol=1e-6)


def test_teacher_stats_detect_collapse():
    k = 16
    uniform = teacher_stats(jnp.zeros((2, 4, k)), jnp.zeros(k), 0.04)
    np.testing.assert_allclose(uniform["teacher_entropy"], np.log(k), rtol=1e-6)
    np.testing.assert_allclose(uniform["teacher_kl_uniform"], 0.0, atol=1e-6)
    one_hot = jnp.zeros((2, 4, k)).at[..., 3].set(100.0)  # every sample on one dimension
    collapsed = teacher_stats(one_hot, jnp.zeros(k), 0.04)
    np.testing.assert_allclose(collapsed["teacher_entropy"], 0.0, atol=1e-5)
    np.testing.assert_allclose(collapsed["teacher_kl_uniform"], np.log(k), rtol=1e-5)
