"""DINOv2's objectives against PyTorch written from the official dinov2/loss/*.py (float64):
values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dino_jax.core import dinov2_loss as loss

RTOL = 1e-5


def assert_close(got, want, rtol=RTOL):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.sqrt(np.mean(want**2)))


def torch_sinkhorn(teacher_output, teacher_temp, n_samples, n_iterations=3):
    """sinkhorn_knopp_teacher of DINOLoss / iBOTPatchLoss on one process."""
    Q = torch.exp(teacher_output / teacher_temp).t()
    B, K = n_samples, Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def torch_koleo(x, eps=1e-8):
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    _, nearest = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=eps)(x, x[nearest])
    return -torch.log(distances + eps).mean()


def logits(seed, *shape, scale=3.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def test_sinkhorn_knopp_equals_the_official():
    t = logits(0, 12, 64, scale=0.5)  # head outputs: |t| <= ~1 (weight-normalised last layer)
    want = torch_sinkhorn(torch.from_numpy(t).double(), 0.07, 12).numpy()
    got = loss.sinkhorn_knopp(jnp.asarray(t), 0.07)
    assert_close(got, want)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)  # each sample an assignment


def test_sinkhorn_knopp_over_the_masked_rows_of_a_buffer():
    """iBOT's: the n masked patches of a buffer padded to its upper bound, B = n."""
    t = logits(1, 20, 32, scale=0.5)
    valid = np.zeros(20, bool)
    valid[:13] = True
    want = torch_sinkhorn(torch.from_numpy(t[:13]).double(), 0.05, 13).numpy()
    got = loss.sinkhorn_knopp(jnp.asarray(t), 0.05, valid=jnp.asarray(valid))
    assert_close(got[:13], want)
    assert not np.any(got[13:])


def test_cross_entropy_pairs_and_ibot_loss_with_gradients():
    students = [logits(i, 6, 32) for i in range(3)]
    teachers = [np.asarray(jax.nn.softmax(logits(10 + i, 6, 32), -1)) for i in range(2)]
    ts = [torch.from_numpy(s).double().requires_grad_() for s in students]
    tt = [torch.from_numpy(t).double() for t in teachers]
    want = 0.0
    for s in ts:  # DINOLoss.forward
        lsm = F.log_softmax(s / 0.1, dim=-1)
        for t in tt:
            want = want - torch.sum(t * lsm, dim=-1).mean()
    want.backward()
    value, grads = jax.value_and_grad(
        lambda ss: loss.cross_entropy_pairs(ss, [jnp.asarray(t) for t in teachers])
    )([jnp.asarray(s) for s in students])
    assert_close(value, want.item())
    for got, s in zip(grads, ts, strict=True):
        assert_close(got, s.grad.numpy())

    # iBOT: masks of 4 crops of 9 patches, rows of the masked patches in a buffer of 16.
    masks = np.zeros((4, 9), bool)
    masks[0, [1, 2, 5]] = masks[2, [0, 8]] = True
    weights = np.asarray(loss.masks_weight(jnp.asarray(masks)))[masks]  # [5], crop by crop
    s, t = logits(20, 16, 32), np.asarray(jax.nn.softmax(logits(21, 16, 32), -1))
    padded = np.zeros(16, np.float32)
    padded[:5] = weights
    st = torch.from_numpy(s[:5]).double().requires_grad_()
    official_weight = (1 / torch.from_numpy(masks).sum(-1).clamp(min=1.0)).unsqueeze(-1)
    official_weight = official_weight.expand_as(torch.from_numpy(masks))[torch.from_numpy(masks)]
    per_patch = torch.sum(torch.from_numpy(t[:5]).double() * F.log_softmax(st / 0.1, dim=-1), -1)
    want = -(per_patch * official_weight.double()).sum() / 4  # forward_masked
    want.backward()
    value, grad = jax.value_and_grad(
        lambda x: loss.ibot_masked_loss(x, jnp.asarray(t), jnp.asarray(padded), n_crops=4)
    )(jnp.asarray(s))
    assert_close(value, want.item())
    assert_close(grad[:5], st.grad.numpy())
    assert not np.any(grad[5:])


@pytest.mark.parametrize("batch", [2, 7, 32])
def test_koleo_equals_the_official_with_gradients(batch):
    x = logits(batch, batch, 16, scale=1.0)
    xt = torch.from_numpy(x).double().requires_grad_()
    want = torch_koleo(xt)
    want.backward()
    value, grad = jax.value_and_grad(loss.koleo_loss)(jnp.asarray(x))
    assert_close(value, want.item())
    assert_close(grad, xt.grad.numpy(), rtol=1e-4)


def test_lazy_center_applies_the_previous_batch_mean():
    center, pending = jnp.full((4,), 0.5), jnp.arange(4.0)
    np.testing.assert_allclose(loss.lazy_center(center, pending, False, 0.9), center)
    np.testing.assert_allclose(loss.lazy_center(center, pending, True, 0.9), 0.45 + 0.1 * pending)
    probs = loss.softmax_center(jnp.ones((2, 4)), jnp.arange(4.0), 0.5)
    np.testing.assert_allclose(
        probs[0], np.exp(-2 * np.arange(4)) / np.exp(-2 * np.arange(4)).sum(), rtol=1e-6
    )
