"""The optimizer chain against torch's optimizers and the reference's loop (clip, freeze), and
parameter groups from rules (DINO's, layer-wise decay, the config's) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from gradients import relative_gaps
from torch_reference import reference_optimizer

from dino_jax.core.config import base_config
from dino_jax.core.optim import clip_per_tensor, make_optimizer, param_groups
from dino_jax.core.schedules import Hyperparams
from dino_jax.methods import Dino

FREEZE = 3  # epochs of frozen last layer in the loop tests (an epoch per step there)


def dino_rules(config):
    return Dino(config).param_rules()


def groups(params, config):
    return flat(param_groups(params, dino_rules(config)))


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


def test_dino_groups_decay_and_freeze_like_the_reference():
    params = make_params(np.random.default_rng(0))
    config = base_config()
    config.optim.freeze_last_layer_epochs = FREEZE
    found = groups(params, config)
    assert {k for k, g in found.items() if g.wd_mult == 1.0} == {
        "['backbone']['dense']['kernel']",
        "['cls_token']",
        "['head']['last_layer']['kernel_v']",
        "['head']['last_layer']['weight_g']",
    }
    assert {k for k, g in found.items() if g.frozen_epochs == FREEZE} == {
        "['head']['last_layer']['kernel_v']",
        "['head']['last_layer']['weight_g']",
    }


@pytest.mark.parametrize("arch", ["vit_small", "resnet50"])
def test_dino_rules_decay_exactly_the_tensors_of_more_than_one_dimension(arch):
    """utils.py: get_params_groups decays all but biases and 1-D tensors: the rule by name
    picks the same tensors of the real networks."""
    from dino_jax.models import build_dino

    config = base_config()
    config.student.arch, config.dino.use_bn_in_head, config.dino.norm_last_layer = arch, True, False
    size = 32 if arch == "resnet50" else 224
    shapes = jax.eval_shape(
        build_dino(config).init, jax.random.key(0), jnp.zeros((1, 2, size, size, 3))
    )["params"]
    found = groups(shapes, config)
    want = {k: v.ndim > 1 for k, v in flat(shapes).items()}
    assert {k: g.wd_mult == 1.0 for k, g in found.items()} == want


def torch_params(params):
    return {k: torch.tensor(np.array(v), requires_grad=True) for k, v in flat(params).items()}


def run_reference(name, params, grads_seq, hps, clip):
    """The reference's loop: clip each tensor, drop last-layer grads while frozen, step."""
    tp = torch_params(params)
    # utils.py: get_params_groups: no decay for biases and 1-D tensors.
    decay = {k: v.ndim > 1 for k, v in flat(params).items()}
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
            if hp.epoch < FREEZE and "last_layer" in k:
                tp[k].grad = None
        opt.step()
    return {k: p.detach().numpy() for k, p in tp.items()}


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_chain_matches_torch_over_steps_with_freeze(name):
    rng = np.random.default_rng(1)
    params = make_params(rng)
    config = base_config()
    optim = config.optim
    optim.optimizer, optim.clip_grad, optim.freeze_last_layer_epochs = name, 2.0, FREEZE
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
            epoch=jnp.int32(i),
        )
        for i in range(n_steps)
    ]
    rules = dino_rules(config)
    state = make_optimizer(config, rules, hps[0], params).init(params)
    ours = params

    @jax.jit
    def update(grads, state, ours, hp):
        updates, state = make_optimizer(config, rules, hp, ours).update(grads, state, ours)
        return optax.apply_updates(ours, updates), state

    for grads, hp in zip(grads_seq, hps, strict=True):
        ours, state = update(grads, state, ours, hp)
        if hp.epoch < FREEZE:
            np.testing.assert_array_equal(
                ours["head"]["last_layer"]["kernel_v"], params["head"]["last_layer"]["kernel_v"]
            )
    expected = run_reference(name, params, grads_seq, hps, clip=2.0)
    for k, v in flat(ours).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_frozen_last_layer_keeps_its_adam_state():
    params = make_params(np.random.default_rng(2))
    config = base_config()
    config.optim.freeze_last_layer_epochs = FREEZE
    frozen = Hyperparams(*(jnp.float32(0.1),) * 3, epoch=jnp.int32(FREEZE - 1))
    tx = make_optimizer(config, dino_rules(config), frozen, params)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    counts = {
        k: int(v) for k, v in flat(state).items() if k.endswith(".count") or k.endswith("count")
    }
    # The last layer's Adam count has not started; the other groups' have.
    assert {k: v for k, v in counts.items() if f"frozen{FREEZE}" in k} and all(
        v == (f"frozen{FREEZE}" not in k) for k, v in counts.items()
    ), counts


def numpy_adamw(p, g, m, v, count, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW's step, written out: decoupled decay, bias-corrected moments."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**count), v / (1 - b2**count)
    return p - lr * wd * p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def test_layerwise_decay_and_total_norm_clip_from_the_config_match_numpy():
    """layerwise_decay, patch_embed_lr_mult, a param_groups rule and clip_mode="total_norm", set
    as config keys, give each tensor the AdamW step NumPy computes with dinov2's multipliers
    (get_vit_lr_decay_rate) and torch's clip_grad_norm_ per sub-network, over three steps."""
    from dino_jax.core.step import param_rules

    rng = np.random.default_rng(3)
    depth, rate = 2, 0.5
    shapes = {
        "backbone": {
            "patch_embed": {"kernel": (4, 3), "bias": (3,)},
            "pos_embed": (1, 2, 3),
            "blocks_0": {"fc": {"kernel": (3, 3), "bias": (3,)}},
            "blocks_1": {"fc": {"kernel": (3, 3)}},
            "norm": {"scale": (3,)},
        },
        "head": {"mlp_0": {"kernel": (3, 5)}, "last_layer": {"kernel_v": (5, 7)}},
    }
    params = jax.tree.map(
        lambda s: rng.normal(size=s).astype(np.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    config = base_config()
    config.student.arch, config.student.depth = "vit_small", depth
    config.optim.freeze_last_layer_epochs = 0
    config.optim.layerwise_decay, config.optim.patch_embed_lr_mult = rate, 0.2
    config.optim.param_groups = (("^head/mlp_0/", 3.0, 0.5, 0),)
    config.optim.clip_grad, config.optim.clip_mode = 1.5, "total_norm"
    # dinov2: lr * rate^(depth + 1 - layer_id); layer 0 the embeddings, i + 1 block i, the rest
    # depth + 1; then the patch embedding's own multiplier; no decay on biases and norms.
    lr_mult = {
        "['backbone']['patch_embed']['kernel']": rate**3 * 0.2,
        "['backbone']['patch_embed']['bias']": rate**3 * 0.2,
        "['backbone']['pos_embed']": rate**3,
        "['backbone']['blocks_0']['fc']['kernel']": rate**2,
        "['backbone']['blocks_0']['fc']['bias']": rate**2,
        "['backbone']['blocks_1']['fc']['kernel']": rate,
        "['backbone']['norm']['scale']": 1.0,
        "['head']['mlp_0']['kernel']": 3.0,
        "['head']['last_layer']['kernel_v']": 1.0,
    }
    wd_mult = {k: 0.0 if k.endswith("['bias']") or "scale" in k else 1.0 for k in lr_mult}
    wd_mult["['head']['mlp_0']['kernel']"] = 0.5
    rules = param_rules(config, Dino(config))
    tx = lambda hp: make_optimizer(config, rules, hp, params)  # noqa: E731
    state = tx(Hyperparams(*(jnp.float32(0),) * 3, jnp.int32(0))).init(params)
    ours = params
    want = {k: np.float64(v) for k, v in flat(params).items()}
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in want.items()}
    for count in (1, 2, 3):
        grads = jax.tree.map(lambda p: rng.normal(scale=2.0, size=p.shape), params)
        hp = Hyperparams(jnp.float32(0.1 * count), jnp.float32(0.05), jnp.float32(0), jnp.int32(0))
        updates, state = tx(hp).update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
        g = {k: np.float64(v) for k, v in flat(grads).items()}
        for part in ("backbone", "head"):
            keys = [k for k in g if k.startswith(f"['{part}']")]
            norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in keys))
            for k in keys:
                g[k] = g[k] * min(1.0, 1.5 / (norm + 1e-6))
        for k in want:
            lr, wd = 0.1 * count * lr_mult[k], 0.05 * wd_mult[k]
            want[k], *moments[k] = numpy_adamw(want[k], g[k], *moments[k], count, lr, wd)
    # Relative to the updates: optax corrects Adam's bias in float32 (1 - 0.999^t to ~1e-4).
    start = flat(params)
    moved = {k: v - start[k] for k, v in flat(ours).items()}
    gaps = relative_gaps(moved, {k: want[k] - start[k] for k in moved})
    assert max(gaps.values()) < 1e-4, gaps
