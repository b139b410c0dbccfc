"""The jitted train step: the same gradients and updates on any layout (sharded, remat,
chunks, bfloat16), the EMA/center/loss formulas, the freeze, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gradients import assert_gradients_close, assert_updates_close, relative_gaps

from dino_jax.core import parallel
from dino_jax.core.step import init_state, make_gradient_step, make_train_step, state_sharding
from dino_jax.models import build_dino


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, g, l = config.train.batch_size, config.crops.global_crops_size, config.crops.local_crops_size
    batch = {"global": rng.normal(size=(b, 2, g, g, 3)).astype(np.float32)}
    if config.crops.local_crops_number:
        batch["local"] = rng.normal(size=(b, config.crops.local_crops_number, l, l, 3)).astype(
            np.float32
        )
    return batch


def run_steps(config, mesh_axes, n_devices, n_steps=1, start_step=0):
    mesh = parallel.make_mesh(mesh_axes, jax.devices()[:n_devices])
    state = init_state(config, jax.random.key(0), mesh)
    state = state.replace(step=jnp.int32(start_step))
    train_step = make_train_step(config, mesh)
    metrics = []
    for i in range(n_steps):
        state, m = train_step(state, parallel.to_global(random_batch(config, seed=i), mesh))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def one_step(config, mesh_axes, n_devices, start_step=3, state=None):
    """(state before, state after, metrics, the step's gradients before clipping) of one step
    on a mesh, from `state` (host arrays) or a fresh state at `start_step` (past warm-up)."""
    mesh = parallel.make_mesh(mesh_axes, jax.devices()[:n_devices])
    if state is None:
        state = jax.device_get(init_state(config, jax.random.key(0))).replace(
            step=np.int32(start_step)
        )
    before = state
    state = jax.device_put(state, state_sharding(config, mesh))
    batch = parallel.to_global(random_batch(config), mesh)
    loss, grads = make_gradient_step(config, mesh)(state, batch)
    after, metrics = make_train_step(config, mesh)(state, batch)
    metrics = jax.device_get(metrics)
    np.testing.assert_allclose(loss, metrics["loss"], rtol=1e-6)
    return before, jax.device_get(after), metrics, jax.device_get(grads)


def assert_same_step(got, want, grads_rtol=1e-5, updates_rtol=1e-4, noise=1e-3):
    """Two `one_step` results from one state: gradients per tensor, their norm before clipping
    (the step's own metric), updates relative to their size, the teacher and center."""
    before, after, metrics, grads = got
    _, want_after, want_metrics, want_grads = want
    assert_gradients_close(grads, want_grads, grads_rtol)
    np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=grads_rtol)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=grads_rtol)
    for field in ("student", "teacher"):
        assert_updates_close(
            getattr(before, field),
            getattr(after, field),
            getattr(want_after, field),
            want_grads,
            updates_rtol,
            noise,
        )
    # The method state's update, norm-relative (entries near 0 carry the dtype's error).
    center = lambda s: s.method_state["center"]  # noqa: E731
    moved = {"center": center(after) - center(before)}
    (gap,) = relative_gaps(moved, {"center": center(want_after) - center(before)}).values()
    assert gap <= grads_rtol, gap


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64),
            np.asarray(y, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=jax.tree_util.keystr(path),
        )


@pytest.mark.slow
def test_sharded_step_equals_single_device(tiny_config):
    config = tiny_config(drop_path_rate=0.2)  # stochastic depth must not depend on the layout
    one, m_one = run_steps(config, (("data", 1),), 1, n_steps=2)
    for axes in [(("data", 8), ("fsdp", 1)), (("data", 4), ("fsdp", 2))]:
        many, m_many = run_steps(config, axes, 8, n_steps=2)
        assert_trees_close(many, one)
        for a, b in zip(m_many, m_one, strict=True):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # Past warm-up, by gradients and updates relative to their size.
    want = one_step(config, (("data", 1),), 1)
    for axes in [(("data", 8), ("fsdp", 1)), (("data", 4), ("fsdp", 2))]:
        assert_same_step(one_step(config, axes, 8), want)


@pytest.mark.slow
def test_fsdp_splits_large_params_and_their_moments(tiny_config):
    config = tiny_config()
    mesh = parallel.make_mesh((("data", 4), ("fsdp", 2)))
    state = init_state(config, jax.random.key(0), mesh)
    kernel = state.student["head"]["mlp_0"]["kernel"]  # 64 x 256: split on its input axis
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    bias = state.student["head"]["mlp_0"]["bias"]
    assert bias.sharding.spec == jax.sharding.PartitionSpec()
    # Its moments, by path (last_layer/kernel_v has its shape but keeps whole columns).
    specs = [
        leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if jax.tree_util.keystr(path, simple=True, separator="/").endswith("head/mlp_0/kernel")
    ]
    assert specs == [kernel.sharding.spec] * 2  # Adam's mu and nu


def numpy_dino_loss(student, teacher, center, teacher_temp, student_temp=0.1):
    """main_dino.py: DINOLoss.forward in NumPy: crop-major logits [n, B, K] and [2, B, K]."""

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    targets = np.exp(log_softmax((teacher - center) / teacher_temp))
    log_probs = log_softmax(student / student_temp)
    terms = [
        np.mean(np.sum(-targets[t] * log_probs[s], -1))
        for t in range(2)
        for s in range(len(student))
        if s != t
    ]
    return np.mean(terms)


def test_step_follows_the_formulas(tiny_config):
    """From a teacher unlike the student and a non-zero center, past warm-up: the teacher EMA
    with the momentum of the reference's cosine (utils.py: cosine_scheduler), the center EMA
    and the loss equal their formulas, computed here in NumPy."""
    # A low base momentum, so that the EMA's student share (1 - m) is large enough to see.
    config = tiny_config(drop_path_rate=0.0, momentum_teacher=0.9)
    fresh = jax.device_get(init_state(config, jax.random.key(0)))
    rng = np.random.default_rng(1)
    state0 = fresh.replace(
        step=np.int32(5),
        teacher=jax.tree.map(
            lambda t: t + 0.1 * rng.normal(size=t.shape).astype(np.float32), fresh.teacher
        ),
        method_state={"center": 0.1 * rng.normal(size=(256,)).astype(np.float32)},
    )
    _, state1, metrics, _ = one_step(config, (("data", 8),), 8, state=state0)
    # Iteration 5 of epochs * steps_per_epoch = 12: m = 1 - (1 - m0)(cos(pi i / 12) + 1) / 2.
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 5 / 12) + 1) / 2
    np.testing.assert_allclose(metrics["momentum"], m, rtol=1e-6)
    expected_teacher = jax.tree.map(
        lambda t, s: m * np.float64(t) + (1 - m) * np.float64(s), state0.teacher, state1.student
    )
    assert_trees_close(state1.teacher, expected_teacher)
    assert not np.allclose(
        state1.student["head"]["mlp_0"]["kernel"], fresh.student["head"]["mlp_0"]["kernel"]
    )
    batch = random_batch(config)
    teacher_logits = np.asarray(
        build_dino(config, teacher=True).apply(
            {"params": state0.teacher}, jnp.asarray(batch["global"]), train=True
        ),
        np.float64,
    )
    expected_center = 0.9 * state0.method_state["center"] + 0.1 * teacher_logits.mean(axis=(0, 1))
    np.testing.assert_allclose(state1.method_state["center"], expected_center, rtol=1e-5, atol=1e-7)
    assert int(state1.step) == 6
    student_logits = build_dino(config, teacher=True).apply(  # no drop path: the same network
        {"params": state0.student},
        jnp.asarray(batch["global"]),
        jnp.asarray(batch["local"]),
        train=True,
    )
    expected_loss = numpy_dino_loss(
        np.asarray(student_logits, np.float64), teacher_logits, state0.method_state["center"], 0.04
    )
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)


@pytest.mark.slow
def test_last_layer_frozen_during_first_epochs(tiny_config):
    config = tiny_config(freeze_last_layer_epochs=1, warmup_epochs=0)
    state0 = jax.device_get(init_state(config, jax.random.key(0)))
    frozen, _ = run_steps(config, (("data", 8),), 8, start_step=1)  # epoch 0
    kernel = lambda s: s.student["head"]["last_layer"]["kernel_v"]  # noqa: E731
    np.testing.assert_array_equal(kernel(frozen), kernel(state0))
    assert not np.array_equal(
        frozen.student["head"]["mlp_0"]["kernel"], state0.student["head"]["mlp_0"]["kernel"]
    )
    thawed, _ = run_steps(
        config, (("data", 8),), 8, start_step=config.train.OFFICIAL_EPOCH_LENGTH
    )  # epoch 1
    assert not np.array_equal(kernel(thawed), kernel(state0))


@pytest.mark.slow
def test_norm_last_layer_false_trains_weight_g(tiny_config):
    config = tiny_config(norm_last_layer=False, warmup_epochs=0)
    state, _ = run_steps(config, (("data", 8),), 8, start_step=4)
    g = state.student["head"]["last_layer"]["weight_g"]
    assert g.shape == (1, 256) and not np.allclose(g, 1.0)


@pytest.mark.slow
def test_no_local_crops(tiny_config):
    config = tiny_config(local_crops_number=0)
    _, metrics = run_steps(config, (("data", 8),), 8)
    assert np.isfinite(metrics[0]["loss"])


@pytest.mark.slow
def test_bfloat16_close_to_float32(tiny_config):
    f32 = one_step(tiny_config(), (("data", 8),), 8)
    bf16 = one_step(tiny_config(dtype="bfloat16"), (("data", 8),), 8)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16[1].student))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16[3]))
    # bfloat16 keeps 8 bits of mantissa: the loss and each gradient agree to about 1e-2 of
    # their size; a gradient of the wrong size is off by far more. The updates are Adam's
    # normalised steps of those gradients.
    assert_same_step(bf16, f32, grads_rtol=5e-2, updates_rtol=0.1, noise=0.1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"dtype": "bfloat16", "remat": "dots_saveable"},
        {"remat": "block", "drop_path_rate": 0.1},
        {"student_chunks": 2, "drop_path_rate": 0.1, "batch_size": 16},
    ],
)
def test_step_compiles_once(tiny_config, overrides):
    config = tiny_config(**overrides)
    mesh = parallel.make_mesh((("data", 8),))
    state = init_state(config, jax.random.key(0), mesh)
    train_step = make_train_step(config, mesh)
    # Across an epoch boundary (steps_per_epoch=3): the schedules change, the program must not.
    for i in range(5):
        state, _ = train_step(state, parallel.to_global(random_batch(config, i), mesh))
    assert train_step._cache_size() == 1


@pytest.mark.slow
def test_student_chunks_equal_the_whole_batch(tiny_config):
    """Two strided chunks on 8 devices, two steps: the same loss, parameters, moments and center
    as the whole batch on one device (no drop path, the only per-chunk randomness)."""
    config = tiny_config(batch_size=16, drop_path_rate=0.0)
    whole, m_whole = run_steps(config, (("data", 1),), 1, 2, start_step=3)
    config.compute.student_chunks = 2
    chunked, m_chunked = run_steps(config, (("data", 8),), 8, 2, start_step=3)
    for a, b in zip(m_chunked, m_whole, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    # The attention's key bias has an exactly zero gradient (softmax ignores it): Adam turns the
    # rounding noise there into updates of ~1e-6 whose sign depends on the summation order.
    assert_trees_close(chunked, whole, atol=5e-6)
    chunked_step = one_step(config, (("data", 8),), 8)
    config.compute.student_chunks = 1
    assert_same_step(chunked_step, one_step(config, (("data", 1),), 1))


@pytest.mark.slow
def test_remat_step_equals_plain_step(tiny_config):
    plain = one_step(tiny_config(), (("data", 8),), 8)
    for remat in ("block", "dots_saveable"):
        assert_same_step(one_step(tiny_config(remat=remat), (("data", 8),), 8), plain)


@pytest.mark.slow
def test_scanned_blocks_step_equals_the_loop(tiny_config):
    """A DINOv2 ViT of depth 3 (LayerScale, registers): the step with compute.scan_blocks
    (remat or not) gives the unscanned step's gradients and updates; with drop path the scanned
    step runs with DINOv2's batch subsets."""
    options = {"arch": "dinov2_vit_small", "depth": 3, "layerscale": 0.1, "drop_path_rate": 0.0}
    options["num_register_tokens"] = 2
    plain = one_step(tiny_config(**options), (("data", 8),), 8)
    for remat in ("none", "block"):
        config = tiny_config(**options, remat=remat, scan_blocks=True)
        assert_same_step(one_step(config, (("data", 8),), 8), plain)
    config = tiny_config(**options, scan_blocks=True, drop_path_uniform=True)
    config.student.drop_path_rate = 0.4
    assert np.isfinite(one_step(config, (("data", 8),), 8)[2]["loss"])
    config.student.drop_path_uniform = False
    with pytest.raises(ValueError, match="one drop-path rate"):
        make_train_step(config, parallel.make_mesh((("data", 8),)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.batch_size": 12}, "train.batch_size=12 is not divisible by 8 devices"),
        (
            {"student.patch_size": 16, "student.img_size": 32, "crops.local_crops_size": 24},
            "crops.local_crops_size=24 is not divisible by student.patch_size=16",
        ),
        (
            {"student.patch_size": 16, "student.img_size": 48, "crops.global_crops_size": 40},
            "crops.global_crops_size=40",
        ),
        ({"student.patch_size": 16, "student.img_size": 40}, "student.img_size=40"),
        ({"student.arch": "vit_huge"}, "Unknown student.arch='vit_huge'"),
        ({"student.depth": 0}, "student.depth=0 must be positive, or None"),
        ({"optim.optimizer": "adam"}, "Unknown optim.optimizer='adam'"),
        ({"compute.dtype": "float16"}, "Unknown compute.dtype='float16'"),
        ({"train.OFFICIAL_EPOCH_LENGTH": 0}, "train.OFFICIAL_EPOCH_LENGTH=0"),
        (
            {"compute.student_chunks": 2},
            "compute.student_chunks=2 does not divide the images per device (1 =",
        ),
        (
            {"compute.student_chunks": 2, "dino.use_bn_in_head": True},
            "BatchNorm the statistics of each chunk",
        ),
        ({"compute.student_chunks": 0}, "compute.student_chunks=0 must be >= 1"),
    ],
)
def test_bad_config_fails_before_compilation(tiny_config, overrides, message):
    config = tiny_config()
    for key, value in overrides.items():
        node, _, leaf = key.rpartition(".")
        (config[node] if node else config)[leaf] = value
    mesh = parallel.make_mesh((("data", 8),))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_train_step(config, mesh)


def test_bad_mesh():
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        parallel.make_mesh((("data", 3), ("fsdp", 2)))
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        parallel.make_mesh((("data", -1), ("fsdp", 3)))


@pytest.mark.slow
def test_batchnorm_statistics_per_network(tiny_config):
    """Head BN: student and teacher each update their own running statistics in the step."""
    config = tiny_config(use_bn_in_head=True)
    state0 = jax.device_get(init_state(config, jax.random.key(0)))
    state1, metrics = run_steps(config, (("data", 4), ("fsdp", 2)), 8)
    s0, s1 = state0.batch_stats["student"]["head"], state1.batch_stats["student"]["head"]
    t1 = state1.batch_stats["teacher"]["head"]
    assert not np.allclose(s1["bn_0"]["mean"], s0["bn_0"]["mean"])
    assert not np.allclose(t1["bn_0"]["mean"], s0["bn_0"]["mean"])
    # The student saw 2 + 2 crops, the teacher only the 2 global ones: different statistics.
    assert not np.allclose(s1["bn_0"]["mean"], t1["bn_0"]["mean"])
    assert np.isfinite(metrics[0]["loss"])


@pytest.mark.slow
def test_resnet50_step_with_lars(tiny_config):
    config = tiny_config(arch="resnet50", optimizer="lars", warmup_epochs=0)
    state, metrics = run_steps(config, (("data", 8),), 8)
    stats = state.batch_stats
    assert set(stats) == {"student", "teacher"}
    assert not np.allclose(
        stats["student"]["backbone"]["bn1"]["mean"], stats["teacher"]["backbone"]["bn1"]["mean"]
    )
    assert np.isfinite(metrics[0]["loss"])


@pytest.mark.slow
def test_augment_on_device_step_compiles_once(tiny_config):
    """uint8 crops in, augmented in the step: finite losses, one program for every draw."""
    config = tiny_config()
    config.data.augment_on_device = True
    mesh = parallel.make_mesh((("data", 8),))
    state = init_state(config, jax.random.key(0), mesh)
    train_step = make_train_step(config, mesh)
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = {
            k: rng.integers(0, 256, v.shape, dtype=np.uint8)
            for k, v in random_batch(config).items()
        }
        state, metrics = train_step(state, parallel.to_global(batch, mesh))
        assert np.isfinite(float(metrics["loss"]))
    assert train_step._cache_size() == 1
