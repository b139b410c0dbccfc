"""The optimizer chain against torch's optimizers and the reference's loop (clip, freeze)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch_reference import reference_optimizer

from dino_jax.config import base_config
from dino_jax.optim import clip_per_tensor, decay_mask, last_layer_labels, make_optimizer
from dino_jax.schedules import Hyperparams


def make_params(rng):
    shapes = {
        "backbone": {"dense": {"kernel": (4, 3), "bias": (3,)}, "norm": {"scale": (3,)}},
        "cls_token": (1, 1, 3),
        "head": {"last_layer": {"kernel_v": (3, 5), "weight_g": (1, 5)}},
    }
    return jax.tree.map(
        lambda s: rng.normal(size=s).astype(np.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_clip_per_tensor_hand_computed():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4]), "c": jnp.array([6.0, 8.0])}
    clipped, _ = clip_per_tensor(5.0).update(grads, optax.EmptyState())
    # ||a|| = 5: clip / (5 + 1e-6) < 1, so the reference scales even at the threshold.
    np.testing.assert_allclose(clipped["a"], np.array([3.0, 4.0]) * 5 / (5 + 1e-6), rtol=1e-7)
    np.testing.assert_array_equal(clipped["b"], grads["b"])  # below: untouched
    np.testing.assert_allclose(clipped["c"], [3.0, 4.0], rtol=1e-6)  # each tensor on its own


def test_decay_mask_and_labels():
    params = make_params(np.random.default_rng(0))
    decayed = {k for k, v in flat(decay_mask(params)).items() if v}
    assert decayed == {
        "['backbone']['dense']['kernel']",
        "['cls_token']",
        "['head']['last_layer']['kernel_v']",
        "['head']['last_layer']['weight_g']",
    }
    labels = flat(last_layer_labels(params))
    assert {k for k, v in labels.items() if v == "last_layer"} == {
        "['head']['last_layer']['kernel_v']",
        "['head']['last_layer']['weight_g']",
    }


def torch_params(params):
    return {k: torch.tensor(np.array(v), requires_grad=True) for k, v in flat(params).items()}


def run_reference(name, params, grads_seq, hps, clip):
    """The reference's loop: clip each tensor, drop last-layer grads while frozen, step."""
    tp = torch_params(params)
    decay = flat(decay_mask(params))
    groups = [
        {"params": [p for k, p in tp.items() if decay[k]]},
        {"params": [p for k, p in tp.items() if not decay[k]], "weight_decay": 0.0},
    ]
    opt = reference_optimizer(name, groups)
    for grads, hp in zip(grads_seq, hps, strict=True):
        for i, group in enumerate(opt.param_groups):
            group["lr"] = float(hp.lr)
            if i == 0:
                group["weight_decay"] = float(hp.weight_decay)
        for k, g in flat(grads).items():
            tp[k].grad = torch.tensor(np.array(g))
            norm = tp[k].grad.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                tp[k].grad.mul_(coef)
            if hp.last_layer_frozen and "last_layer" in k:
                tp[k].grad = None
        opt.step()
    return {k: p.detach().numpy() for k, p in tp.items()}


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_chain_matches_torch_over_steps_with_freeze(name):
    rng = np.random.default_rng(1)
    params = make_params(rng)
    config = base_config()
    config.optimizer, config.clip_grad = name, 2.0
    n_steps = 6
    grads_seq = [
        jax.tree.map(lambda p: rng.normal(scale=1.5, size=p.shape).astype(np.float32), params)
        for _ in range(n_steps)
    ]
    hps = [
        Hyperparams(
            lr=jnp.float32(1e-2 * (i + 1)),
            weight_decay=jnp.float32(0.04 + 0.05 * i),
            momentum=jnp.float32(0.0),
            teacher_temp=jnp.float32(0.04),
            last_layer_frozen=jnp.bool_(i < 3),
        )
        for i in range(n_steps)
    ]
    state = make_optimizer(config, hps[0]).init(params)
    ours = params

    @jax.jit
    def update(grads, state, ours, hp):
        updates, state = make_optimizer(config, hp).update(grads, state, ours)
        return optax.apply_updates(ours, updates), state

    for grads, hp in zip(grads_seq, hps, strict=True):
        ours, state = update(grads, state, ours, hp)
        if hp.last_layer_frozen:
            np.testing.assert_array_equal(
                ours["head"]["last_layer"]["kernel_v"], params["head"]["last_layer"]["kernel_v"]
            )
    expected = run_reference(name, params, grads_seq, hps, clip=2.0)
    for k, v in flat(ours).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_frozen_last_layer_keeps_its_adam_state():
    params = make_params(np.random.default_rng(2))
    config = base_config()
    frozen = Hyperparams(*(jnp.float32(0.1),) * 4, last_layer_frozen=jnp.bool_(True))
    tx = make_optimizer(config, frozen)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    counts = {
        k: int(v) for k, v in flat(state).items() if k.endswith(".count") or k.endswith("count")
    }
    # The last layer's Adam count has not started; the rest's has.
    assert sorted(counts.values()) == [0, 1], counts
