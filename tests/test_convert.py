"""Official checkpoints in, ours out: key layouts, inference of the model, exports that torch loads
with strict=True, and a full training checkpoint that continues training exactly as the reference
would (one step against a PyTorch re-implementation of main_dino.py's iteration)."""

import argparse
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gradients import assert_gradients_close
from test_resnet import TorchResNet50
from torch_reference import (
    TorchDINOHead,
    TorchDINOLoss,
    TorchMultiCrop,
    TorchViT,
    get_params_groups,
    main_dino_args,
    randomize_,
    reference_optimizer,
    save_release_vit,
    train_iteration,
)

from dino_jax import convert
from dino_jax.checkpoint import export_teacher
from dino_jax.core import parallel
from dino_jax.core.config import lookup
from dino_jax.core.step import init_state, make_gradient_step, make_train_step
from dino_jax.interop import hub, state_dict
from dino_jax.interop import training_state as interop
from dino_jax.models import backbone_of

RTOL = 1e-5
GRAD_RTOL = 2e-5
EPOCH = 2  # the checkpoint's "epoch": the next epoch to run


def assert_close(got, want, err_msg=""):
    """1e-5 relative per entry, or 1e-5 of the tensor's RMS for entries near 0 (float32 rounding
    of the float64 reference)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = RTOL * np.sqrt(np.mean(want**2))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=err_msg)


def shapes_only(module) -> dict:
    """A state dict's shapes as zero-stride NumPy views: full-size checks without the memory."""
    return {
        k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in module.state_dict().items()
    }


@pytest.fixture(scope="module")
def release_vit(tmp_path_factory):
    """(path, float64 torch twin) of a ViT-S/16-shaped release file of depth 2."""
    path = tmp_path_factory.mktemp("release") / "dino_deitsmall16_pretrain.pth"
    return path, save_release_vit(path)


# ---------------------------------------------------------------------------------------------
# Release files: inference, export round trip, ResNet-50.


@pytest.mark.parametrize(
    ("arch", "patch", "dim", "heads", "params"),
    [
        ("vit_small", 16, 384, 6, 21_665_664),
        ("vit_small", 8, 384, 6, None),
        ("vit_base", 16, 768, 12, 85_798_656),
        ("vit_base", 8, 768, 12, None),
    ],
)
def test_infers_the_released_vits(arch, patch, dim, heads, params):
    with torch.device("meta"):
        state = shapes_only(TorchViT(patch, dim, 12, heads, img_size=224))
    config = state_dict.infer_backbone_config(state)
    assert (
        config.student.arch,
        config.student.patch_size,
        config.student.img_size,
        config.student.depth,
    ) == (arch, patch, 224, None)
    model = backbone_of(config)
    assert (model.embed_dim, model.depth, model.num_heads) == (dim, 12, heads)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    paths = state_dict.match_keys(state, abstract, state_dict.backbone_key, arch)
    assert set(paths) == set(state)
    if params is not None:  # the released backbones' parameter counts
        assert sum(v.size for v in state.values()) == params


def test_infers_depth_and_grid():
    with torch.device("meta"):
        state = shapes_only(TorchViT(8, 192, 3, 3, img_size=96))
    config = state_dict.infer_backbone_config(state)
    assert (
        config.student.arch,
        config.student.patch_size,
        config.student.img_size,
        config.student.depth,
    ) == ("vit_tiny", 8, 96, 3)


def test_infers_resnet50_with_running_stats():
    with torch.device("meta"):
        torch_model = TorchResNet50()
    state = shapes_only(torch_model)
    assert "layer1.0.bn1.num_batches_tracked" in state and "fc.weight" not in state
    config = state_dict.infer_backbone_config(state)
    assert config.student.arch == "resnet50"
    model = backbone_of(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    paths = state_dict.match_keys(state, abstract, state_dict.backbone_key, "resnet50")
    assert {p[0] for p in paths.values()} == {"params", "batch_stats"}
    n_params = sum(p.numel() for p in torch_model.parameters())
    assert n_params == 23_508_032


def test_unknown_width_is_refused():
    with torch.device("meta"):
        state = shapes_only(TorchViT(16, 96, 1, 3, img_size=224))
    with pytest.raises(ValueError, match="width 96 is none of the official ViTs"):
        state_dict.infer_backbone_config(state)


def test_requested_arch_and_patch_must_agree(release_vit):
    path, _ = release_vit
    with pytest.raises(ValueError, match="holds a vit_small, not the requested arch='vit_base'"):
        hub.load_pretrained(path, arch="vit_base")
    with pytest.raises(ValueError, match="holds patch_size=16, not the requested patch_size=8"):
        hub.load_pretrained(path, patch_size=8)
    model, _ = hub.load_pretrained(path, arch="vit_small", patch_size=16)
    assert model.patch_size == 16


def test_export_round_trips_a_release_file(release_vit, tmp_path):
    path, _ = release_vit
    original = torch.load(path, weights_only=True)
    _, variables = hub.load_pretrained(path)
    exported = state_dict.backbone_to_torch(variables)
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    # Through the files and the command line: .pth -> export dir -> .pth.
    convert.main(["import", str(path), "--out", str(tmp_path / "export")])
    convert.main(["export", str(tmp_path / "export"), "--out", str(tmp_path / "back.pth")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    TorchViT(16, 384, 2, 6, 224).load_state_dict(back, strict=True)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.slow
def test_export_of_a_run_loads_strictly_and_computes_the_same(tiny_config, tmp_path):
    config = tiny_config()
    state = init_state(config, jax.random.key(1))
    export_teacher(tmp_path / "export", state, config)
    exported = interop.export_backbone(tmp_path, tmp_path / "teacher.pth")  # the workdir
    twin = TorchViT(
        config.student.patch_size,
        config.student.embed_dim,
        config.student.depth,
        config.student.num_heads,
        32,
    )
    twin.load_state_dict(torch.load(tmp_path / "teacher.pth", weights_only=True), strict=True)
    assert set(exported) == set(twin.state_dict())
    images = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        want = twin.double()(torch.from_numpy(images.transpose(0, 3, 1, 2)).double())
    model, variables = hub.load_pretrained(tmp_path / "export")
    assert_close(hub.extract_features(model, variables, images), want.numpy())


def resnet_release(path):
    """A torchvision-layout ResNet-50 with random BatchNorm params and statistics, saved."""
    model = TorchResNet50()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                low, high = (0.1, 0.3) if name.endswith("bn3") else (0.5, 1.5)
                module.weight.uniform_(low, high, generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
                module.running_mean.normal_(0.0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
    torch.save(model.state_dict(), path)
    return model.double().eval()


def test_resnet50_release_file(tmp_path):
    twin = resnet_release(tmp_path / "dino_resnet50_pretrain.pth")
    model, variables = hub.load_pretrained(tmp_path / "dino_resnet50_pretrain.pth")
    assert set(variables) == {"params", "batch_stats"}
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = twin(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).numpy()
    assert_close(hub.extract_features(model, variables, images), want)
    exported = state_dict.backbone_to_torch(variables)
    TorchResNet50().load_state_dict(exported, strict=True)
    for key, tensor in twin.float().state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(exported[key], tensor), key


@pytest.mark.slow
def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "dino_jax.convert", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "import" in result.stdout and "export" in result.stdout


# ---------------------------------------------------------------------------------------------
# Full training checkpoints.


def torch_network(config, seed):
    backbone = TorchViT(
        config.student.patch_size,
        config.student.embed_dim,
        config.student.depth,
        config.student.num_heads,
        config.student.img_size,
    )
    head = TorchDINOHead(
        config.student.embed_dim,
        config.dino.head_n_prototypes,
        config.dino.use_bn_in_head,
        config.dino.norm_last_layer,
        config.dino.head_nlayers,
        config.dino.head_hidden_dim,
        config.dino.head_bottleneck_dim,
    )
    return randomize_(
        TorchMultiCrop(backbone, head), seed, keep_weight_g=config.dino.norm_last_layer
    )


def full_checkpoint(config, seed=0):
    """The reference's checkpoint dict: DDP-prefixed student, teacher, optimizer, center, ..."""
    student, teacher = torch_network(config, seed), torch_network(config, seed + 1)
    center = 0.1 * torch.randn(
        1, config.dino.head_n_prototypes, generator=torch.Generator().manual_seed(seed)
    )
    return {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "optimizer": torch.optim.AdamW(get_params_groups(student)).state_dict(),
        "epoch": EPOCH,
        "args": argparse.Namespace(arch=config.student.arch, patch_size=config.student.patch_size),
        "dino_loss": {"center": center},
    }


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, g, l = config.train.batch_size, config.crops.global_crops_size, config.crops.local_crops_size
    return {
        "global": rng.normal(size=(b, 2, g, g, 3)).astype(np.float32),
        "local": rng.normal(size=(b, config.crops.local_crops_number, l, l, 3)).astype(np.float32),
    }


def _torch_crops(config, batch):
    return [
        torch.from_numpy(batch[group][:, i].transpose(0, 3, 1, 2)).double()
        for group, n in (("global", 2), ("local", config.crops.local_crops_number))
        for i in range(n)
    ]


def _torch_dino_loss(config):
    return TorchDINOLoss(
        config.dino.head_n_prototypes,
        2 + config.crops.local_crops_number,
        config.teacher.warmup_teacher_temp,
        config.teacher.teacher_temp,
        config.teacher.warmup_teacher_temp_epochs,
        config.optim.epochs,
    ).double()


def reference_step(config, checkpoint, batch, epoch=EPOCH):
    """One iteration of the reference from `checkpoint` (its networks, center and optimizer
    state) at the start of `epoch`, in float64 -> (loss, student, teacher, center, the student's
    gradients before clipping)."""
    student, teacher = torch_network(config, 0).double(), torch_network(config, 0).double()
    student.load_state_dict(
        {k.removeprefix("module."): v for k, v in checkpoint["student"].items()}
    )
    teacher.load_state_dict(checkpoint["teacher"])
    dino_loss = _torch_dino_loss(config)
    dino_loss.center = checkpoint["dino_loss"]["center"].double()
    optimizer = reference_optimizer(config.optim.optimizer, get_params_groups(student))
    optimizer.load_state_dict(checkpoint["optimizer"])  # casts the moments to float64
    crops = _torch_crops(config, batch)
    it = epoch * config.train.OFFICIAL_EPOCH_LENGTH
    grads = {}
    args = main_dino_args(config)
    loss = train_iteration(
        student, teacher, dino_loss, optimizer, crops, it, epoch, args, gradients=grads
    )
    grads = {k: g.numpy() for k, g in grads.items()}
    return loss, student.state_dict(), teacher.state_dict(), dino_loss.center[0].numpy(), grads


def reference_run_checkpoint(config, seed=0):
    """The reference's checkpoint.pth after its first epoch: `steps_per_epoch` real iterations
    of main_dino.py's loop from random networks, saved in float32 as train_dino saves it
    (student, teacher, optimizer state, epoch 1, center)."""
    student = torch_network(config, seed).double()
    teacher = torch_network(config, seed + 1).double()
    dino_loss = _torch_dino_loss(config)
    optimizer = reference_optimizer(config.optim.optimizer, get_params_groups(student))
    for it in range(config.train.OFFICIAL_EPOCH_LENGTH):
        crops = _torch_crops(config, random_batch(config, seed=100 + it))
        train_iteration(
            student, teacher, dino_loss, optimizer, crops, it, 0, main_dino_args(config)
        )
    as_float = lambda tree: {  # noqa: E731
        k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in tree.items()
    }
    saved = optimizer.state_dict()
    saved["state"] = {i: as_float(entry) for i, entry in saved["state"].items()}
    return {
        "student": {f"module.{k}": v for k, v in as_float(student.state_dict()).items()},
        "teacher": as_float(teacher.state_dict()),
        "optimizer": saved,
        "epoch": 1,
        "args": argparse.Namespace(arch=config.student.arch, patch_size=config.student.patch_size),
        "dino_loss": {"center": dino_loss.center.float()},
    }


def assert_step_is_the_references(config, before, after, metrics, grads, reference):
    """Our step (state `before` -> `after`, its metrics and gradients before clipping) against
    the reference's iteration from the same checkpoint: the loss, each gradient, the center,
    and every parameter of both networks after the update."""
    loss, student, teacher, center, torch_grads = reference
    assert_close(metrics["loss"], loss)
    ours = state_dict.network_to_torch({"params": grads}, config)
    # Per tensor, relative to its norm: float32 sums of many crops' contributions (pos_embed's
    # cls row, the biases) carry ~1e-4 relative round-off in single entries.
    assert_gradients_close({k: ours[k].numpy() for k in torch_grads}, torch_grads, GRAD_RTOL)
    np.testing.assert_allclose(
        metrics["grad_norm"], np.sqrt(sum(np.sum(g**2) for g in torch_grads.values())), rtol=RTOL
    )
    assert_close(after.method_state["center"], center)
    lr = float(metrics["lr"])
    stats = after.batch_stats or {"student": {}, "teacher": {}}
    for which, want in (("student", student), ("teacher", teacher)):
        variables = {"params": getattr(after, which), "batch_stats": stats[which]}
        got = state_dict.network_to_torch(variables, config)
        assert set(got) == set(want)
        for key, tensor in want.items():
            if key.endswith("num_batches_tracked"):
                continue
            got_value, want_value = got[key].numpy(), tensor.numpy()
            if which == "student" and key in torch_grads:
                got_value = check_round_off_updates(got_value, want_value, torch_grads, key, lr)
            assert_close(got_value, want_value, err_msg=f"{which} {key}")


def check_round_off_updates(got, want, grads, key, lr):
    """Checks, to lr, the entries whose exact gradient is 0 (below 1e-6 of the model's gradient
    RMS) and returns `got` with them set to `want`, for the 1e-5 check of the rest.

    Such gradients exist by symmetry: softmax cancels the key bias of attention, a BatchNorm
    cancels the biases before it (the backbone's last LayerNorm bias, the head's pre-BN biases).
    Both sides then hold round-off, which the first Adam step of a fresh optimizer scales to
    up to +-lr each, so the two updates differ by up to 2 lr; no implementation can agree on it.
    """
    scale = np.sqrt(np.mean(np.concatenate([g.ravel() ** 2 for g in grads.values()])))
    zero = np.abs(grads[key]) < 1e-6 * scale
    np.testing.assert_allclose(got[zero], want[zero], rtol=0, atol=2 * lr, err_msg=key)
    got = got.copy()
    got[zero] = want[zero]
    return got


def step_from(state, config, mesh, batch):
    """(state before, state after, metrics, gradients before clipping) of our step."""
    batch = parallel.to_global(batch, mesh)
    _, grads = make_gradient_step(config, mesh)(state, batch)
    before = jax.device_get(state)
    after, metrics = make_train_step(config, mesh)(state, batch)
    return before, jax.device_get(after), jax.device_get(metrics), jax.device_get(grads)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # Head BN (keys mlp.0/3/6 and running stats), a trained weight_g, the last layer frozen
        # (epoch 2 < 3), the teacher temperature inside its warmup.
        {
            "use_bn_in_head": True,
            "norm_last_layer": False,
            "freeze_last_layer_epochs": 3,
            "teacher_temp": 0.07,
            "warmup_teacher_temp_epochs": 3,
        },
    ],
    ids=["default", "bn_head_weight_g_frozen"],
)
def test_full_checkpoint_continues_like_the_reference(tiny_config, tmp_path, overrides):
    config = tiny_config(drop_path_rate=0.0, **overrides)
    checkpoint = full_checkpoint(config)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    mesh = parallel.make_mesh((("data", 8),))
    state = interop.import_full_checkpoint(tmp_path / "checkpoint.pth", config, mesh)
    assert int(state.step) == EPOCH * config.train.OFFICIAL_EPOCH_LENGTH
    batch = random_batch(config)
    ours = step_from(state, config, mesh, batch)
    assert_step_is_the_references(config, *ours, reference_step(config, checkpoint, batch))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"optimizer": "sgd"},
        {"optimizer": "lars", "use_bn_in_head": True},
        # The last layer frozen through the saved epoch and the next: it has no saved state.
        {"freeze_last_layer_epochs": 2, "norm_last_layer": False},
    ],
    ids=["adamw", "sgd", "lars_bn_head", "adamw_frozen_last_layer"],
)
def test_a_reference_run_continues_with_its_optimizer_state(tiny_config, tmp_path, overrides):
    """A checkpoint of real reference iterations (moments and step counts far from a fresh
    optimizer's): our next iteration from it is the reference's, update sizes included."""
    config = tiny_config(drop_path_rate=0.0, **overrides)
    checkpoint = reference_run_checkpoint(config)
    assert checkpoint["optimizer"]["state"]
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    mesh = parallel.make_mesh((("data", 8),))
    state = interop.import_full_checkpoint(tmp_path / "checkpoint.pth", config, mesh)
    assert int(state.step) == config.train.OFFICIAL_EPOCH_LENGTH
    batch = random_batch(config)
    ours = step_from(state, config, mesh, batch)
    assert_step_is_the_references(config, *ours, reference_step(config, checkpoint, batch, 1))


def test_an_optimizer_of_another_kind_or_model_is_refused(tiny_config, tmp_path, caplog):
    config = tiny_config()
    checkpoint = reference_run_checkpoint(tiny_config(optimizer="sgd", OFFICIAL_EPOCH_LENGTH=1))
    torch.save(checkpoint, tmp_path / "sgd.pth")
    with pytest.raises(ValueError, match=r"holds \['momentum_buffer'\].*optimizer='adamw'"):
        interop.import_full_checkpoint(tmp_path / "sgd.pth", config)
    groups = checkpoint["optimizer"]["param_groups"]
    groups[1]["params"] = groups[1]["params"][:-1]
    torch.save(checkpoint, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"groups of sizes \[\d+, \d+\]"):
        interop.import_full_checkpoint(tmp_path / "short.pth", tiny_config(optimizer="sgd"))
    torch.save(full_checkpoint(config), tmp_path / "fresh.pth")
    with caplog.at_level(logging.INFO, logger="dino_jax"):
        state = interop.import_full_checkpoint(tmp_path / "fresh.pth", config)
    assert "holds no optimizer state: the moments start at zero" in caplog.text
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(state.opt_state))


def test_full_checkpoint_errors_list_every_bad_key(tiny_config, tmp_path):
    config = tiny_config()
    checkpoint = full_checkpoint(config)
    student = checkpoint["student"]
    student["module.backbone.blocks.0.attn.extra.weight"] = torch.zeros(3)
    del student["module.backbone.norm.bias"]
    student["module.backbone.pos_embed"] = torch.zeros(1, 5, config.student.embed_dim)
    torch.save(checkpoint, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        interop.import_full_checkpoint(tmp_path / "bad.pth", config)
    message = str(error.value)
    assert "student backbone" in message
    assert "unknown keys (1): blocks.0.attn.extra.weight" in message
    assert "missing keys (1): norm.bias" in message
    assert "mismatched shapes (1): pos_embed: file (1, 5, 64), model (1, 17, 64)" in message


def test_trained_weight_g_needs_norm_last_layer_false(tiny_config, tmp_path):
    checkpoint = full_checkpoint(tiny_config(norm_last_layer=False))
    torch.save(checkpoint, tmp_path / "trained_g.pth")
    with pytest.raises(ValueError, match=r"Set config\.dino\.norm_last_layer=False"):
        interop.import_full_checkpoint(tmp_path / "trained_g.pth", tiny_config())
    state = interop.import_full_checkpoint(
        tmp_path / "trained_g.pth", tiny_config(norm_last_layer=False)
    )
    want = checkpoint["teacher"]["head.last_layer.weight_g"].numpy().T
    np.testing.assert_array_equal(state.teacher["head"]["last_layer"]["weight_g"], want)


def test_full_checkpoint_mismatches(tiny_config, tmp_path, release_vit):
    with pytest.raises(ValueError, match="not a full training checkpoint"):
        interop.import_full_checkpoint(release_vit[0], tiny_config())
    checkpoint = full_checkpoint(tiny_config())
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with pytest.raises(
        ValueError, match=r"center .* has shape \(1, 256\).*dino.head_n_prototypes=512"
    ):
        interop.import_full_checkpoint(
            tmp_path / "checkpoint.pth", tiny_config(head_n_prototypes=512)
        )
    with pytest.raises(ValueError, match=r"missing keys \(12\): blocks\.2\.attn"):
        interop.import_full_checkpoint(tmp_path / "checkpoint.pth", tiny_config(depth=3))


def test_checkpoint_config_reads_the_model_keys(tiny_config, tmp_path):
    overrides = {"embed_dim": 384, "num_heads": 6, "depth": 1, "use_bn_in_head": True}
    config = tiny_config(norm_last_layer=False, head_hidden_dim=128, **overrides)
    torch.save(full_checkpoint(config), tmp_path / "checkpoint.pth")
    got = interop.checkpoint_config(tmp_path / "checkpoint.pth")
    for key in (
        "student.arch",
        "student.patch_size",
        "student.img_size",
        "student.depth",
        "dino.head_n_prototypes",
        "dino.use_bn_in_head",
        "dino.norm_last_layer",
        "dino.head_nlayers",
        "dino.head_hidden_dim",
        "dino.head_bottleneck_dim",
    ):
        assert lookup(got, key) == lookup(config, key), key
