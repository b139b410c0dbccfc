"""The interface between the generic train step and a method.

One iteration of the step (`dino_jax.core.step.train_step`) is: the shared schedules at
`state.step` → `teacher_outputs` (no gradient) → the gradient of `loss` for the student's
parameters → the optimizer, its parameter groups from `param_rules` → the teacher as an EMA of
the student → `update_state`. A method never sees parameters, shardings or the optimizer: it
calls the networks it built through `Apply` functions, which the step binds to the current
parameters, their BatchNorm statistics and the step's random key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax

from dino_jax.core.optim import ParamRule
from dino_jax.core.schedules import Hyperparams
from dino_jax.models import Layers

# `apply(*inputs, rng=None)`: a network of the method on the current parameters, in training
# mode; `rng` (the student's only) replaces the step's stochastic-depth key.
Apply = Callable[..., Any]


class Method(Protocol):
    """What one method (DINO, DINOv2, ...) computes; bound at construction to a config and to
    the mesh the step is built for (None outside a step), where the method wants to lay out
    arrays the batch's sharding does not reach (DINOv2's per-rank buffers)."""

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of every entry of the GLOBAL batch the step takes (image-major:
        the batch axis first). Training, ahead-of-time compilation, benchmarks and tests read
        the batch from here."""
        ...

    def networks(self, layers: Layers) -> tuple[nn.Module, nn.Module]:
        """(student, teacher) modules built from the platform's `layers`; both have the same
        parameters, so the teacher's are an EMA of the student's."""
        ...

    def init_inputs(self) -> tuple[jax.Array, ...]:
        """Inputs for `student.init` (a batch of one)."""
        ...

    def init_state(self) -> Any:
        """The method's own state at step 0 (DINO: its center), a pytree of arrays."""
        ...

    def teacher_outputs(self, teacher: Apply, batch: dict, state: Any, hp: Hyperparams) -> Any:
        """What the teacher gives the loss and the state update (no gradient flows into it)."""
        ...

    def loss(
        self,
        student: Apply,
        batch: dict,
        teacher_outputs: Any,
        state: Any,
        hp: Hyperparams,
        rng: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the scalar loss to minimise, metrics of this iteration)."""
        ...

    def update_state(self, state: Any, teacher_outputs: Any, hp: Hyperparams) -> Any:
        """The method's state after this iteration."""
        ...

    def param_rules(self) -> Sequence[ParamRule]:
        """The method's parameter groups (`dino_jax.core.optim.ParamRule`), before the config's."""
        ...
