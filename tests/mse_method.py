"""A second method, written outside the trainer: a BYOL-style mean-squared error between the
student's and the teacher's L2-normalised outputs on the global crops (each student crop against
the teacher's other crop), with a state of its own (an EMA of the teacher outputs' mean norm).

It shows what a method needs to join: a class with the `dino_jax.methods.Method` functions and
an entry in `dino_jax.methods.METHODS`; no trainer module changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.core.optim import ParamRule
from dino_jax.methods import METHODS
from dino_jax.models import build_dino


def normalised(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class MeanSquaredError:
    def __init__(self, config, mesh=None):
        self.config = config

    def batch_spec(self):
        c = self.config
        size = c.crops.global_crops_size
        return {"global": jax.ShapeDtypeStruct((c.train.batch_size, 2, size, size, 3), np.float32)}

    def networks(self, layers):
        return build_dino(self.config, layers=layers), build_dino(
            self.config, teacher=True, layers=layers
        )

    def init_inputs(self):
        size = self.config.crops.global_crops_size
        return (jnp.zeros((1, 2, size, size, 3), jnp.float32),)

    def init_state(self):
        return {"teacher_norm": jnp.ones([], jnp.float32)}

    def teacher_outputs(self, teacher, batch, state, hp):
        return teacher(batch["global"])  # [2, B, K]

    def loss(self, student, batch, teacher_outputs, state, hp, rng):
        outputs = student(batch["global"], rng=rng)  # [2, B, K]
        swapped = teacher_outputs[::-1]  # crop 0 learns the teacher's crop 1 and back
        error = jnp.sum((normalised(outputs) - normalised(swapped)) ** 2, axis=-1)
        return jnp.mean(error), {"teacher_norm": state["teacher_norm"]}

    def update_state(self, state, teacher_outputs, hp):
        norm = jnp.mean(jnp.linalg.norm(teacher_outputs, axis=-1))
        return {"teacher_norm": 0.9 * state["teacher_norm"] + 0.1 * norm}

    def param_rules(self):
        return [ParamRule(r"(^|/)(bias|scale)$", wd_mult=0.0)]


def register():
    METHODS["mse"] = MeanSquaredError
