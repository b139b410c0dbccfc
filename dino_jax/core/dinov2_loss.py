"""DINOv2's objectives beside DINO's cross-entropy (Oquab et al. 2023; dinov2/loss/*.py): the
teacher's targets by softmax centering or by Sinkhorn-Knopp, the cross-entropy summed over
(student, teacher) pairs, iBOT's masked-patch loss and the KoLeo regulariser.

Everything is float32, on global arrays: the sums the official code all-reduces over processes
are plain sums here, over the whole (sharded) batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# dinov2/loss/koleo_loss.py: F.normalize's and PairwiseDistance's eps.
KOLEO_EPS = 1e-8


def softmax_center(logits: jax.Array, center: jax.Array, temp: jax.Array) -> jax.Array:
    """softmax((t - c) / temp) over the last axis: DINOLoss / iBOTPatchLoss.softmax_center_teacher
    (with the center their lazy update has already applied, `lazy_center`)."""
    return jax.nn.softmax((logits.astype(jnp.float32) - center) / temp, axis=-1)


def lazy_center(
    center: jax.Array, pending: jax.Array, has_pending: jax.Array, momentum: float
) -> jax.Array:
    """The official apply_center_update: the EMA step with the previous iteration's batch mean
    `pending`, applied at the start of this iteration, when there is one."""
    return jnp.where(has_pending, center * momentum + pending * (1.0 - momentum), center)


def sinkhorn_knopp(
    logits: jax.Array, temp: jax.Array, n_iterations: int = 3, valid: jax.Array | None = None
) -> jax.Array:
    """[N, K] logits -> [N, K] assignments: DINOLoss / iBOTPatchLoss.sinkhorn_knopp_teacher.

    Q = exp(t / temp) (no max subtraction, as the official), scaled to sum 1, then n_iterations
    of prototype rows to 1/K and sample columns to 1/B, finally times B; B is the number of
    rows, or of `valid` rows (bool [N]: iBOT's masked patches in a fixed-size buffer), the
    others weighing nothing.
    """
    q = jnp.exp(logits.astype(jnp.float32) / temp).T  # [K, N]
    if valid is not None:
        q = jnp.where(valid[None, :], q, 0.0)
    n_samples = logits.shape[0] if valid is None else jnp.sum(valid).astype(jnp.float32)
    n_prototypes = q.shape[0]
    q = q / jnp.sum(q)
    for _ in range(n_iterations):
        q = q / jnp.sum(q, axis=1, keepdims=True) / n_prototypes
        columns = jnp.sum(q, axis=0, keepdims=True)
        q = jnp.where(columns > 0, q / jnp.where(columns > 0, columns, 1.0), 0.0) / n_samples
    return (q * n_samples).T


def cross_entropy_pairs(
    student_logits: Sequence[jax.Array],
    teacher_probs: Sequence[jax.Array],
    student_temp: float = 0.1,
) -> jax.Array:
    """DINOLoss.forward: -sum over every (student chunk s, teacher chunk t) of the batch mean of
    sum_k t log softmax(s / student_temp); each s and t [B, K]."""
    total = jnp.zeros((), jnp.float32)
    for s in student_logits:
        log_ps = jax.nn.log_softmax(s.astype(jnp.float32) / student_temp, axis=-1)
        for t in teacher_probs:
            total -= jnp.mean(jnp.sum(t * log_ps, axis=-1))
    return total


def masks_weight(masks: jax.Array) -> jax.Array:
    """bool [B, N] -> [B, N]: 1 / (masked patches of the crop) at its masked patches, 0
    elsewhere (collate_data_and_cast's masks_weight, in place)."""
    counts = jnp.maximum(jnp.sum(masks, axis=-1, keepdims=True), 1).astype(jnp.float32)
    return jnp.where(masks, 1.0 / counts, 0.0)


def ibot_masked_loss(
    student_logits: jax.Array,
    teacher_probs: jax.Array,
    weights: jax.Array,
    n_crops: int,
    student_temp: float = 0.1,
) -> jax.Array:
    """iBOTPatchLoss.forward_masked: -sum over masked patches (rows, [M, K] each) of
    w * sum_k t log softmax(s / student_temp), divided by the number of global crops (masked or
    not); rows of weight 0 (a buffer's padding) count for nothing."""
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    per_patch = jnp.sum(teacher_probs * log_ps, axis=-1)
    return -jnp.sum(per_patch * weights) / n_crops


def koleo_loss(x: jax.Array) -> jax.Array:
    """KoLeoLoss (Sablayrolles et al. 2019) of [B, D] features: -mean log of each L2-normalised
    row's distance to its nearest other row (found by the largest dot product); B >= 2."""
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), KOLEO_EPS)
    dots = jnp.dot(x, x.T, precision=jax.lax.Precision.HIGHEST)
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    nearest = x[jnp.argmax(dots, axis=1)]
    distances = jnp.linalg.norm(x - nearest + KOLEO_EPS, axis=-1)
    return -jnp.mean(jnp.log(distances + KOLEO_EPS))


def target_stats(targets: jax.Array) -> dict[str, jax.Array]:
    """Collapse monitors of the teacher's targets [..., K] (probabilities): `teacher_entropy`,
    the mean entropy of one target (0 when every target is one-hot), and `teacher_kl_uniform`,
    log K minus the entropy of the mean target (log K when all pick the same prototype)."""
    flat = targets.reshape(-1, targets.shape[-1]).astype(jnp.float32)
    entropy = jnp.mean(-jnp.sum(jax.scipy.special.xlogy(flat, flat), axis=-1))
    mean = jnp.mean(flat, axis=0)
    mean_entropy = -jnp.sum(jax.scipy.special.xlogy(mean, mean))
    return {
        "teacher_entropy": entropy,
        "teacher_kl_uniform": jnp.log(flat.shape[-1]) - mean_entropy,
    }
