"""TrainState, its initialisation, and the pure DINO train step jitted over a device mesh."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dino_jax import device_augment, parallel, platform
from dino_jax import loss as dino
from dino_jax.augment_laws import MultiCropConfig
from dino_jax.config import steps_per_epoch, validate
from dino_jax.models import MultiCrop, build_dino
from dino_jax.optim import init_hyperparams, make_optimizer
from dino_jax.schedules import Hyperparams, hyperparams_at

Batch = dict[str, jax.Array]  # {"global": [B, 2, H, W, 3], "local": [B, n, h, w, 3]} (optional)


@flax.struct.dataclass
class TrainState:
    """Everything a DINO run carries from one iteration to the next (a pytree).

    `batch_stats` holds {"student": ..., "teacher": ...} BatchNorm statistics, empty without BN.
    """

    step: jax.Array  # global iteration, int32
    student: Any  # params
    teacher: Any  # params, an EMA of the student
    center: jax.Array  # [K]
    opt_state: optax.OptState
    batch_stats: Any


def init_state(config: ml_collections.ConfigDict, rng: jax.Array, mesh: Mesh | None = None):
    """A fresh TrainState: the teacher starts as a copy of the student, the center at 0.

    With a mesh, the state is created directly in its sharded layout (no full copy on one device).
    """
    validate(config, None if mesh is None else mesh.size)
    if mesh is None:
        return _init_state(config, rng)
    shardings = state_sharding(config, mesh)
    return jax.jit(partial(_init_state, config), out_shardings=shardings)(rng)


def _init_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    size = config.data.global_crop_size
    dummy = jnp.zeros((1, 2, size, size, 3), jnp.float32)
    variables = build_dino(config).init(rng, dummy, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        student=params,
        # A distinct buffer, so that donating the state never donates one array twice.
        teacher=jax.tree.map(jnp.copy, params),
        center=jnp.zeros([config.out_dim], jnp.float32),
        opt_state=make_optimizer(config, init_hyperparams()).init(params),
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


def student_gradients(
    state: TrainState,
    batch: Batch,
    hp: Hyperparams,
    *,
    config: ml_collections.ConfigDict,
    student: MultiCrop,
    teacher: MultiCrop,
    gather: Callable = lambda params: params,
) -> tuple[jax.Array, Any, jax.Array, dict]:
    """The DINO loss of the student on `batch` (augmented crops) and its gradient, before any
    clipping: (loss, grads, teacher logits [2, B, K], new BatchNorm statistics)."""
    global_crops, local_crops = batch["global"], batch.get("local")
    stats = state.batch_stats or {"student": {}, "teacher": {}}

    teacher_logits, teacher_updates = teacher.apply(
        {"params": gather(state.teacher), "batch_stats": stats["teacher"]},
        global_crops,
        train=True,
        mutable=["batch_stats"],
    )
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    drop_path_rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def loss_fn(params):
        chunks = config.student_chunks
        losses = []
        for j in range(chunks):
            rng = drop_path_rng if chunks == 1 else jax.random.fold_in(drop_path_rng, j)
            student_logits, student_updates = student.apply(
                {"params": gather(params), "batch_stats": stats["student"]},
                _chunk(global_crops, j, chunks, axis=0),
                _chunk(local_crops, j, chunks, axis=0),
                train=True,
                rngs={"drop_path": rng},
                mutable=["batch_stats"],
            )
            targets = _chunk(teacher_logits, j, chunks, axis=1)
            losses.append(
                dino.dino_loss(
                    student_logits, targets, state.center, hp.teacher_temp, config.student_temp
                )
            )
        # Equal chunks: the mean of their batch-mean losses is the batch mean.
        return sum(losses) / chunks, student_updates

    (loss, student_updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
    return loss, grads, teacher_logits, _batch_stats(state, student_updates, teacher_updates)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    config: ml_collections.ConfigDict,
    student: MultiCrop,
    teacher: MultiCrop,
    gather: Callable = lambda params: params,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One DINO iteration (main_dino.py: train_one_epoch): schedules, forwards, loss, update,
    teacher and center EMAs. `gather` gives the forward passes their parameters whole
    (parallel.gathered under fsdp)."""
    hp, batch = _iteration_inputs(config, state.step, batch)
    loss, grads, teacher_logits, batch_stats = student_gradients(
        state, batch, hp, config=config, student=student, teacher=teacher, gather=gather
    )
    updates, opt_state = make_optimizer(config, hp).update(grads, state.opt_state, state.student)
    student_params = optax.apply_updates(state.student, updates)
    teacher_params = jax.tree.map(
        lambda t, s: t * hp.momentum + (1.0 - hp.momentum) * s, state.teacher, student_params
    )
    new_state = state.replace(
        step=state.step + 1,
        student=student_params,
        teacher=teacher_params,
        center=dino.update_center(state.center, teacher_logits, config.center_momentum),
        opt_state=opt_state,
        batch_stats=batch_stats,
    )
    metrics = {
        "loss": loss,
        "lr": hp.lr,
        "weight_decay": hp.weight_decay,
        "momentum": hp.momentum,
        "teacher_temp": hp.teacher_temp,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(student_params),
        **dino.teacher_stats(teacher_logits, state.center, hp.teacher_temp),
    }
    return new_state, metrics


def _iteration_inputs(config: ml_collections.ConfigDict, step: jax.Array, batch: Batch):
    """(the schedules' values at `step`, the batch as the networks take it)."""
    if config.data.augment_on_device:
        batch = augment_on_device(config, step, batch)
    return hyperparams_at(config, step), batch


def _chunk(x: jax.Array | None, j: int, chunks: int, axis: int) -> jax.Array | None:
    """Images j, j + chunks, j + 2 chunks... of the batch axis `axis`: strided, so that a batch
    sharded over devices gives each device a slice of its own images."""
    if x is None or chunks == 1:
        return x
    split = (*x.shape[:axis], x.shape[axis] // chunks, chunks, *x.shape[axis + 1 :])
    return jnp.take(x.reshape(split), j, axis=axis + 1)


def augment_on_device(config: ml_collections.ConfigDict, step: jax.Array, batch: Batch) -> Batch:
    """uint8 crops -> the photometric half of the multi-crop, from this step's own key."""
    key = jax.random.fold_in(jax.random.key(config.seed + 1), step)  # not drop path's stream
    laws = MultiCropConfig(blur_sigma=tuple(config.data.blur_sigma))
    return device_augment.augment_batch(key, batch, laws)


def _batch_stats(state: TrainState, student_updates: dict, teacher_updates: dict):
    """The updated BatchNorm statistics; each network keeps its own (the teacher's are not EMAs)."""
    if not state.batch_stats:
        return state.batch_stats
    return {"student": student_updates["batch_stats"], "teacher": teacher_updates["batch_stats"]}


def _bound(fn: Callable, config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`fn` with the config, the networks built from the layers of the mesh's platform and the
    fsdp gather bound; bad settings fail here, before compilation."""
    validate(config, mesh.size)
    steps_per_epoch(config)  # the schedules need it: fail now rather than while tracing
    layers = platform.model_layers(config, mesh)
    return partial(
        fn,
        config=config,
        student=build_dino(config, layers=layers),
        teacher=build_dino(config, teacher=True, layers=layers),
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
        loss, grads, _, _ = bound(state, batch, hp)
        return loss, grads

    shardings = state_sharding(config, mesh)
    return jax.jit(
        gradients,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), shardings.student),
    )
