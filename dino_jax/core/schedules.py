"""The schedules of a run, as pure functions of the global iteration.

The reference precomputes NumPy arrays (`utils.cosine_scheduler`) and indexes them by iteration; we
build the same curves from optax schedules so that they are evaluated inside the jitted step from
`state.step` and a resumed or imported run needs no extra state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dino_jax.core.config import steps_per_epoch


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> optax.Schedule:
    """The reference's `cosine_scheduler`: linspace warmup (both ends included), then cosine.

    Warmup iteration i < W gives linspace(start, base, W)[i]; iteration W + i gives
    final + (base - final)(1 + cos(pi i / T)) / 2 with T = total - W. Past the last iteration
    the final value of the array is held.
    """
    warmup_iters = warmup_epochs * niter_per_ep
    total_iters = epochs * niter_per_ep
    decay_iters = total_iters - warmup_iters
    if decay_iters <= 0:
        raise ValueError(
            f"warmup_epochs={warmup_epochs} leaves no iteration for the cosine of {epochs} epochs."
        )

    def cosine(i):
        i = jnp.minimum(i, decay_iters - 1)
        return final_value + 0.5 * (base_value - final_value) * (
            1.0 + jnp.cos(jnp.pi * i / decay_iters)
        )

    if warmup_iters == 0:
        return cosine
    # linspace(start, base, W) reaches base at W - 1; with W == 1 it is just [start].
    warmup = optax.linear_schedule(start_warmup_value, base_value, max(warmup_iters - 1, 0))
    return optax.join_schedules([warmup, cosine], [warmup_iters])


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int
) -> optax.Schedule:
    """Teacher temperature per EPOCH: linspace(warmup, final, warmup_epochs), then constant."""
    if warmup_epochs == 0:
        return optax.constant_schedule(teacher_temp)
    warmup = optax.linear_schedule(warmup_teacher_temp, teacher_temp, max(warmup_epochs - 1, 0))
    return optax.join_schedules([warmup, optax.constant_schedule(teacher_temp)], [warmup_epochs])


class Hyperparams(NamedTuple):
    """The values one iteration uses that every method shares, all scalars."""

    lr: jax.Array
    weight_decay: jax.Array
    momentum: jax.Array  # teacher EMA
    epoch: jax.Array  # int32: step // steps_per_epoch, for per-epoch schedules and freezes
    step: jax.Array | None = None  # int32: the global iteration, for per-iteration schedules


def hyperparams_at(config: ml_collections.ConfigDict, step: jax.Array) -> Hyperparams:
    """The shared schedules of `config` at global iteration `step` (main_dino.py: train_dino
    builds them with utils.py: cosine_scheduler)."""
    niter = steps_per_epoch(config)
    lr = cosine_scheduler(
        scaled_lr(config),
        config.optim.min_lr,
        config.optim.epochs,
        niter,
        warmup_epochs=config.optim.warmup_epochs,
    )
    wd = cosine_scheduler(
        config.optim.weight_decay, config.optim.weight_decay_end, config.optim.epochs, niter
    )
    momentum = cosine_scheduler(config.teacher.momentum_teacher, 1.0, config.optim.epochs, niter)
    f32 = jnp.float32
    return Hyperparams(
        lr=jnp.asarray(lr(step), f32),
        weight_decay=jnp.asarray(wd(step), f32),
        momentum=jnp.asarray(momentum(step), f32),
        epoch=jnp.asarray(step // niter, jnp.int32),
        step=jnp.asarray(step, jnp.int32),
    )


def scaled_lr(config: ml_collections.ConfigDict) -> float:
    """optim.lr scaled to the global batch: linearly from 256 images (main_dino.py) or by the
    square root from 1024 (dinov2/train/train.py: sqrt_wrt_1024)."""
    batch = config.train.batch_size
    if config.optim.scaling_rule == "sqrt_wrt_1024":
        return config.optim.lr * math.sqrt(batch / 1024.0)
    return config.optim.lr * batch / 256.0
