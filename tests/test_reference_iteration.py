"""The reference iteration's `--use_fp16 true` path (`tests/torch_reference.py`), which times the
official implementation's mixed-precision run beside ours on a GPU: checked here on CPU against
its float32 path."""

import copy
import types

import numpy as np
import pytest
import torch
from torch_reference import (
    TorchDINOHead,
    TorchDINOLoss,
    TorchMultiCrop,
    TorchViT,
    get_params_groups,
    train_iteration,
)

ARGS = types.SimpleNamespace(
    steps_per_epoch=10, lr=5e-4, batch_size=4, min_lr=1e-6, epochs=4, warmup_epochs=1,
    weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996, clip_grad=3.0,
    freeze_last_layer=1,
)  # fmt: skip


def _iteration(fp16: bool):
    """One iteration of a tiny network from a fixed start -> (loss, student gradients)."""
    torch.manual_seed(0)
    head = TorchDINOHead(64, 256, False, True, 3, 128, 32)
    student = TorchMultiCrop(TorchViT(16, 64, 2, 4, 64), head)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = TorchDINOLoss(256, 4, 0.04, 0.04, 0, ARGS.epochs)
    optimizer = torch.optim.AdamW(get_params_groups(student))
    crops = [torch.randn(4, 3, s, s) for s in (64, 64, 32, 32)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if fp16 else None
    loss = train_iteration(student, teacher, dino_loss, optimizer, crops, 3, 1, ARGS, scaler)
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    return loss, grads, scaler


def test_fp16_iteration_unscales_before_clipping_like_main_dino():
    loss32, grads32, _ = _iteration(fp16=False)
    loss16, grads16, scaler = _iteration(fp16=True)
    assert np.isfinite(loss16)
    assert loss16 != loss32  # autocast ran the matmuls in float16
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    # The gradients the optimizer stepped with are the unscaled, clipped ones: float32's to
    # float16 rounding. Clipping before unscaling would clip scaled gradients to norm 3, then
    # divide them by 2**10.
    assert scaler.get_scale() == 2.0**10  # finite gradients: no step skipped, scale kept
    assert grads16.keys() == grads32.keys()
    for key, g32 in grads32.items():
        if key.startswith("head.last_layer"):  # frozen in epoch < freeze_last_layer: None or 0
            continue
        err = (grads16[key] - g32).norm() / g32.norm().clamp_min(1e-12)
        assert err < 3e-2, (key, float(err))
