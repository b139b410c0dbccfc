"""DINOv2's settings: bad ones fail before compiling, in one line that names the key and the fix;
the recipes carry the official numbers."""

import pytest
from conftest import make_tiny_config

from dino_jax.core import parallel
from dino_jax.core.config import load_config
from dino_jax.core.schedules import scaled_lr
from dino_jax.core.step import make_train_step


def dinov2_tiny(**overrides):
    return make_tiny_config(
        method="dinov2", arch="dinov2_vit_small", layerscale=1e-5, rank_batch_size=4, **overrides
    )


BAD = [
    # batch 8 over 8 devices: one image per rank, where the official's KoLeo gives NaN
    ({"train.rank_batch_size": None}, "KoLeo needs 2 or more images per rank"),
    ({"train.rank_batch_size": 1}, "KoLeo needs 2 or more images per rank"),
    ({"train.rank_batch_size": 3}, "train.rank_batch_size=3 must divide train.batch_size=8"),
    ({"ibot.mask_ratio_min_max": (0.0, 0.5)}, r"ibot.mask_ratio_min_max=\(0.0, 0.5\) must be"),
    ({"ibot.mask_ratio_min_max": (0.1, 1.5)}, r"must be within \(0, 1\)"),
    ({"ibot.mask_ratio_min_max": (0.5, 0.1)}, "with min <= max"),
    ({"ibot.mask_sample_probability": 0.0}, "ibot.mask_sample_probability=0.0 must be in"),
    ({"ibot.mask_ratio_min_max": (0.01, 0.02)}, "masks no patch of a 4x4 global crop"),
    ({"crops.global_crops_size": 36}, "crops.global_crops_size=36 is not divisible by"),
    (
        {"ibot.separate_head": True, "ibot.loss_weight": 0.0, "train.centering": "sinkhorn_knopp"},
        "ibot.separate_head=True asks for an iBOT head that ibot.loss_weight=0 never builds",
    ),
    ({"student.arch": "vit_small"}, "choose a dinov2_\\* student.arch"),
    ({"train.centering": "sinkhorn"}, "Unknown train.centering='sinkhorn'"),
    ({"optim.scaling_rule": "sqrt"}, "Unknown optim.scaling_rule='sqrt'"),
    ({"dino.loss_weight": 0.0, "ibot.loss_weight": 0.0}, "DINOv2 has nothing to learn"),
    ({"dino.loss_weight": 0.0}, "dino.koleo_loss_weight=0.1 is applied with the DINO loss"),
    ({"dino.use_bn_in_head": True}, "DINOv2's heads have no BatchNorm"),
    ({"compute.student_chunks": 2}, "compute.student_chunks=2 is DINO's"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_settings_fail_before_compiling_in_one_line(overrides, message):
    config = dinov2_tiny()
    if "student.arch" in overrides:
        config.student.layerscale = None
    for key, value in overrides.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    with pytest.raises(ValueError, match=message) as err:
        make_train_step(config, parallel.make_mesh((("data", 8),)))
    assert "\n" not in str(err.value)


def test_the_default_recipe_is_the_official_default():
    """dinov2/configs/ssl_default_config.yaml, as dinov2_vitl16_short ("the default config")."""
    c = load_config("configs/dinov2_vitl16_short.py")
    assert (c.method, c.student.arch, c.student.patch_size) == ("dinov2", "dinov2_vit_large", 16)
    assert (c.student.drop_path_rate, c.student.layerscale) == (0.3, 1e-5)
    assert c.student.drop_path_uniform and c.student.ffn_layer == "mlp"
    assert (c.teacher.momentum_teacher, c.teacher.warmup_teacher_temp) == (0.992, 0.04)
    assert (c.teacher.teacher_temp, c.teacher.warmup_teacher_temp_epochs) == (0.07, 30)
    assert (c.dino.head_n_prototypes, c.dino.head_bottleneck_dim) == (65536, 256)
    assert (c.dino.loss_weight, c.dino.koleo_loss_weight, c.ibot.loss_weight) == (1, 0.1, 1)
    assert not c.ibot.separate_head and tuple(c.ibot.mask_ratio_min_max) == (0.1, 0.5)
    assert c.ibot.mask_sample_probability == 0.5 and c.train.centering == "centering"
    o = c.optim
    assert (o.epochs, o.warmup_epochs, o.weight_decay, o.weight_decay_end) == (100, 10, 0.04, 0.4)
    assert (o.min_lr, o.clip_grad, o.clip_mode, o.freeze_last_layer_epochs) == (
        1e-6,
        3.0,
        "total_norm",
        1,
    )
    assert (o.layerwise_decay, o.patch_embed_lr_mult, o.adamw_beta2) == (0.9, 0.2, 0.999)
    assert tuple(c.crops.global_crops_scale) == (0.32, 1.0)
    assert tuple(c.crops.local_crops_scale) == (0.05, 0.32)
    assert (c.crops.local_crops_number, c.crops.local_crops_size) == (8, 96)
    assert (c.train.batch_size, c.train.rank_batch_size) == (2048, 64)  # 64 per GPU x 32
    assert c.train.OFFICIAL_EPOCH_LENGTH == 1250
    # dinov2/utils/config.py: apply_scaling_rules_to_cfg, sqrt_wrt_1024.
    assert scaled_lr(c) == pytest.approx(0.004 * 2**0.5)


@pytest.mark.parametrize("recipe", ["dinov2_vitl14.py", "dinov2_vitg14.py"])
def test_the_patch14_recipes_are_the_official_ones(recipe):
    """dinov2/configs/train/vitl14.yaml and vitg14.yaml."""
    c = load_config(f"configs/{recipe}")
    assert c.student.patch_size == 14 and c.student.drop_path_rate == 0.4
    assert c.student.ffn_layer == "swiglufused" and c.teacher.momentum_teacher == 0.994
    assert (c.dino.head_n_prototypes, c.dino.head_bottleneck_dim) == (131072, 384)
    assert c.ibot.separate_head and c.ibot.head_n_prototypes == 131072
    assert c.train.centering == "sinkhorn_knopp"
    o = c.optim
    assert (o.epochs, o.weight_decay_end, o.lr, o.warmup_epochs, o.layerwise_decay) == (
        500,
        0.2,
        2e-4,
        80,
        1.0,
    )
    assert c.crops.local_crops_size == 98
    per_gpu = {"dinov2_vitl14.py": 32, "dinov2_vitg14.py": 12}[recipe]
    assert c.train.rank_batch_size == per_gpu
