"""TrainState, its initialisation, and the generic train step jitted over a device mesh: what a
method computes inside it is the method's (`dino_jax.methods`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dino_jax.core import device_augment, parallel, platforms
from dino_jax.core.augment_laws import MultiCropConfig
from dino_jax.core.config import steps_per_epoch, validate, with_rank_batch_size
from dino_jax.core.optim import (
    ParamRule,
    init_hyperparams,
    layerwise_decay_rules,
    make_optimizer,
)
from dino_jax.core.schedules import Hyperparams, hyperparams_at
from dino_jax.methods import Method, get_method
from dino_jax.models import backbone_of
from dino_jax.models.layers import STOCK

Batch = dict[str, jax.Array]  # the method's batch spec: DINO's {"global", "local"} crops


@flax.struct.dataclass
class TrainState:
    """Everything a run carries from one iteration to the next (a pytree).

    `batch_stats` holds {"student": ..., "teacher": ...} BatchNorm statistics, empty without BN.
    """

    step: jax.Array  # global iteration, int32
    student: Any  # params
    teacher: Any  # params, an EMA of the student
    method_state: Any  # the method's own state (DINO: {"center": [K]})
    opt_state: optax.OptState
    batch_stats: Any


def param_rules(config: ml_collections.ConfigDict, method: Method) -> list[ParamRule]:
    """The parameter groups of a run: the method's rules, layer-wise lr decay and the patch
    embedding's lr multiplier, the backbone's freeze (optim.freeze_backbone_epochs), then the
    config's own `param_groups` (pattern, lr_mult, wd_mult, frozen_epochs)."""
    rules = list(method.param_rules())
    if config.optim.layerwise_decay != 1.0 or config.optim.patch_embed_lr_mult != 1.0:
        depth = getattr(backbone_of(config), "depth", None)
        if depth is None:
            raise ValueError(
                f"optim.layerwise_decay={config.optim.layerwise_decay} and "
                f"optim.patch_embed_lr_mult={config.optim.patch_embed_lr_mult} need a ViT; "
                f"student.arch={config.student.arch!r} has no blocks."
            )
        rules += layerwise_decay_rules(
            config.optim.layerwise_decay, depth, config.optim.patch_embed_lr_mult
        )
    if config.optim.freeze_backbone_epochs:
        rules.append(ParamRule(r"^backbone/", frozen_epochs=config.optim.freeze_backbone_epochs))
    return rules + [ParamRule(*group) for group in config.optim.param_groups]


def optimizer(config: ml_collections.ConfigDict, method: Method, hp: Hyperparams, params):
    """The student's optimizer at this iteration's values `hp`."""
    return make_optimizer(config, param_rules(config, method), hp, params)


def init_state(config: ml_collections.ConfigDict, rng: jax.Array, mesh: Mesh | None = None):
    """A fresh TrainState: the teacher starts as a copy of the student, the method's state as
    the method makes it (DINO: the center at 0).

    With a mesh, the state is created directly in its sharded layout (no full copy on one device).
    """
    validate(config, None if mesh is None else mesh.size)
    if mesh is None:
        return _init_state(config, rng)
    shardings = state_sharding(config, mesh)
    return jax.jit(partial(_init_state, config), out_shardings=shardings)(rng)


def _init_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    method = get_method(config)
    student, _ = method.networks(STOCK)
    variables = student.init(rng, *method.init_inputs(), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        student=params,
        # A distinct buffer, so that donating the state never donates one array twice.
        teacher=jax.tree.map(jnp.copy, params),
        method_state=method.init_state(),
        opt_state=optimizer(config, method, init_hyperparams(), params).init(params),
        batch_stats={"student": batch_stats, "teacher": batch_stats} if batch_stats else {},
    )


def state_sharding(config: ml_collections.ConfigDict, mesh: Mesh):
    """The NamedShardings of every leaf of the TrainState (rules in parallel.py)."""
    return jax.tree.map(lambda x: x.sharding, abstract_state(config, mesh))


def abstract_state(config: ml_collections.ConfigDict, mesh: Mesh):
    """The TrainState as ShapeDtypeStructs with their shardings (to restore a checkpoint into)."""
    shapes = jax.eval_shape(partial(_init_state, config), jax.random.key(0))
    return jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        shapes,
        parallel.state_sharding(shapes, mesh),
    )


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Batch:
    """The global batch of `config`'s method as ShapeDtypeStructs, split over `mesh` if given."""
    spec = get_method(config).batch_spec()
    if mesh is None:
        return spec
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in spec.items()}


def student_gradients(
    state: TrainState,
    batch: Batch,
    hp: Hyperparams,
    *,
    config: ml_collections.ConfigDict,
    method: Method,
    student: nn.Module,
    teacher: nn.Module,
    gather: Callable = lambda params: params,
) -> tuple[jax.Array, Any, Any, dict, dict]:
    """The method's loss on `batch` (augmented) and its gradient for the student's parameters,
    before any clipping: (loss, grads, teacher outputs, new BatchNorm statistics, metrics)."""
    stats = state.batch_stats or {"student": {}, "teacher": {}}
    teacher_stats = []

    def run_teacher(*inputs):
        variables = {"params": gather(state.teacher), "batch_stats": stats["teacher"]}
        out, updates = teacher.apply(variables, *inputs, train=True, mutable=["batch_stats"])
        teacher_stats.append(updates.get("batch_stats", {}))
        return out

    teacher_outputs = jax.lax.stop_gradient(
        method.teacher_outputs(run_teacher, batch, state.method_state, hp)
    )
    drop_path_rng = jax.random.fold_in(jax.random.key(config.train.seed), state.step)

    def loss_fn(params):
        student_stats = []

        def run_student(*inputs, rng=drop_path_rng):
            variables = {"params": gather(params), "batch_stats": stats["student"]}
            out, updates = student.apply(
                variables, *inputs, train=True, rngs={"drop_path": rng}, mutable=["batch_stats"]
            )
            student_stats.append(updates.get("batch_stats", {}))
            return out

        loss, metrics = method.loss(
            run_student, batch, teacher_outputs, state.method_state, hp, drop_path_rng
        )
        return loss, (metrics, student_stats[-1])

    (loss, (metrics, student_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.student
    )
    batch_stats = state.batch_stats
    if batch_stats:  # each network keeps its own (the teacher's are not EMAs)
        batch_stats = {"student": student_stats, "teacher": teacher_stats[-1]}
    return loss, grads, teacher_outputs, batch_stats, metrics


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    config: ml_collections.ConfigDict,
    method: Method,
    student: nn.Module,
    teacher: nn.Module,
    gather: Callable = lambda params: params,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One iteration (main_dino.py: train_one_epoch): schedules, the teacher's outputs, the
    gradient of the method's loss, the update, the teacher EMA and the method's state update.
    `gather` gives the forward passes their parameters whole (parallel.gathered under fsdp)."""
    hp, batch = _iteration_inputs(config, state.step, batch)
    loss, grads, teacher_outputs, batch_stats, method_metrics = student_gradients(
        state,
        batch,
        hp,
        config=config,
        method=method,
        student=student,
        teacher=teacher,
        gather=gather,
    )
    tx = optimizer(config, method, hp, state.student)
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    student_params = optax.apply_updates(state.student, updates)
    teacher_params = jax.tree.map(
        lambda t, s: t * hp.momentum + (1.0 - hp.momentum) * s, state.teacher, student_params
    )
    new_state = state.replace(
        step=state.step + 1,
        student=student_params,
        teacher=teacher_params,
        method_state=method.update_state(state.method_state, teacher_outputs, hp),
        opt_state=opt_state,
        batch_stats=batch_stats,
    )
    metrics = {
        "loss": loss,
        "lr": hp.lr,
        "weight_decay": hp.weight_decay,
        "momentum": hp.momentum,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(student_params),
        **method_metrics,
    }
    return new_state, metrics


def _iteration_inputs(config: ml_collections.ConfigDict, step: jax.Array, batch: Batch):
    """(the shared schedules' values at `step`, the batch as the networks take it)."""
    if config.data.augment_on_device:
        batch = {**batch, **augment_on_device(config, step, batch)}
    return hyperparams_at(config, step), batch


def augment_on_device(config: ml_collections.ConfigDict, step: jax.Array, batch: Batch) -> Batch:
    """uint8 crops -> the photometric half of the multi-crop, from this step's own key."""
    key = jax.random.fold_in(jax.random.key(config.train.seed + 1), step)  # not drop path's stream
    laws = MultiCropConfig(blur_sigma=tuple(config.data.blur_sigma))
    return device_augment.augment_batch(key, batch, laws)


def _bound(fn: Callable, config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`fn` with the config, the method, its networks built from the layers of the mesh's
    platform and the fsdp gather bound; bad settings fail here, before compilation."""
    validate(config, mesh.size)
    steps_per_epoch(config)  # the schedules need it: fail now rather than while tracing
    config = with_rank_batch_size(config, mesh.size)
    method = get_method(config, mesh)
    student, teacher = method.networks(platforms.model_layers(config, mesh))
    return partial(
        fn,
        config=config,
        method=method,
        student=student,
        teacher=teacher,
        gather=partial(parallel.gathered, mesh=mesh),
    )


def make_train_step(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step` jitted over `mesh`: state sharded by the parallel.py rules and donated, batch
    split over every device, metrics replicated, the model built from the layers of the mesh's
    platform. Bad settings fail here, before compilation."""
    step = _bound(train_step, config, mesh)
    shardings = state_sharding(config, mesh)
    return jax.jit(
        step,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def make_gradient_step(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> Callable[[TrainState, Batch], tuple[jax.Array, Any]]:
    """(state, batch) -> (loss, the student's gradients before clipping) of the iteration that
    `make_train_step` would run from `state`, jitted over `mesh` like it; the state is kept.
    What a step is checked by: Adam's update hides the size of the gradients."""
    bound = _bound(student_gradients, config, mesh)

    def gradients(state, batch):
        hp, batch = _iteration_inputs(config, state.step, batch)
        loss, grads, *_ = bound(state, batch, hp)
        return loss, grads

    shardings = state_sharding(config, mesh)
    return jax.jit(
        gradients,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), shardings.student),
    )
