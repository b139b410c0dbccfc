"""The student's optax chain: gradient clipping, parameter groups by rules, AdamW / SGD / LARS.

A parameter group is what the references build by hand (main_dino.py: utils.get_params_groups,
dinov2: get_params_groups_with_decay): parameters that share an lr multiplier, a weight-decay
multiplier and a freeze. Here they follow from a list of `ParamRule`s matched against each
parameter's path ("backbone/blocks_3/attn/qkv/kernel"): every rule that matches applies, the
multipliers multiply and the freeze lasts until the latest rule's epoch. So layer-wise lr decay,
a patch-embedding lr multiplier or weight-decay exclusions are configuration, not code.

The chain is rebuilt inside the jitted step with that step's learning rate, weight decay and epoch
(traced scalars from `schedules.hyperparams_at`); its state's structure depends only on the
parameters' paths and the rules, so `init` can use any values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dino_jax.core.schedules import Hyperparams


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """Parameters whose path matches `pattern` (re.search on "a/b/kernel") get their lr times
    `lr_mult` and their weight decay times `wd_mult`; while the epoch is below `frozen_epochs`
    they are not updated at all (no step, no decay, no moment or count update: as when the
    reference sets their gradients to None); while it is below `zero_lr_epochs` their lr is 0,
    so they stay put while the optimizer's moments accumulate (DINOv2's last_layer_lr)."""

    pattern: str
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    frozen_epochs: int = 0
    zero_lr_epochs: int = 0


@dataclasses.dataclass(frozen=True)
class Group:
    """The settings a parameter gets from every rule that matches it."""

    lr_mult: float = 1.0
    wd_mult: float = 1.0
    frozen_epochs: int = 0
    zero_lr_epochs: int = 0

    @property
    def label(self) -> str:
        label = f"lr{self.lr_mult:.6g}_wd{self.wd_mult:.6g}_frozen{self.frozen_epochs}"
        return label + (f"_zerolr{self.zero_lr_epochs}" if self.zero_lr_epochs else "")


def path_name(path) -> str:
    """A pytree path as the "/"-joined names the rules match."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def group_of(name: str, rules: Sequence[ParamRule]) -> Group:
    """The group of the parameter at path `name` under `rules`."""
    lr_mult, wd_mult, frozen, zero_lr = 1.0, 1.0, 0, 0
    for rule in rules:
        if re.search(rule.pattern, name):
            lr_mult *= rule.lr_mult
            wd_mult *= rule.wd_mult
            frozen = max(frozen, rule.frozen_epochs)
            zero_lr = max(zero_lr, rule.zero_lr_epochs)
    return Group(lr_mult, wd_mult, frozen, zero_lr)


def param_groups(params, rules: Sequence[ParamRule]):
    """The `Group` of every parameter, as a tree shaped like `params` (arrays or shapes)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(path_name(p), rules), params)


def layerwise_decay_rules(rate: float, depth: int, patch_embed_lr_mult: float = 1.0) -> list:
    """dinov2/optim: get_vit_lr_decay_rate as rules: block i of `depth` gets rate^(depth - i),
    the patch embedding, position embedding and tokens rate^(depth + 1), everything after the
    blocks (final norm, heads) 1; the patch embedding's lr is further times `patch_embed_lr_mult`
    (dinov2's patch_embed_lr_mult)."""
    rules = []
    if rate != 1.0:
        embeddings = r"^backbone/(patch_embed|pos_embed|cls_token|mask_token|register_tokens)"
        rules.append(ParamRule(embeddings, lr_mult=rate ** (depth + 1)))
        rules += [
            ParamRule(rf"^backbone/blocks_{i}/", lr_mult=rate ** (depth - i)) for i in range(depth)
        ]
    if patch_embed_lr_mult != 1.0:
        rules.append(ParamRule(r"^backbone/patch_embed/", lr_mult=patch_embed_lr_mult))
    return rules


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """The reference's `clip_gradients`: each tensor separately, g * max / (||g|| + 1e-6) if < 1."""

    def clip(g):
        coef = max_norm / (jnp.linalg.norm(g.ravel()) + 1e-6)
        return jnp.where(coef < 1.0, g * coef, g)

    return optax.stateless(lambda updates, params: jax.tree.map(clip, updates))


def clip_total_norm_per_subnetwork(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_ on each sub-network (each top-level key of the params:
    backbone, head) apart, as dinov2's SSLMetaArch clips each of the student's modules:
    g * min(1, max / (||g||_total + 1e-6))."""

    def clip(tree):
        coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(tree) + 1e-6))
        return jax.tree.map(lambda g: g * coef, tree)

    return optax.stateless(lambda updates, params: {k: clip(v) for k, v in updates.items()})


def ndim_above_1(params):
    """True for every tensor of more than one dimension: where LARS scales by its trust ratio."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def base_optimizer(
    name: str, lr, weight_decay, betas: tuple[float, float] = (0.9, 0.999)
) -> optax.GradientTransformation:
    """One optimizer step with decoupled (AdamW) or coupled (SGD, LARS) weight decay."""
    if name == "adamw":
        return optax.adamw(lr, b1=betas[0], b2=betas[1], eps=1e-8, weight_decay=weight_decay)
    if name == "sgd":
        # torch SGD: d = g + wd * p; buf = 0.9 buf + d; p -= lr * buf.
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.trace(decay=0.9),
            optax.scale_by_learning_rate(lr),
        )
    if name == "lars":
        # The reference's LARS (from Barlow Twins): trust ratio on non-1-D tensors only, momentum
        # on the un-scaled update, then the learning rate (unlike optax.lars' order).
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=0.001), ndim_above_1),
            optax.trace(decay=0.9),
            optax.scale_by_learning_rate(lr),
        )
    raise ValueError(f"Unknown optimizer={name!r}; choose one of adamw, sgd, lars.")


def make_optimizer(
    config: ml_collections.ConfigDict, rules: Sequence[ParamRule], hp: Hyperparams, params
) -> optax.GradientTransformation:
    """Clip (config.optim.clip_mode), then step each parameter group of `params` (arrays or shapes:
    only their paths are read) with its lr and weight decay; a group is skipped entirely while
    frozen, so it has its own optimizer state, advanced only when unfrozen."""
    groups = param_groups(params, rules)
    transforms = {}
    for group in set(jax.tree.leaves(groups, is_leaf=lambda x: isinstance(x, Group))):
        lr = hp.lr * group.lr_mult
        if group.zero_lr_epochs:
            lr = jnp.where(hp.epoch < group.zero_lr_epochs, 0.0, lr)
        betas = (config.optim.adamw_beta1, config.optim.adamw_beta2)
        tx = base_optimizer(config.optim.optimizer, lr, hp.weight_decay * group.wd_mult, betas)
        if group.frozen_epochs:
            thawed = hp.epoch >= group.frozen_epochs
            tx = optax.transforms.conditionally_mask(tx, lambda _, thawed=thawed: thawed)
        transforms[group.label] = tx
    labels = jax.tree.map(lambda g: g.label, groups, is_leaf=lambda x: isinstance(x, Group))
    parts = optax.partition(transforms, labels)
    if not config.optim.clip_grad:
        return parts
    clip = {
        "per_tensor": clip_per_tensor,
        "total_norm": clip_total_norm_per_subnetwork,
    }[config.optim.clip_mode](config.optim.clip_grad)
    return optax.chain(clip, parts)


def init_hyperparams() -> Hyperparams:
    """Placeholder values for `make_optimizer(...).init`; the state does not depend on them."""
    zero = jnp.zeros([], jnp.float32)
    return Hyperparams(zero, zero, zero, jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))
