"""DINOv2 (Oquab et al. 2023; dinov2/train/ssl_meta_arch.py: SSLMetaArch.forward_backward): DINO's
cls-token self-distillation, iBOT's masked-patch objective and the KoLeo regulariser, with the
teacher's targets by softmax centering or by Sinkhorn-Knopp.

The official code runs per GPU ("rank") and all-reduces some sums. Here the arrays are global and
the batch is grouped into ranks of `train.rank_batch_size` images: the masks are assigned, KoLeo
is computed and the iBOT center averaged per rank, as the official does on each GPU; what it
all-reduces (Sinkhorn-Knopp, the DINO center, the losses' means) runs over the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dino_jax.core import dinov2_loss as losses
from dino_jax.core.config import steps_per_epoch
from dino_jax.core.optim import ParamRule
from dino_jax.core.schedules import Hyperparams, teacher_temp_schedule
from dino_jax.methods.base import Apply
from dino_jax.methods.dino import crops_spec
from dino_jax.models import Layers, build_dinov2

# dinov2/utils/param_groups.py: get_params_groups_with_decay: no weight decay for biases and for
# any name containing "norm" or "gamma" (LayerScale); the tokens and weight_g are decayed.
NOT_DECAYED = r"(^|/)bias$|norm|gamma"
LAST_LAYER = r"(^|/)last_layer/"


def mask_upper_bound(crops: int, n_patches: int, ratio=(0.1, 0.5), probability=0.5) -> int:
    """The most patches the official collate (dinov2/data/collate.py: collate_data_and_cast)
    masks in `crops` global crops of `n_patches` patches: int(crops * probability) crops, the
    i-th at most int(n_patches * high_i) with high_i the upper end of its ratio bracket. The
    size of the masked-patch buffer, fixed so that the step compiles once."""
    n_masked = int(crops * probability)
    highs = np.linspace(*ratio, n_masked + 1)[1:]
    return sum(int(n_patches * high) for high in highs)


class DinoV2:
    """The DINOv2 method of `config` (see `dino_jax.methods.base.Method`)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        self.config = c = config
        self.mesh = mesh
        self.do_dino = c.dino.loss_weight > 0
        self.do_koleo = self.do_dino and c.dino.koleo_loss_weight > 0
        self.do_ibot = c.ibot.loss_weight > 0
        self.separate_head = c.ibot.separate_head and self.do_ibot
        grid = c.crops.global_crops_size // c.student.patch_size
        self.n_patches = grid * grid

    @property
    def rank_batch(self) -> int:
        size = self.config.train.rank_batch_size
        if size is None:
            raise ValueError(
                "train.rank_batch_size is None: set it, or build the step with "
                "dino_jax.core.config.with_rank_batch_size(config, number of devices)."
            )
        return size

    @property
    def upper_bound(self) -> int:
        """Masked patches per rank at most: the official `upperbound`."""
        ibot = self.config.ibot
        return mask_upper_bound(
            2 * self.rank_batch,
            self.n_patches,
            tuple(ibot.mask_ratio_min_max),
            ibot.mask_sample_probability,
        )

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """DINO's crops (`dino.crops_spec`) and "masks": bool [B, 2, N], the patches of each
        global crop the student sees as the mask token."""
        b = self.config.train.batch_size
        masks = jax.ShapeDtypeStruct((b, 2, self.n_patches), np.bool_)
        return {**crops_spec(self.config), "masks": masks}

    def networks(self, layers: Layers) -> tuple[nn.Module, nn.Module]:
        return (
            build_dinov2(self.config, layers=layers),
            build_dinov2(self.config, teacher=True, layers=layers),
        )

    def init_inputs(self) -> tuple[jax.Array | None, ...]:
        size = self.config.crops.global_crops_size
        crops = jnp.zeros((1, 2, size, size, 3), jnp.float32)
        masks = jnp.zeros((1, 2, self.n_patches), bool)
        index = jnp.zeros((1, 1), jnp.int32) if self.do_ibot else None
        return (crops, None, masks, index)

    def init_state(self) -> dict[str, jax.Array]:
        """The DINO center [K] and the iBOT center [K'] (dinov2/loss: DINOLoss.center,
        iBOTPatchLoss.center), as they are in effect at the next iteration."""
        c = self.config
        ibot_k = c.ibot.head_n_prototypes if self.separate_head else c.dino.head_n_prototypes
        return {
            "dino_center": jnp.zeros([c.dino.head_n_prototypes], jnp.float32),
            "ibot_center": jnp.zeros([ibot_k], jnp.float32),
        }

    def teacher_temp(self, hp: Hyperparams) -> jax.Array:
        """dinov2/train/train.py: the teacher temperature rises linearly over the first
        warmup_teacher_temp_epochs, per iteration."""
        t = self.config.teacher
        warmup = t.warmup_teacher_temp_epochs * steps_per_epoch(self.config)
        schedule = teacher_temp_schedule(t.warmup_teacher_temp, t.teacher_temp, warmup)
        return jnp.asarray(schedule(hp.step), jnp.float32)

    def by_rank(self, x: jax.Array) -> jax.Array:
        """`x` [R, ...] split over the devices by rank (as the batch is), where R divides
        evenly: the buffers' nonzero and gather otherwise leave every device all ranks' logits."""
        if self.mesh is None or x.shape[0] % self.mesh.size:
            return x
        spec = PartitionSpec(self.mesh.axis_names)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def masked_patches(self, masks: jax.Array) -> dict[str, jax.Array]:
        """bool [B, 2, N] -> per rank, the buffer of its masked patches: "index" [R, U] into
        its crop-major patch tokens, "valid" [R, U] and "weight" [R, U], 1 / (masked patches of
        the patch's crop) (collate_data_and_cast's masks_weight), 0 on the padding."""
        ranks = masks.shape[0] // self.rank_batch
        per_rank = masks.reshape(ranks, self.rank_batch, 2, -1).swapaxes(1, 2)
        per_rank = per_rank.reshape(ranks, 2 * self.rank_batch, -1)  # [R, 2b, N] crop-major
        weights = losses.masks_weight(per_rank).reshape(ranks, -1)
        flat = per_rank.reshape(ranks, -1)
        bound = self.upper_bound
        index = jax.vmap(lambda m: jnp.nonzero(m, size=bound, fill_value=0)[0])(flat)
        valid = jnp.arange(bound) < jnp.sum(flat, axis=1, keepdims=True)
        weight = jnp.where(valid, jnp.take_along_axis(weights, index, axis=1), 0.0)
        out = {"index": index.astype(jnp.int32), "valid": valid, "weight": weight}
        return {k: self.by_rank(v) for k, v in out.items()}

    def teacher_outputs(self, teacher: Apply, batch: dict, state, hp: Hyperparams) -> dict:
        """The teacher's logits and targets: the global crops' cls tokens through the DINO head,
        [B, 2, K], and each rank's masked patches through the iBOT head, [R, U, K']."""
        temp = self.teacher_temp(hp)
        masked = self.masked_patches(batch["masks"]) if self.do_ibot else None
        out = teacher(batch["global"], None, None, None if masked is None else masked["index"])
        logits = out["global_logits"]
        outputs = {"dino_logits": logits, "temp": temp}
        sinkhorn = self.config.train.centering == "sinkhorn_knopp"
        if sinkhorn:  # all-reduced in the official: over the global batch
            flat = logits.reshape(-1, logits.shape[-1])
            outputs["dino_targets"] = losses.sinkhorn_knopp(flat, temp).reshape(logits.shape)
        else:
            outputs["dino_targets"] = losses.softmax_center(logits, state["dino_center"], temp)
        if masked is not None:
            patches = self.by_rank(out["patch_logits"])
            if sinkhorn:
                flat = patches.reshape(-1, patches.shape[-1])
                targets = losses.sinkhorn_knopp(flat, temp, valid=masked["valid"].reshape(-1))
                targets = targets.reshape(patches.shape)
            else:
                targets = losses.softmax_center(patches, state["ibot_center"], temp)
            outputs.update(ibot_logits=patches, ibot_targets=targets, masked=masked)
        return outputs

    def loss(self, student: Apply, batch: dict, teacher_out: dict, state, hp: Hyperparams, rng):
        """SSLMetaArch.forward_backward's loss_accumulator: the DINO loss over the local and the
        global crops, KoLeo and iBOT, with their weights; the metrics are its loss_dict."""
        c = self.config
        masked = teacher_out.get("masked")
        out = student(
            batch["global"],
            batch.get("local"),
            batch["masks"],
            None if masked is None else masked["index"],
            rng=rng,
        )
        n_local = c.crops.local_crops_number
        # forward_backward: 2 global terms; local ones max(2 n_local, 1) (1 without local crops).
        n_terms = 2 + max(2 * n_local, 1)
        temp_s = c.dino.student_temp
        total, metrics = jnp.zeros((), jnp.float32), {"teacher_temp": teacher_out["temp"]}
        targets = teacher_out["dino_targets"]  # [B, 2, K]
        if n_local and self.do_dino:
            local = out["local_logits"]
            local_loss = losses.cross_entropy_pairs(
                [local[:, j] for j in range(n_local)], [targets[:, 0], targets[:, 1]], temp_s
            )
            local_loss = local_loss / n_terms
            metrics["dino_local_crops_loss"] = local_loss
            total += c.dino.loss_weight * local_loss
        if self.do_dino:
            s = out["global_logits"]
            # Each global crop learns the other's targets; the official's mean over 2B rows,
            # times 2 (loss_scales), is the sum of the two pairs' batch means.
            global_loss = losses.cross_entropy_pairs(
                [s[:, 0]], [targets[:, 1]], temp_s
            ) + losses.cross_entropy_pairs([s[:, 1]], [targets[:, 0]], temp_s)
            global_loss = global_loss / n_terms
            metrics["dino_global_crops_loss"] = global_loss
            total += c.dino.loss_weight * global_loss
        if self.do_koleo:
            koleo = c.dino.koleo_loss_weight * self._koleo(out["global_cls"])
            metrics["koleo_loss"] = koleo / 2  # the official shows it halved
            total += koleo
        if masked is not None:
            patches = self.by_rank(out["patch_logits"])
            ibot = losses.ibot_masked_loss(
                patches.reshape(-1, patches.shape[-1]),
                teacher_out["ibot_targets"].reshape(-1, teacher_out["ibot_targets"].shape[-1]),
                masked["weight"].reshape(-1),
                n_crops=2 * batch["global"].shape[0],
                student_temp=temp_s,
            )
            metrics["ibot_loss"] = ibot / 2  # the official shows it halved
            metrics["ibot_masked_patches"] = jnp.sum(masked["valid"]).astype(jnp.float32)
            total += c.ibot.loss_weight * ibot
        metrics.update(self._target_stats(teacher_out, state))
        return total, metrics

    def _koleo(self, cls: jax.Array) -> jax.Array:
        """KoLeo on each rank's global cls tokens, per crop (never between the two crops of
        one image), summed over the crops and averaged over the ranks."""
        ranks = cls.shape[0] // self.rank_batch
        per_rank = cls.reshape(ranks, self.rank_batch, 2, cls.shape[-1])
        per_crop = [jax.vmap(losses.koleo_loss)(per_rank[:, :, k]) for k in range(2)]
        return jnp.mean(per_crop[0] + per_crop[1])

    def _target_stats(self, teacher_out: dict, state) -> dict[str, jax.Array]:
        """Collapse monitors of the teacher's DINO targets, and the centers' norms."""
        stats = losses.target_stats(teacher_out["dino_targets"])
        stats["dino_center_norm"] = jnp.linalg.norm(state["dino_center"])
        if self.do_ibot:
            stats["ibot_center_norm"] = jnp.linalg.norm(state["ibot_center"])
        return stats

    def update_state(self, state, teacher_out: dict, hp: Hyperparams) -> dict[str, jax.Array]:
        """The centers' EMA (momentum dino.center_momentum) with this batch's means: of every
        teacher cls logit (DINOLoss.update_center, all-reduced), and the mean over ranks of
        each rank's mean over its masked patches (iBOTPatchLoss.update_center). The official
        applies them lazily, at the next iteration's first use: the same values. Sinkhorn-Knopp
        leaves them."""
        if self.config.train.centering != "centering":
            return state
        m = self.config.dino.center_momentum
        logits = teacher_out["dino_logits"].astype(jnp.float32)
        dino_mean = jnp.mean(logits.reshape(-1, logits.shape[-1]), axis=0)
        new = {"dino_center": state["dino_center"] * m + dino_mean * (1.0 - m)}
        new["ibot_center"] = state["ibot_center"]
        if "masked" in teacher_out:
            valid = teacher_out["masked"]["valid"]
            patches = teacher_out["ibot_logits"].astype(jnp.float32)
            counts = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
            rank_means = jnp.sum(jnp.where(valid[..., None], patches, 0.0), axis=1)
            ibot_mean = jnp.mean(rank_means / counts[:, None], axis=0)
            new["ibot_center"] = state["ibot_center"] * m + ibot_mean * (1.0 - m)
        return new

    def param_rules(self) -> Sequence[ParamRule]:
        """No weight decay for biases, norms and LayerScale; the heads' last layers at lr 0 for
        the first freeze_last_layer_epochs, Adam's moments accumulating (train.py:
        last_layer_lr)."""
        return [
            ParamRule(NOT_DECAYED, wd_mult=0.0),
            ParamRule(LAST_LAYER, zero_lr_epochs=self.config.optim.freeze_last_layer_epochs),
        ]
