"""DINO (Caron et al. 2021; main_dino.py): a multi-crop student learns the centred, sharpened
softmax of an EMA teacher on the global crops; the method's state is the center."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax.core import loss as dino
from dino_jax.core.optim import ParamRule
from dino_jax.core.schedules import Hyperparams, teacher_temp_schedule
from dino_jax.methods.base import Apply
from dino_jax.models import Layers, build_dino

# utils.py: get_params_groups leaves biases and 1-D tensors (norm scales) undecayed; in Flax
# those are exactly the leaves named bias or scale.
NOT_DECAYED = r"(^|/)(bias|scale)$"
LAST_LAYER = r"^head/last_layer/"


class Dino:
    """The DINO method of `config` (see `dino_jax.methods.base.Method`)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh=None):
        self.config = config

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        return crops_spec(self.config)

    def networks(self, layers: Layers) -> tuple[nn.Module, nn.Module]:
        """The multi-crop student (with stochastic depth) and teacher (without)."""
        return (
            build_dino(self.config, layers=layers),
            build_dino(self.config, teacher=True, layers=layers),
        )

    def init_inputs(self) -> tuple[jax.Array, ...]:
        size = self.config.crops.global_crops_size
        return (jnp.zeros((1, 2, size, size, 3), jnp.float32),)

    def init_state(self) -> dict[str, jax.Array]:
        return {"center": jnp.zeros([self.config.dino.head_n_prototypes], jnp.float32)}

    def teacher_temp(self, hp: Hyperparams) -> jax.Array:
        """main_dino.py: DINOLoss.teacher_temp_schedule, per epoch."""
        c = self.config
        schedule = teacher_temp_schedule(
            c.teacher.warmup_teacher_temp,
            c.teacher.teacher_temp,
            c.teacher.warmup_teacher_temp_epochs,
        )
        return jnp.asarray(schedule(hp.epoch), jnp.float32)

    def teacher_outputs(self, teacher: Apply, batch: dict, state, hp: Hyperparams) -> jax.Array:
        """The teacher's logits of the global crops, [2, B, K]."""
        return teacher(batch["global"])

    def loss(self, student: Apply, batch: dict, teacher_logits, state, hp: Hyperparams, rng):
        """main_dino.py: DINOLoss over every (teacher crop, other student crop) pair. With
        `student_chunks` > 1 the student runs on strided chunks of the batch in turn (less
        memory), each with its own stochastic-depth key; the mean of their batch-mean losses is
        the batch mean."""
        chunks = self.config.compute.student_chunks
        temp = self.teacher_temp(hp)
        losses = []
        for j in range(chunks):
            logits = student(
                _chunk(batch["global"], j, chunks, axis=0),
                _chunk(batch.get("local"), j, chunks, axis=0),
                rng=rng if chunks == 1 else jax.random.fold_in(rng, j),
            )
            targets = _chunk(teacher_logits, j, chunks, axis=1)
            losses.append(
                dino.dino_loss(
                    logits, targets, state["center"], temp, self.config.dino.student_temp
                )
            )
        metrics = {
            "teacher_temp": temp,
            **dino.teacher_stats(teacher_logits, state["center"], temp),
        }
        return sum(losses) / chunks, metrics

    def update_state(self, state, teacher_logits, hp: Hyperparams) -> dict[str, jax.Array]:
        center = dino.update_center(
            state["center"], teacher_logits, self.config.dino.center_momentum
        )
        return {"center": center}

    def param_rules(self) -> Sequence[ParamRule]:
        """No weight decay on biases and norm scales; the last layer frozen for the first
        `freeze_last_layer` epochs (main_dino.py: cancel_gradients_last_layer)."""
        return [
            ParamRule(NOT_DECAYED, wd_mult=0.0),
            ParamRule(LAST_LAYER, frozen_epochs=self.config.optim.freeze_last_layer_epochs),
        ]


def crops_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """{"global": [B, 2, G, G, 3], "local": [B, n, L, L, 3] (absent when n = 0)}: float32
    normalised crops, or uint8 ones when the step augments them (data.augment_on_device)."""
    c = config
    b, g, l = c.train.batch_size, c.crops.global_crops_size, c.crops.local_crops_size
    dtype = np.uint8 if c.data.augment_on_device else np.float32
    spec = {"global": jax.ShapeDtypeStruct((b, 2, g, g, 3), dtype)}
    if c.crops.local_crops_number:
        n = c.crops.local_crops_number
        spec["local"] = jax.ShapeDtypeStruct((b, n, l, l, 3), dtype)
    return spec


def _chunk(x: jax.Array | None, j: int, chunks: int, axis: int) -> jax.Array | None:
    """Images j, j + chunks, j + 2 chunks... of the batch axis `axis`: strided, so that a batch
    sharded over devices gives each device a slice of its own images."""
    if x is None or chunks == 1:
        return x
    split = (*x.shape[:axis], x.shape[axis] // chunks, chunks, *x.shape[axis + 1 :])
    return jnp.take(x.reshape(split), j, axis=axis + 1)
