"""`--config.train.init_checkpoint`: a new run started from trained weights (an official full
checkpoint, a backbone-only release file, a dino_jax workdir or export) at step 0 with a fresh
optimizer; a checkpoint in --workdir still wins; a file of another model is one line."""

import logging

import jax
import numpy as np
import pytest
import torch
from test_convert import (
    assert_step_is_the_references,
    full_checkpoint,
    random_batch,
    reference_step,
    step_from,
    torch_network,
)
from test_train import REPO, cli, losses_by_step
from torch_reference import TorchViT, randomize_, save_release_vit

from dino_jax import train as train_lib
from dino_jax.checkpoint import Checkpointer, export_teacher
from dino_jax.core import parallel
from dino_jax.core.config import load_config
from dino_jax.core.step import init_state
from dino_jax.interop import state_dict


def initial_state(config, workdir):
    """The state the training command would start from in `workdir`."""
    mesh = parallel.make_mesh((("data", 8),))
    with Checkpointer(workdir, save_every=100, keep=1) as ckpt:
        return train_lib._initial_state(config, mesh, ckpt, None), mesh


def assert_fresh_optimizer(state):
    assert int(state.step) == 0
    leaves = jax.tree.leaves(jax.device_get(state.opt_state))
    assert leaves and all(not np.any(leaf) for leaf in leaves)  # moments and counts at 0


@pytest.mark.slow
def test_full_checkpoint_starts_at_step_0_like_the_reference(tiny_config, tmp_path):
    # No lr warmup: the first step's update shows the schedule (step 0, not the file's epoch 2)
    # and a fresh Adam state.
    config = tiny_config(drop_path_rate=0.0, warmup_epochs=0)
    checkpoint = full_checkpoint(config)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    config.train.init_checkpoint = str(tmp_path / "checkpoint.pth")
    state, mesh = initial_state(config, tmp_path / "run")
    assert_fresh_optimizer(state)
    batch = random_batch(config)
    ours = step_from(state, config, mesh, batch)
    lr = float(ours[2]["lr"])
    assert lr == pytest.approx(config.optim.lr * config.train.batch_size / 256, rel=1e-6)
    assert_step_is_the_references(config, *ours, reference_step(config, checkpoint, batch, epoch=0))


def release_backbone(config, seed=3):
    """A reference ViT of the config's size with random weights (a release file's network)."""
    vit = TorchViT(
        config.student.patch_size,
        config.student.embed_dim,
        config.student.depth,
        config.student.num_heads,
        config.student.img_size,
    )
    return randomize_(vit, seed)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["flat", "teacher_wrapped"])
def test_backbone_file_gives_student_and_teacher_its_backbone(tiny_config, tmp_path, layout):
    config = tiny_config()
    backbone = release_backbone(config).state_dict()
    if layout == "flat":  # dino_deitsmall16_pretrain.pth
        saved = backbone
    else:  # a network under "teacher", as utils.py: load_pretrained_weights reads it
        network = torch_network(config, 5).state_dict()
        saved = {"teacher": {f"module.{k}": v for k, v in network.items()}, "epoch": 7}
        backbone = {k.removeprefix("backbone."): v for k, v in network.items() if "backbone" in k}
    torch.save(saved, tmp_path / "backbone.pth")
    config.train.init_checkpoint = str(tmp_path / "backbone.pth")
    state, mesh = initial_state(config, tmp_path / "run")
    assert_fresh_optimizer(state)
    state = jax.device_get(state)
    for which in ("student", "teacher"):
        got = state_dict.backbone_to_torch({"params": getattr(state, which)["backbone"]})
        assert set(got) == set(backbone)
        for key, tensor in backbone.items():
            assert torch.equal(got[key], tensor), (which, key)
    # The head as a fresh run's (the teacher a copy of the student's), the center at 0.
    fresh = jax.device_get(init_state(config, jax.random.key(config.train.seed), mesh))
    for which in ("student", "teacher"):
        jax.tree.map(
            np.testing.assert_array_equal, getattr(state, which)["head"], fresh.student["head"]
        )
    assert not np.any(state.method_state["center"])


@pytest.mark.slow
def test_dino_jax_workdir_and_export(tiny_config, tmp_path):
    config = tiny_config(use_bn_in_head=True)  # head BatchNorm statistics travel too
    run = jax.device_get(init_state(config, jax.random.key(1)))
    rng = np.random.default_rng(0)
    trained = {  # every array away from its initial value, as after training
        field: jax.tree.map(
            lambda x: x + rng.normal(size=x.shape).astype(x.dtype), getattr(run, field)
        )
        for field in ("student", "teacher", "method_state", "batch_stats")
    }
    run = run.replace(step=np.int32(9), **trained)
    with Checkpointer(tmp_path / "old", save_every=100, keep=1) as ckpt:
        ckpt.save(9, run, None, config, force=True)
    export_teacher(tmp_path / "old" / "export", run, config)

    config.train.init_checkpoint = str(tmp_path / "old")  # the workdir: its latest checkpoint
    state, _ = initial_state(config, tmp_path / "run")
    assert_fresh_optimizer(state)
    state = jax.device_get(state)
    for field in ("student", "teacher", "method_state", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, field), getattr(run, field))

    config.train.init_checkpoint = str(tmp_path / "old" / "export")  # the teacher only
    state, _ = initial_state(config, tmp_path / "run2")
    assert_fresh_optimizer(state)
    state = jax.device_get(state)
    for which in ("student", "teacher"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, which), run.teacher)
        jax.tree.map(
            np.testing.assert_array_equal, state.batch_stats[which], run.batch_stats["teacher"]
        )
    assert not np.any(state.method_state["center"])


def test_files_of_another_model_are_refused(tiny_config, tmp_path):
    torch.save(full_checkpoint(tiny_config()), tmp_path / "checkpoint.pth")
    path = str(tmp_path / "checkpoint.pth")
    with pytest.raises(
        ValueError, match=r"has depth 2; the config \(arch vit_small\) builds depth 3"
    ):
        initial_state(tiny_config(depth=3, init_checkpoint=path), tmp_path / "a")
    with pytest.raises(
        ValueError, match=r"center of .* has shape \(256,\).*dino.head_n_prototypes=512"
    ):
        initial_state(tiny_config(head_n_prototypes=512, init_checkpoint=path), tmp_path / "b")
    with pytest.raises(ValueError, match=r"student head .*mismatched shapes.*mlp\.0\.weight"):
        initial_state(tiny_config(head_hidden_dim=128, init_checkpoint=path), tmp_path / "c")
    backbone = release_backbone(tiny_config()).state_dict()
    backbone["blocks.0.attn.extra"] = torch.zeros(3)
    torch.save(backbone, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unknown keys \(1\): blocks\.0\.attn\.extra"):
        initial_state(tiny_config(init_checkpoint=str(tmp_path / "extra.pth")), tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=r"init_checkpoint: no \.pth file"):
        initial_state(tiny_config(init_checkpoint=str(tmp_path / "nope.pth")), tmp_path / "e")


def test_a_checkpoint_in_the_workdir_wins(tiny_config, tmp_path, caplog):
    config = tiny_config()
    saved = init_state(config, jax.random.key(2)).replace(step=np.int32(5))
    with Checkpointer(tmp_path / "run", save_every=100, keep=1) as ckpt:
        ckpt.save(5, saved, None, config, force=True)
    torch.save(full_checkpoint(config), tmp_path / "checkpoint.pth")
    config.train.init_checkpoint = str(tmp_path / "checkpoint.pth")
    with caplog.at_level(logging.INFO, logger="dino_jax"):
        state, _ = initial_state(config, tmp_path / "run")
    assert int(state.step) == 5
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.student), saved.student)
    assert f"init_checkpoint={config.train.init_checkpoint} ignored" in caplog.text


@pytest.mark.slow
def test_training_command(tmp_path):
    config = load_config(f"{REPO / 'configs' / 'demo.py'}:smoke")
    torch.save(full_checkpoint(config), tmp_path / "checkpoint.pth")
    code, out = cli(
        tmp_path / "run", f"--config.train.init_checkpoint={tmp_path / 'checkpoint.pth'}"
    )
    assert code == 0, out
    assert f"Starting at step 0 from {tmp_path / 'checkpoint.pth'}: the student, teacher" in out
    assert sorted(losses_by_step(tmp_path / "run")) == [1, 2, 3, 4]
    # A ViT-S/16 release file for the smoke ViT (width 64, 8-px patches): one line, no traceback.
    save_release_vit(tmp_path / "dino_deitsmall16_pretrain.pth")
    release = tmp_path / "dino_deitsmall16_pretrain.pth"
    code, out = cli(tmp_path / "other", f"--config.train.init_checkpoint={release}")
    assert code == 1, out
    assert "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if " ERROR " in line]
    assert "has embed_dim 384, patch_size 16, img_size 224, num_heads 6; the config" in line, line
    assert "builds embed_dim 64, patch_size 8, img_size 64, num_heads 4." in line, line
