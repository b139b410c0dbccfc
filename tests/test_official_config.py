"""DINOv2's official train YAMLs as dino_jax configs: the recipes' numbers as the official files
state them, the lr scaled to the global batch, notes for what is not honoured, one-line errors
for what cannot be taken, and the recipe file the trainer loads."""

import math

import pytest

from dino_jax import convert
from dino_jax.core.config import load_config
from dino_jax.core.schedules import scaled_lr
from dino_jax.interop.official_config import config_from_yaml

# facebookresearch/dinov2: dinov2/configs/train/vitl16_short.yaml, vitl14.yaml, vitg14.yaml.
VITL16_SHORT = """\
# this corresponds to the default config
train:
  dataset_path: ImageNet:split=TRAIN
  batch_size_per_gpu: 64
student:
  block_chunks: 4
"""
VITL14 = """\
dino:
  head_n_prototypes: 131072
  head_bottleneck_dim: 384
ibot:
  separate_head: true
  head_n_prototypes: 131072
train:
  batch_size_per_gpu: 32
  dataset_path: ImageNet22k
  centering: sinkhorn_knopp
student:
  arch: vit_large
  patch_size: 14
  drop_path_rate: 0.4
  ffn_layer: swiglufused
  block_chunks: 4
teacher:
  momentum_teacher: 0.994
optim:
  epochs: 500
  weight_decay_end: 0.2
  base_lr: 2.0e-04  # learning rate for a batch size of 1024
  warmup_epochs: 80
  layerwise_decay: 1.0
crops:
  local_crops_size: 98
"""
VITG14 = VITL14.replace("batch_size_per_gpu: 32", "batch_size_per_gpu: 12").replace(
    "arch: vit_large", "arch: vit_giant2"
)


def test_vitl14_has_the_official_numbers():
    config, _ = config_from_yaml(VITL14, world_size=64)
    s, t, o, d, i = config.student, config.teacher, config.optim, config.dino, config.ibot
    assert config.method == "dinov2"
    assert (s.arch, s.patch_size, s.img_size) == ("dinov2_vit_large", 14, 224)
    assert (s.drop_path_rate, s.drop_path_uniform, s.layerscale) == (0.4, True, 1e-5)
    assert s.ffn_layer == "swiglufused"
    assert (d.head_n_prototypes, d.head_bottleneck_dim, d.head_hidden_dim) == (131072, 384, 2048)
    assert (i.separate_head, i.head_n_prototypes, i.head_bottleneck_dim) == (True, 131072, 256)
    assert (i.loss_weight, i.mask_ratio_min_max, i.mask_sample_probability) == (
        1.0,
        (0.1, 0.5),
        0.5,
    )
    assert (d.loss_weight, d.koleo_loss_weight) == (1.0, 0.1)
    assert config.train.centering == "sinkhorn_knopp"
    assert (t.momentum_teacher, t.warmup_teacher_temp, t.teacher_temp) == (0.994, 0.04, 0.07)
    assert t.warmup_teacher_temp_epochs == 30
    assert (o.epochs, o.warmup_epochs, o.lr, o.min_lr) == (500, 80, 2e-4, 1e-6)
    assert (o.weight_decay, o.weight_decay_end) == (0.04, 0.2)
    assert (o.layerwise_decay, o.patch_embed_lr_mult, o.freeze_last_layer_epochs) == (1.0, 0.2, 1)
    assert (o.clip_grad, o.clip_mode, o.adamw_beta1, o.adamw_beta2) == (
        3.0,
        "total_norm",
        0.9,
        0.999,
    )
    assert o.scaling_rule == "sqrt_wrt_1024"
    crops = config.crops
    assert (crops.global_crops_size, crops.local_crops_size, crops.local_crops_number) == (
        224,
        98,
        8,
    )
    assert (crops.global_crops_scale, crops.local_crops_scale) == ((0.32, 1.0), (0.05, 0.32))
    assert (config.train.rank_batch_size, config.train.batch_size) == (32, 32 * 64)
    assert config.train.OFFICIAL_EPOCH_LENGTH == 1250
    # dinov2/utils/config.py: apply_scaling_rules_to_cfg.
    assert scaled_lr(config) == pytest.approx(2e-4 * math.sqrt(32 * 64 / 1024), rel=1e-12)


def test_vitg14_is_giant2_at_12_per_gpu():
    config, _ = config_from_yaml(VITG14, world_size=256)
    assert config.student.arch == "dinov2_vit_giant2"
    assert (config.train.rank_batch_size, config.train.batch_size) == (12, 3072)
    assert scaled_lr(config) == pytest.approx(2e-4 * math.sqrt(3072 / 1024), rel=1e-12)


def test_vitl16_short_is_the_default_recipe_on_imagenet():
    config, notes = config_from_yaml(VITL16_SHORT, world_size=32)
    s = config.student
    assert (s.arch, s.patch_size, s.drop_path_rate, s.ffn_layer) == (
        "dinov2_vit_large",
        16,
        0.3,
        "mlp",
    )
    assert (config.dino.head_n_prototypes, config.ibot.separate_head) == (65536, False)
    assert config.train.centering == "centering"
    assert (config.teacher.momentum_teacher, config.optim.layerwise_decay) == (0.992, 0.9)
    assert (config.optim.epochs, config.optim.warmup_epochs, config.optim.lr) == (100, 10, 0.004)
    assert (config.data.source, config.data.split) == ("tfds:imagenet2012", "train")
    assert config.train.batch_size == 64 * 32
    assert scaled_lr(config) == pytest.approx(0.004 * math.sqrt(2048 / 1024), rel=1e-12)
    # train.py: do_train's PeriodicCheckpointer saves every 3 epochs, keeping 3.
    assert (config.checkpoint.every_steps, config.checkpoint.keep) == (3750, 3)
    assert not any("dataset_path" in n for n in notes)  # ImageNet maps to tfds


def test_world_size_is_read_off_a_saved_config_yaml():
    """An official run's config.yaml records the scaled lr (apply_scaling_rules_to_cfg)."""
    lr = 0.004 * math.sqrt(64 * 32 / 1024)  # 64 per GPU on 32 GPUs
    config, notes = config_from_yaml(VITL16_SHORT + f"optim:\n  lr: {lr!r}\n")
    assert config.train.batch_size == 2048
    assert any(n.startswith("world_size=32") for n in notes)
    with pytest.raises(ValueError, match="world_size is not given"):
        config_from_yaml(VITL16_SHORT)


def test_yaml_is_read_as_omegaconf_reads_it():
    """1e-4 without a dot is a float (PyYAML alone reads a string); nested keys merge onto the
    defaults, leaving the section's other keys as they are."""
    config, _ = config_from_yaml("optim:\n  base_lr: 1e-4\nibot:\n  separate_head: true\n", 8)
    assert config.optim.lr == 1e-4
    assert (config.ibot.separate_head, config.ibot.head_n_prototypes) == (True, 65536)
    with pytest.raises(ValueError, match="duplicate key"):
        config_from_yaml("optim:\n  epochs: 1\noptim:\n  epochs: 2\n", 8)


def test_notes_name_what_is_not_honoured():
    text = VITL14.replace("block_chunks: 4", "block_chunks: 4\n  foo: 1") + "nb_knn: [10, 20]\n"
    text = text.replace("0.994", "0.994\n  final_momentum_teacher: 0.999")
    _, notes = config_from_yaml(text, world_size=8)
    named = {n.partition("=")[0].partition(":")[0] for n in notes}
    assert {"nb_knn", "student.foo", "teacher.final_momentum_teacher"} <= named
    assert {"train.num_workers", "compute_precision.grad_scaler"} <= named
    assert any(n.startswith("train.dataset_path='ImageNet22k'") for n in notes)
    assert all("\n" not in n for n in notes)


def test_compute_precision_sets_the_matmul_dtype():
    config, notes = config_from_yaml(VITL16_SHORT, world_size=1)
    assert config.compute.dtype == "bfloat16"
    fp32 = "compute_precision:\n  grad_scaler: false\n"
    for role in ("student", "teacher"):
        fp32 += f"  {role}:\n"
        for part in ("backbone", "dino_head", "ibot_head"):
            fp32 += f"    {part}:\n      mixed_precision:\n        param_dtype: fp32\n"
    config, notes = config_from_yaml(VITL16_SHORT + fp32, world_size=1)
    assert config.compute.dtype == "float32"
    assert not any("mixed_precision" in n or "grad_scaler" in n for n in notes)


def test_weights_become_the_init_checkpoint():
    pretrained = VITL14.replace("block_chunks: 4", "pretrained_weights: b.pth")
    config, notes = config_from_yaml(pretrained + "MODEL:\n  WEIGHTS: /ckpt/model.pth\n", 8)
    assert config.train.init_checkpoint == "/ckpt/model.pth"  # loaded last by the official
    assert any(n.startswith("MODEL.WEIGHTS") for n in notes)
    config, _ = config_from_yaml(pretrained, 8)
    assert config.train.init_checkpoint == "b.pth"


@pytest.mark.parametrize(
    ("yaml_text", "world_size", "named"),
    [
        (VITL14.replace("vit_large", "vit_huge"), 8, "student.arch='vit_huge'"),
        (VITL14.replace("epochs: 500", "epochs: 500.5"), 8, "optim.epochs=500.5"),
        (VITL14.replace("separate_head: true", "separate_head: 1"), 8, "ibot.separate_head=1"),
        (VITL14.replace("epochs: 500", "epochs: null"), 8, "optim.epochs=null"),
        ("train:\n  OFFICIAL_EPOCH_LENGTH: null\n", 8, "train.OFFICIAL_EPOCH_LENGTH=null"),
        (VITL14.replace("sinkhorn_knopp", "sinkhorn"), 8, "train.centering='sinkhorn'"),
        (VITL14.replace("local_crops_size: 98", "local_crops_size: 96"), 8, "local_crops_size=96"),
        (VITL14.replace("block_chunks: 4", "qkv_bias: false"), 8, "student.qkv_bias"),
        (VITL14, 0, "world_size=0"),
        ("train:\n  dataset_path: ImageNet:split=TRAINVAL\n", 8, "split=TRAINVAL"),
    ],
)
def test_bad_values_fail_in_one_line(yaml_text, world_size, named):
    with pytest.raises(ValueError) as error:
        config_from_yaml(yaml_text, world_size)
    message = str(error.value)
    assert named in message and "\n" not in message, message


def test_the_recipe_file_builds_the_same_config(tmp_path, capsys):
    official = tmp_path / "vitl14.yaml"
    official.write_text(VITL14)
    recipe = tmp_path / "configs" / "vitl14.py"
    convert.main(["config", str(official), "--world-size", "64", "--out", str(recipe)])
    want, notes = config_from_yaml(official, world_size=64)
    assert load_config(str(recipe)).to_dict() == want.to_dict()
    err = capsys.readouterr().err
    assert all(f"note: {n}" in err for n in notes)
    convert.main(["config", str(official), "--world-size", "64"])  # the recipe on stdout
    printed = tmp_path / "printed.py"
    printed.write_text(capsys.readouterr().out)
    assert load_config(str(printed)).to_dict() == want.to_dict()
