"""The collapse watch: a warning, during training, when the teacher's targets collapse in one of
the two ways self-distillation can (Caron et al. 2021, Sec. 5.3): to uniform targets (the
teacher's outputs no longer tell images apart: sharpening too weak) or to a few prototypes for
every image (centering too weak, or a student that moves too fast, as at small batches).

It reads the metrics the step logs: `teacher_entropy`, the mean entropy of one target, and
`teacher_kl_uniform`, the KL divergence of the mean target to uniform, both against log K.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import ml_collections

UNIFORM = 0.98  # entropy above this fraction of log K: near uniform
CONCENTRATED = 0.5  # KL to uniform above this fraction of log K: a few prototypes for all
PERSISTENT = 3  # consecutive logged steps before a warning


class CollapseWatch:
    """Feed it each logged step's metrics; it returns a one-line warning, once per kind of
    collapse, after the warm-ups (lr, teacher temperature, frozen layers) and once the condition
    has held for PERSISTENT logged steps."""

    def __init__(self, config: ml_collections.ConfigDict, steps_per_epoch: int):
        o, t = config.optim, config.teacher
        warm = max(
            1,
            o.warmup_epochs,
            t.warmup_teacher_temp_epochs,
            o.freeze_last_layer_epochs,
            o.freeze_backbone_epochs,
        )
        self.after_step = warm * steps_per_epoch
        self.log_k = math.log(config.dino.head_n_prototypes)
        self.streak = {"uniform": 0, "concentrated": 0}
        self.warned: set[str] = set()

    def check(self, step: int, metrics: Mapping[str, float]) -> str | None:
        if "teacher_entropy" not in metrics or step <= self.after_step:
            return None
        entropy, kl = metrics["teacher_entropy"], metrics["teacher_kl_uniform"]
        found = {
            "uniform": entropy >= UNIFORM * self.log_k,
            "concentrated": kl >= CONCENTRATED * self.log_k,
        }
        for kind, now in found.items():
            self.streak[kind] = self.streak[kind] + 1 if now else 0
            if self.streak[kind] >= PERSISTENT and kind not in self.warned:
                self.warned.add(kind)
                return self._message(kind, step, entropy, kl)
        return None

    def _message(self, kind: str, step: int, entropy: float, kl: float) -> str:
        log_k = f"log K = {self.log_k:.2f}"
        if kind == "uniform":
            return (
                f"Collapse at step {step}: the teacher's targets are near uniform (entropy "
                f"{entropy:.2f} of {log_k}), its outputs no longer tell images apart. Lower "
                "teacher.teacher_temp (sharper targets), lower teacher.momentum_teacher or raise "
                "optim.lr so that the teacher follows the student; from trained weights, keep "
                "the backbone frozen longer (optim.freeze_backbone_epochs)."
            )
        return (
            f"Collapse at step {step}: the teacher's targets fall on a few prototypes for every "
            f"image (KL to uniform {kl:.2f} of {log_k}). Lower optim.lr, raise "
            "teacher.momentum_teacher (0.9995 for batches of 256 or fewer), set "
            "optim.adamw_beta2=0.99, or lengthen teacher.warmup_teacher_temp_epochs."
        )
