"""The DINO objective: teacher centering and sharpening, multi-crop cross-entropy, center EMA.

Logits are crop-major, `[n_crops, B, K]`: crops 0 and 1 are the global crops. Everything here is
float32 whatever the compute dtype of the networks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def teacher_log_probs(teacher_logits: jax.Array, center: jax.Array, temp: jax.Array) -> jax.Array:
    """log softmax((t - c) / temp): centred and sharpened teacher, [2, B, K]."""
    return jax.nn.log_softmax((teacher_logits - center) / temp, axis=-1)


def dino_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    center: jax.Array,
    teacher_temp: jax.Array,
    student_temp: float = 0.1,
) -> jax.Array:
    """Mean over (teacher crop q, student crop v != q) pairs of the batch-mean H(Pt(q), Ps(v)).

    student_logits [n, B, K], teacher_logits [2, B, K], center [K]. The teacher gets no gradient.
    The pairs are regrouped by student crop: crop v meets w_v = sum over q != v of Pt(q), so each
    crop's log-probabilities are used once. Every sum runs over the last (K) axis: XLA:CPU reduces
    over the leading crop axis several times slower. The terms are the reference's.
    """
    n_crops, n_teacher = student_logits.shape[0], teacher_logits.shape[0]
    student_logits = student_logits.astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_ps = jax.nn.log_softmax(student_logits / student_temp, axis=-1)  # [n, B, K]
    pt = jnp.exp(teacher_log_probs(teacher_logits, center, teacher_temp))  # [2, B, K]

    def others(v: int) -> jax.Array:  # [B, K]: the sum of Pt(q) over the teacher crops q != v
        return sum((pt[q] for q in range(n_teacher) if q != v), jnp.zeros_like(pt[0]))

    weights = jnp.stack([others(v) for v in range(n_crops)])  # [n, B, K]
    cross_entropy = -jnp.sum(weights * log_ps, axis=-1)  # [n, B]
    n_pairs = n_teacher * (n_crops - 1)
    return jnp.sum(jnp.mean(cross_entropy, axis=-1)) / n_pairs


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float) -> jax.Array:
    """c <- m c + (1 - m) mean of the raw teacher logits (both global crops, global batch)."""
    batch_center = jnp.mean(teacher_logits.astype(jnp.float32), axis=(0, 1))
    return center * momentum + batch_center * (1.0 - momentum)


def teacher_stats(teacher_logits: jax.Array, center: jax.Array, temp: jax.Array) -> dict:
    """Collapse monitors of the teacher distribution Pt.

    `teacher_entropy`: mean per-sample entropy H(Pt) (goes to 0 when every output is one-hot).
    `teacher_kl_uniform`: KL(mean Pt || uniform) = log K - H(mean Pt) (goes to log K when all
    samples pick the same dimension, to 0 when outputs are uniform).
    """
    log_pt = teacher_log_probs(teacher_logits.astype(jnp.float32), center, temp)
    pt = jnp.exp(log_pt)
    entropy = jnp.mean(-jnp.sum(pt * log_pt, axis=-1))
    mean_pt = jnp.mean(pt, axis=(0, 1))
    mean_entropy = -jnp.sum(jax.scipy.special.xlogy(mean_pt, mean_pt))
    return {
        "teacher_entropy": entropy,
        "teacher_kl_uniform": jnp.log(mean_pt.shape[-1]) - mean_entropy,
    }
