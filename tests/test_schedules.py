"""Schedules against a NumPy transcription of the reference's `utils.cosine_scheduler`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_reference import cosine_scheduler as reference_cosine_scheduler  # utils.py's

from dino_jax.core.config import base_config
from dino_jax.core.schedules import cosine_scheduler, hyperparams_at, teacher_temp_schedule
from dino_jax.methods import Dino


def evaluate(schedule, n):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n)))


@pytest.mark.parametrize(
    "args",
    [
        (5e-4 * 2, 1e-6, 10, 7, 3, 0.0),  # lr with warmup
        (1e-3, 1e-6, 4, 5, 1, 1e-5),  # warmup of one epoch, non-zero start
        (0.04, 0.4, 6, 9, 0, 0.0),  # weight decay, rising
        (0.996, 1.0, 5, 11, 0, 0.0),  # teacher momentum
        (1e-4, 1e-4, 3, 4, 0, 0.0),  # constant (ResNet weight decay)
        (0.1, 0.0, 2, 1, 1, 0.0),  # one warmup iteration: linspace(0, base, 1) == [0]
    ],
)
def test_cosine_scheduler_matches_reference(args):
    base, final, epochs, niter, warmup, start = args
    expected = reference_cosine_scheduler(base, final, epochs, niter, warmup, start)
    got = evaluate(cosine_scheduler(base, final, epochs, niter, warmup, start), len(expected))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-9)


def test_cosine_scheduler_warmup_ends_exactly_at_base():
    # linspace includes both ends: the last warmup iteration already has the base value.
    got = evaluate(cosine_scheduler(1.0, 0.0, 3, 4, warmup_epochs=1), 6)
    np.testing.assert_allclose(got[:5], [0.0, 1 / 3, 2 / 3, 1.0, 1.0], rtol=1e-6)


def test_cosine_scheduler_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="warmup_epochs=5"):
        cosine_scheduler(1.0, 0.0, 5, 3, warmup_epochs=5)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 4])
def test_teacher_temp_schedule_matches_reference(warmup_epochs):
    epochs = 7
    expected = np.concatenate(
        (np.linspace(0.04, 0.07, warmup_epochs), np.ones(epochs - warmup_epochs) * 0.07)
    )
    got = evaluate(teacher_temp_schedule(0.04, 0.07, warmup_epochs), epochs)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_hyperparams_at_indexes_iterations_and_epochs():
    c = base_config()
    c.train.batch_size, c.optim.epochs, c.train.OFFICIAL_EPOCH_LENGTH = 64, 6, 5
    c.optim.warmup_epochs, c.teacher.warmup_teacher_temp_epochs = 2, 3
    c.teacher.teacher_temp, c.optim.freeze_last_layer_epochs = 0.07, 2
    niter = 5
    lr = reference_cosine_scheduler(c.optim.lr * 64 / 256, c.optim.min_lr, 6, niter, 2)
    wd = reference_cosine_scheduler(0.04, 0.4, 6, niter)
    mom = reference_cosine_scheduler(0.996, 1.0, 6, niter)
    temp = np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(3) * 0.07))
    for it in [0, 4, 5, 9, 10, 17, 29]:
        hp = hyperparams_at(c, jnp.int32(it))
        np.testing.assert_allclose(hp.lr, lr[it], rtol=2e-6)
        np.testing.assert_allclose(hp.weight_decay, wd[it], rtol=2e-6)
        np.testing.assert_allclose(hp.momentum, mom[it], rtol=1e-7)
        assert int(hp.epoch) == it // niter
        np.testing.assert_allclose(Dino(c).teacher_temp(hp), temp[it // niter], rtol=1e-6)


def test_hyperparams_need_steps_per_epoch():
    c = base_config()
    with pytest.raises(ValueError, match=r"train\.OFFICIAL_EPOCH_LENGTH=None"):
        hyperparams_at(c, jnp.int32(0))
