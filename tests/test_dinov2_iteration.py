"""One DINOv2 iteration of dino_jax against the PyTorch one of tests/torch_dinov2_train.py, written
from the official code: in each official mode (softmax centering; Sinkhorn-Knopp; Sinkhorn-Knopp
with a separate iBOT head), the loss terms, the gradients before clipping, the clip norms, the
student, teacher and centers after the step. The batch holds two ranks of four images, so the
per-rank parts (masks, KoLeo, the iBOT center) and the all-reduced ones both count."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config
from gradients import assert_gradients_close, assert_updates_close
from torch_dinov2_train import dinov2_iteration

from dino_jax.core import parallel
from dino_jax.core.schedules import hyperparams_at
from dino_jax.core.step import init_state, make_gradient_step, make_train_step, state_sharding
from dino_jax.data.masking import BlockMasking, batch_masks
from dino_jax.interop.state_dict import backbone_key, flat_tree, head_key, to_torch_layout

RANK, RANKS, N_LOCAL, PATCH, GLOBAL, LOCAL = 4, 2, 2, 8, 32, 16
EPOCH = 3  # iterations per epoch


def dinov2_config(centering="centering", separate=False, step_in_freeze=False):
    c = make_tiny_config(
        method="dinov2",
        arch="dinov2_vit_small",
        patch_size=PATCH,
        layerscale=0.1,
        drop_path_rate=0.0,
        centering=centering,
        rank_batch_size=RANK,
        batch_size=RANK * RANKS,
        clip_mode="total_norm",
        clip_grad=0.5,  # small enough that the backbone's gradients are clipped
        scaling_rule="sqrt_wrt_1024",
        lr=0.05,
        layerwise_decay=0.9,
        patch_embed_lr_mult=0.2,
        adamw_beta2=0.99,
        OFFICIAL_EPOCH_LENGTH=EPOCH,
        warmup_epochs=0,
        freeze_last_layer_epochs=1 if step_in_freeze else 0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=2,
    )
    c.ibot.separate_head = separate
    c.ibot.head_n_prototypes, c.ibot.head_hidden_dim, c.ibot.head_bottleneck_dim = 128, 96, 48
    return c


def torch_cfg(config, hp, teacher_temp):
    c, s = config, config.student
    head = {
        "n_prototypes": c.dino.head_n_prototypes,
        "hidden_dim": c.dino.head_hidden_dim,
        "bottleneck_dim": c.dino.head_bottleneck_dim,
        "nlayers": c.dino.head_nlayers,
    }
    ibot_head = {
        "n_prototypes": c.ibot.head_n_prototypes,
        "hidden_dim": c.ibot.head_hidden_dim,
        "bottleneck_dim": c.ibot.head_bottleneck_dim,
        "nlayers": c.ibot.head_nlayers,
    }
    frozen = int(hp.epoch) < c.optim.freeze_last_layer_epochs
    return {
        "vit": {
            "patch_size": s.patch_size,
            "embed_dim": s.embed_dim,
            "depth": s.depth,
            "num_heads": s.num_heads,
            "img_size": s.img_size,
            "layerscale": s.layerscale,
            "ffn_layer": s.ffn_layer,
            "num_register_tokens": s.num_register_tokens,
        },
        "head": head,
        "ibot_head": ibot_head,
        "separate_head": c.ibot.separate_head,
        "centering": c.train.centering,
        "n_local": c.crops.local_crops_number,
        "dino_loss_weight": c.dino.loss_weight,
        "koleo_loss_weight": c.dino.koleo_loss_weight,
        "ibot_loss_weight": c.ibot.loss_weight,
        "student_temp": c.dino.student_temp,
        "teacher_temp": teacher_temp,
        "center_momentum": c.dino.center_momentum,
        "lr": float(hp.lr),
        "last_layer_lr": 0.0 if frozen else float(hp.lr),
        "wd": float(hp.weight_decay),
        "momentum": float(hp.momentum),
        "layerwise_decay": c.optim.layerwise_decay,
        "patch_embed_lr_mult": c.optim.patch_embed_lr_mult,
        "clip_grad": c.optim.clip_grad,
        "adamw_betas": (c.optim.adamw_beta1, c.optim.adamw_beta2),
    }


def torch_names(params, config) -> dict[str, np.ndarray]:
    """Our DINOv2 networks' parameters under SSLMetaArch's student/teacher state-dict keys."""
    out = {}
    for path, value in flat_tree(params).items():
        part, *names = path
        if part == "backbone":
            key = backbone_key(tuple(names))
        else:
            section = config.ibot if part == "ibot_head" else config.dino
            key = head_key(tuple(names), use_bn=False, nlayers=section.head_nlayers)
        out[f"{part}.{key}"] = np.array(to_torch_layout(names[-1], np.asarray(value)))
    return out


def make_batch(seed):
    rng = np.random.default_rng(seed)
    b = RANK * RANKS
    grid = GLOBAL // PATCH
    generator = BlockMasking(grid, grid)
    masks = [
        batch_masks(random.Random(seed * 10 + r), generator, 2 * RANK)
        .reshape(2, RANK, -1)
        .swapaxes(0, 1)
        for r in range(RANKS)
    ]
    return {
        "global": rng.normal(size=(b, 2, GLOBAL, GLOBAL, 3)).astype(np.float32),
        "local": rng.normal(size=(b, N_LOCAL, LOCAL, LOCAL, 3)).astype(np.float32),
        "masks": np.concatenate(masks),
    }


def torch_ranks(batch):
    """The batch as each official rank collates it: crop-major NCHW."""
    ranks = []
    for r in range(RANKS):
        part = {k: v[r * RANK : (r + 1) * RANK] for k, v in batch.items()}

        def crop_major(x):
            x = np.swapaxes(x, 0, 1)
            return x.reshape(-1, *x.shape[2:])

        ranks.append(
            {
                "global_crops": crop_major(part["global"]).transpose(0, 3, 1, 2),
                "local_crops": crop_major(part["local"]).transpose(0, 3, 1, 2),
                "masks": crop_major(part["masks"]),
            }
        )
    return ranks


def perturbed_state(config, mesh, seed):
    """A fresh state whose every parameter, teacher and center is moved off its init (a zero
    mask token or unit LayerScale would hide their gradients), the teacher apart from the
    student."""
    state = init_state(config, jax.random.key(seed), mesh)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))

    def moved(x, scale=0.05):
        return x + scale * jax.random.normal(next(keys), x.shape, x.dtype)

    student = jax.tree.map(moved, state.student)
    teacher = jax.tree.map(moved, student)
    centers = jax.tree.map(lambda x: moved(x, 0.3), state.method_state)
    step = jnp.int32(EPOCH + 1)  # in the teacher temperature's warm-up, after a frozen epoch
    state = state.replace(student=student, teacher=teacher, method_state=centers, step=step)
    return jax.device_put(state, state_sharding(config, mesh))


MODES = [
    pytest.param("centering", False, id="centering"),
    pytest.param("sinkhorn_knopp", False, id="sinkhorn_knopp"),
    pytest.param("sinkhorn_knopp", True, id="sinkhorn_knopp-separate_head"),
]


@pytest.mark.parametrize(("centering", "separate"), MODES)
def test_one_iteration_equals_the_official(centering, separate):
    config = dinov2_config(centering, separate)
    mesh = parallel.make_mesh(config.compute.mesh)
    state = perturbed_state(config, mesh, seed=3)
    batch = make_batch(seed=4)
    hp = hyperparams_at(config, state.step)
    # dinov2/train/train.py: teacher_temp, a per-iteration linspace over the warm-up epochs.
    warmup = np.linspace(0.04, 0.07, 2 * EPOCH)
    teacher_temp = float(warmup[int(state.step)])

    want = dinov2_iteration(
        torch_names(jax.device_get(state.student), config),
        torch_names(jax.device_get(state.teacher), config),
        {
            "dino": np.asarray(state.method_state["dino_center"])[None],
            "ibot": np.asarray(state.method_state["ibot_center"])[None, None],
        },
        torch_ranks(batch),
        torch_cfg(config, hp, teacher_temp),
    )

    global_batch = parallel.to_global(batch, mesh)
    loss, grads = make_gradient_step(config, mesh)(state, global_batch)
    before = jax.device_get(state.student)
    new_state, metrics = make_train_step(config, mesh)(state, global_batch)
    metrics = jax.device_get(metrics)

    assert float(metrics["teacher_temp"]) == pytest.approx(teacher_temp, rel=1e-6)
    for name, value in want["losses"].items():
        ours = metrics["loss"] if name == "total" else metrics[name]
        assert float(ours) == pytest.approx(value, rel=1e-5), name
    assert float(loss) == pytest.approx(want["losses"]["total"], rel=1e-5)

    grads = jax.device_get(grads)
    want_grads = want["grads"]
    assert_gradients_close(torch_names(grads, config), want_grads, rtol=1e-4)
    for part, norm in want["clip_norms"].items():
        ours = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads[part])))
        assert float(ours) == pytest.approx(norm, rel=1e-5), part

    new = jax.device_get(new_state)
    assert_updates_close(
        torch_names(before, config),
        torch_names(new.student, config),
        want["student"],
        want_grads,
        rtol=1e-3,
    )
    teacher = torch_names(new.teacher, config)
    for key, value in want["teacher"].items():
        np.testing.assert_allclose(teacher[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(
        new.method_state["dino_center"], want["centers"]["dino"][0], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        new.method_state["ibot_center"], want["centers"]["ibot"][0, 0], rtol=1e-5, atol=1e-7
    )


def test_the_last_layers_stay_while_their_adam_moments_accumulate():
    """During freeze_last_layer_epochs the heads' last layers have lr 0 (dinov2/train/train.py:
    last_layer_lr) but, unlike DINO's freeze, their gradients still enter Adam's moments: the
    official's step agrees, and the moments are nonzero."""
    config = dinov2_config("centering", separate=True, step_in_freeze=True)
    config.optim.freeze_last_layer_epochs = 2  # the state's step (EPOCH + 1) is in epoch 1
    mesh = parallel.make_mesh(config.compute.mesh)
    state = perturbed_state(config, mesh, seed=5)
    batch = parallel.to_global(make_batch(seed=6), mesh)
    before = jax.device_get(state.student)  # the step donates the state
    new_state, _ = make_train_step(config, mesh)(state, batch)
    after = jax.device_get(new_state.student)
    for head in ("dino_head", "ibot_head"):
        for name, value in before[head]["last_layer"].items():
            np.testing.assert_array_equal(after[head]["last_layer"][name], value)
        assert not np.array_equal(after[head]["mlp_0"]["kernel"], before[head]["mlp_0"]["kernel"])
    moments = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(new_state.opt_state)
        if "last_layer" in jax.tree_util.keystr(path) and "mu" in jax.tree_util.keystr(path)
    ]
    assert moments and all(np.any(np.asarray(m) != 0) for m in moments)


def test_the_sharded_step_equals_the_one_device_step():
    """On 8 devices (each rank of 4 images split over 4 of them) the gradients, the update, the
    centers and the metrics are the one-device step's."""
    config = dinov2_config("centering")
    batch = make_batch(seed=7)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(config.compute.mesh, devices)
        state = perturbed_state(config, mesh, seed=8)
        global_batch = parallel.to_global(batch, mesh)
        _, grads = make_gradient_step(config, mesh)(state, global_batch)
        before = jax.device_get(state.student)
        new_state, metrics = make_train_step(config, mesh)(state, global_batch)
        results.append(jax.device_get((grads, before, new_state, metrics)))
    (grads, before, one, one_metrics), (eight_grads, _, eight, eight_metrics) = results
    for name in ("loss", "koleo_loss", "ibot_loss", "dino_global_crops_loss"):
        assert float(eight_metrics[name]) == pytest.approx(float(one_metrics[name]), rel=1e-5)
    assert_gradients_close(eight_grads, grads, rtol=1e-5)
    assert_updates_close(before, eight.student, one.student, grads, rtol=1e-4)
    for key in one.method_state:
        np.testing.assert_allclose(
            eight.method_state[key], one.method_state[key], rtol=1e-5, atol=1e-7
        )
