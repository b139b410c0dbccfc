"""The config's sections: the flat layout's keys find their place, in saved configs and on the
command line, and None unsets an optional key."""

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dino_jax.benchmark import override_config
from dino_jax.checkpoint import Checkpointer
from dino_jax.core.config import MOVED_KEYS, OPTIONAL_KEYS, base_config, lookup, upgrade
from dino_jax.interop import hub

# The defaults of the flat layout (main_dino.py's argument names at the top level), as its
# config.json files hold them; `data` and `eval` only with the keys that moved or changed.
FLAT = {
    "method": "dino",
    "arch": "vit_small", "patch_size": 16, "img_size": 224, "drop_path_rate": 0.1,
    "embed_dim": 0, "depth": 0, "num_heads": 0,
    "out_dim": 65536, "norm_last_layer": True, "use_bn_in_head": False, "head_nlayers": 3,
    "head_hidden_dim": 2048, "head_bottleneck_dim": 256,
    "student_temp": 0.1, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0, "center_momentum": 0.9,
    "optimizer": "adamw", "batch_size": 512, "epochs": 100, "steps_per_epoch": 0, "lr": 0.0005,
    "min_lr": 1e-06, "warmup_epochs": 10, "weight_decay": 0.04, "weight_decay_end": 0.4,
    "clip_grad": 3.0, "clip_mode": "per_tensor", "param_groups": (), "layerwise_decay": 1.0,
    "patch_embed_lr_mult": 1.0, "freeze_last_layer": 1, "momentum_teacher": 0.996, "seed": 0,
    "global_crops_scale": (0.4, 1.0), "local_crops_number": 8, "local_crops_scale": (0.05, 0.4),
    "init_checkpoint": "", "compilation_cache_dir": "compilation_cache",
    "mesh": (("data", -1), ("fsdp", 1)), "dtype": "float32", "remat": "none", "platform": "auto",
    "cpu_tuning": True, "student_chunks": 1,
    "data": {"global_crop_size": 224, "local_crop_size": 96, "data_dir": "", "eval_source": ""},
    "eval": {"knn_every_steps": -1},
}  # fmt: skip
SECTIONS = ("student", "teacher", "dino", "optim", "crops", "train", "compute")
# Keys added after the flat layout (their defaults give the models and runs of before).
NEW_KEYS = (
    *(
        f"student.{k}"
        for k in (
            "layerscale",
            "ffn_layer",
            "num_register_tokens",
            "interpolate_offset",
            "interpolate_antialias",
            "drop_path_uniform",
        )
    ),
    "compute.scan_blocks",
    # DINOv2's (method="dinov2"), and the DINO method's defaults for them
    "dino.loss_weight",
    "dino.koleo_loss_weight",
    "train.centering",
    "train.rank_batch_size",
    *(f"optim.{k}" for k in ("scaling_rule", "adamw_beta1", "adamw_beta2")),
    "optim.freeze_backbone_epochs",
)


def test_a_flat_config_reads_as_the_sections():
    got = upgrade(FLAT)
    want = base_config().to_dict()
    assert got["method"] == "dino"
    for section in SECTIONS:
        assert got[section] == want[section], section  # new keys at their defaults
    # The sections the flat layout had keys of: the moved ones, the others at their defaults.
    assert (got["data"]["data_dir"], got["data"]["eval_source"]) == (None, None)
    assert got["data"]["source"] == want["data"]["source"]
    assert got["eval"]["knn_every_steps"] is None  # -1 was "never"
    assert sorted(got) == sorted(want)
    assert upgrade(got) == got  # the current layout passes through


def test_each_flat_key_has_one_place_and_each_optional_key_is_none_by_default():
    config = base_config()
    places = list(MOVED_KEYS.values())
    assert len(places) == len(set(places))
    for place in places:
        assert lookup(config, place, "<absent>") != "<absent>", place
    # Every leaf of the model and training sections is some flat key's place, or new since.
    leaves = {f"{s}.{leaf}" for s in SECTIONS for leaf in config[s]}
    assert leaves == {p for p in places if p.split(".")[0] in SECTIONS} | set(NEW_KEYS)
    assert [lookup(config, key) for key in OPTIONAL_KEYS] == [
        None, None, None, None, None, "compilation_cache", None, None, 0, None
    ]  # fmt: skip


def test_a_flat_key_on_the_command_line_names_its_new_place():
    with pytest.raises(ValueError) as err:
        override_config(base_config(), ["--config.batch_size=8", "--config.out_dim=1024"])
    message = str(err.value)
    assert "'batch_size' is now 'train.batch_size'; use '--config.train.batch_size=8'" in message
    assert "'out_dim' is now 'dino.head_n_prototypes'" in message
    assert "--config.dino.head_n_prototypes=1024" in message


def test_none_unsets_an_optional_key():
    config = override_config(
        base_config(),
        ["--config.student.depth=3", "--config.eval.knn_every_steps=None"],
    )
    assert (config.student.depth, config.eval.knn_every_steps) == (3, None)
    config = override_config(config, ["--config.student.depth=none"])
    assert config.student.depth is None
    with pytest.raises(ValueError, match=r"optim\.lr"):  # not optional: parsed as a float
        override_config(base_config(), ["--config.optim.lr=None"])


@pytest.mark.slow
def test_the_training_command_names_the_new_place_in_one_line(tmp_path):
    run = subprocess.run(
        [
            *(sys.executable, "-m", "dino_jax.train", "--config", "configs/demo.py:smoke"),
            *("--workdir", str(tmp_path), "--config.local_crops_number=4"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "error: '--config.local_crops_number=4': config key 'local_crops_number' is now "
        "'crops.local_crops_number'; use '--config.crops.local_crops_number=4'"
    )


def _flat(tree: dict) -> dict:
    """A config's JSON `tree` written in the flat layout, as a config.json of that layout holds
    it: each moved key back in its old place, None as the old "unset" value."""
    tree = json.loads(json.dumps(tree))
    for old, new in MOVED_KEYS.items():
        section, leaf = new.split(".")
        value = tree[section].pop(leaf)
        if value is None:
            value = OPTIONAL_KEYS[new]
        old_section, _, old_leaf = old.rpartition(".")
        (tree[old_section] if old_section else tree)[old_leaf] = value
    for key, unset in OPTIONAL_KEYS.items():  # those that did not move
        section, leaf = key.split(".")
        if tree.get(section, {}).get(leaf, unset) is None:
            tree[section][leaf] = unset
    for key in NEW_KEYS:  # keys the flat layout did not have
        section, leaf = key.split(".")
        tree[section].pop(leaf)
    return {k: v for k, v in tree.items() if v != {}}


def test_a_workdir_saved_in_the_flat_layout_resumes(tmp_path, tiny_config):
    flat = _flat(json.loads(tiny_config().to_json_best_effort()))
    assert "student" not in flat and flat["out_dim"] == 256
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(
            3, {"w": jnp.zeros(4), "step": jnp.int32(3)}, None, ml_collections.ConfigDict(flat)
        )
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.check_compatible(tiny_config())
        with pytest.raises(ValueError, match=r"dino\.head_n_prototypes: saved 256, requested 512"):
            ckpt.check_compatible(tiny_config(head_n_prototypes=512))
        with pytest.raises(ValueError, match=r"train\.batch_size=16 \(saved train\.batch_size=8\)"):
            ckpt.check_compatible(tiny_config(batch_size=16))


def test_an_export_of_the_flat_layout_loads(export_dir, tmp_path):
    copy = shutil.copytree(export_dir, tmp_path / "export")
    flat = _flat(json.loads((copy / "config.json").read_text()))
    assert "student" not in flat and flat["embed_dim"] == 64
    (copy / "config.json").write_text(json.dumps(flat))
    model, variables = hub.load_pretrained(export_dir)
    model_flat, variables_flat = hub.load_pretrained(copy)
    assert (model_flat.embed_dim, model_flat.depth) == (model.embed_dim, model.depth) == (64, 2)
    image = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        model_flat.apply(variables_flat, image), model.apply(variables, image)
    )
