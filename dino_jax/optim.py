"""The student's optax chain: per-tensor clipping, frozen last layer, AdamW / SGD / LARS.

The chain is rebuilt inside the jitted step with that step's learning rate, weight decay and freeze
flag (traced scalars from `schedules.hyperparams_at`); its state's structure does not depend on
those values, so `init` can use any.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dino_jax.schedules import Hyperparams

LAST_LAYER = "last_layer"


def decay_mask(params) -> dict:
    """True where weight decay applies: every tensor but biases and 1-D params (LayerNorm, BN).

    Biases are 1-D in Flax, so one rule covers both of the reference's exclusions; cls_token,
    pos_embed and a trainable weight_g (shape (1, K)) are decayed, as in the reference.
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


def last_layer_labels(params) -> dict:
    """'last_layer' for the head's weight-normalised layer, 'rest' for everything else."""

    def label(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        return LAST_LAYER if LAST_LAYER in names else "rest"

    return jax.tree_util.tree_map_with_path(label, params)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """The reference's `clip_gradients`: each tensor separately, g * max / (||g|| + 1e-6) if < 1."""

    def clip(g):
        coef = max_norm / (jnp.linalg.norm(g.ravel()) + 1e-6)
        return jnp.where(coef < 1.0, g * coef, g)

    return optax.stateless(lambda updates, params: jax.tree.map(clip, updates))


def base_optimizer(name: str, lr, weight_decay) -> optax.GradientTransformation:
    """One optimizer step with decoupled (AdamW) or coupled (SGD, LARS) decay on `decay_mask`."""
    if name == "adamw":
        return optax.adamw(
            lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask
        )
    if name == "sgd":
        # torch SGD: d = g + wd * p; buf = 0.9 buf + d; p -= lr * buf.
        return optax.chain(
            optax.add_decayed_weights(weight_decay, decay_mask),
            optax.trace(decay=0.9),
            optax.scale_by_learning_rate(lr),
        )
    if name == "lars":
        # The reference's LARS (from Barlow Twins): decay and trust ratio on non-1-D tensors only,
        # momentum on the un-scaled update, then the learning rate (unlike optax.lars' order).
        return optax.chain(
            optax.add_decayed_weights(weight_decay, decay_mask),
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=0.001), decay_mask),
            optax.trace(decay=0.9),
            optax.scale_by_learning_rate(lr),
        )
    raise ValueError(f"Unknown optimizer={name!r}; choose one of adamw, sgd, lars.")


def make_optimizer(
    config: ml_collections.ConfigDict, hp: Hyperparams
) -> optax.GradientTransformation:
    """Clip each gradient tensor, then step; the last layer is skipped entirely while frozen.

    Frozen means no update, no decay and no moment or count update, as when the reference sets
    its gradients to None: the last layer has its own optimizer state, advanced only when unfrozen.
    """
    frozen = jnp.asarray(hp.last_layer_frozen)
    last_layer = base_optimizer(config.optimizer, hp.lr, hp.weight_decay)
    rest = base_optimizer(config.optimizer, hp.lr, hp.weight_decay)
    parts = optax.partition(
        {
            LAST_LAYER: optax.transforms.conditionally_mask(last_layer, lambda _: ~frozen),
            "rest": rest,
        },
        last_layer_labels,
    )
    if not config.clip_grad:
        return parts
    return optax.chain(clip_per_tensor(config.clip_grad), parts)


def init_hyperparams() -> Hyperparams:
    """Placeholder values for `make_optimizer(...).init`; the state does not depend on them."""
    zero = jnp.zeros([], jnp.float32)
    return Hyperparams(zero, zero, zero, zero, jnp.zeros([], bool))
