"""DINOv2's training checkpoints in: SSLMetaArch's state dict (student, teacher, both centers, the
iteration), its teacher_checkpoint.pth and backbone files, against torch modules with the official
layout (tests/torch_dinov2.py's DinoVisionTransformer, DINOHead below); our networks must compute
what the torch networks compute, and write the official keys back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_tiny_config
from torch import nn as tnn
from torch.nn import functional as F
from torch_dinov2 import TorchDinoViT
from torch_reference import randomize_

from dino_jax.checkpoint import export_teacher
from dino_jax.core import parallel
from dino_jax.core.step import init_state
from dino_jax.interop import state_dict
from dino_jax.interop import training_state as interop
from dino_jax.models import build_dinov2

ITERATION = 41  # the official saves the iteration it just ran (fvcore: PeriodicCheckpointer)
GRID = 4  # 32-px crops of 8-px patches


def tiny_v2(separate: bool, **overrides):
    """A DINOv2 ViT of width 64 and depth 2 with one register and LayerScale; with a separate
    iBOT head of other sizes than the DINO head's, its MLP one Linear (whose key has no index)."""
    c = make_tiny_config(
        method="dinov2",
        arch="dinov2_vit_small",
        patch_size=8,
        layerscale=1e-5,
        num_register_tokens=1,
        rank_batch_size=4,
        **overrides,
    )
    c.ibot.separate_head = separate
    c.ibot.head_n_prototypes, c.ibot.head_hidden_dim = 128, 96
    c.ibot.head_bottleneck_dim, c.ibot.head_nlayers = 32, 1
    return c


class TorchHead(tnn.Module):
    """dinov2/layers/dino_head.py: DINOHead: Linear-GELU-...-Linear, L2 normalisation, the
    weight-normalised last layer (weight_g [K, 1], weight_v [K, bottleneck], no bias)."""

    def __init__(self, in_dim, out_dim, hidden, bottleneck, nlayers):
        super().__init__()
        if nlayers == 1:
            self.mlp = tnn.Linear(in_dim, bottleneck)
        else:
            layers = [tnn.Linear(in_dim, hidden), tnn.GELU()]
            for _ in range(nlayers - 2):
                layers += [tnn.Linear(hidden, hidden), tnn.GELU()]
            self.mlp = tnn.Sequential(*layers, tnn.Linear(hidden, bottleneck))
        self.last_layer = tnn.Module()
        self.last_layer.weight_g = tnn.Parameter(torch.ones(out_dim, 1))
        self.last_layer.weight_v = tnn.Parameter(torch.zeros(out_dim, bottleneck))

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        v, g = self.last_layer.weight_v, self.last_layer.weight_g
        return F.linear(x, v * g / v.norm(dim=1, keepdim=True))


def torch_network(config, seed):
    """SSLMetaArch's student or teacher ModuleDict for `config`, every parameter random."""
    s = config.student
    backbone = TorchDinoViT(
        patch_size=s.patch_size,
        embed_dim=s.embed_dim,
        depth=s.depth,
        num_heads=s.num_heads,
        img_size=s.img_size,
        layerscale=s.layerscale,
        num_register_tokens=s.num_register_tokens,
    )
    parts = {"backbone": backbone}
    for name, section in (("dino_head", config.dino), ("ibot_head", config.ibot)):
        if name == "dino_head" or config.ibot.separate_head:
            parts[name] = TorchHead(
                s.embed_dim,
                section.head_n_prototypes,
                section.head_hidden_dim,
                section.head_bottleneck_dim,
                section.head_nlayers,
            )
    return randomize_(tnn.ModuleDict(parts), seed).eval()


def ssl_meta_arch(config, chunked=False):
    """(SSLMetaArch state dict of torch tensors, {network: torch ModuleDict}); with chunked,
    the blocks keyed as block_chunks=2 keys them for depth 2 (BlockChunk i holds block i)."""
    nets = {"student": torch_network(config, 1), "teacher": torch_network(config, 2)}
    state = {f"{w}.{k}": v for w, net in nets.items() for k, v in net.state_dict().items()}
    if chunked:
        state = {
            k.replace("backbone.blocks.0.", "backbone.blocks.0.0.").replace(
                "backbone.blocks.1.", "backbone.blocks.1.1."
            ): v
            for k, v in state.items()
        }
    gen = torch.Generator().manual_seed(3)
    k_ibot = (config.ibot if config.ibot.separate_head else config.dino).head_n_prototypes
    state["dino_loss.center"] = torch.randn(1, config.dino.head_n_prototypes, generator=gen)
    state["ibot_patch_loss.center"] = torch.randn(1, 1, k_ibot, generator=gen)
    return state, nets


def save(path, obj):
    torch.save(obj, path)
    return path


def assert_computes_as(params, net, config, images):
    """Our DinoV2Networks with `params` gives the torch network's backbone cls tokens, DINO
    head logits and iBOT logits of the masked patches (every parameter takes part)."""
    ours = build_dinov2(config)
    crops = jnp.asarray(images)[None]  # [1, 2, H, W, 3]
    # The official's crop-major patch order: one from each crop, through the iBOT head.
    index = jnp.asarray([[3, GRID * GRID + 5]], jnp.int32)
    out = ours.apply({"params": params}, crops, None, None, index)
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2))
        features = net["backbone"].forward_features(x)
        cls = features["x_norm_clstoken"]
        patches = features["x_norm_patchtokens"][[0, 1], [3, 5]]
        ibot_head = net["ibot_head"] if "ibot_head" in net else net["dino_head"]
        want = {
            "global_cls": cls,
            "global_logits": net["dino_head"](cls),
            "patch_logits": ibot_head(patches),
        }
    for key, value in want.items():
        np.testing.assert_allclose(
            np.asarray(out[key]).reshape(value.shape), value.numpy(), rtol=1e-4, atol=1e-5
        )


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("separate", [False, True])
def test_full_checkpoint_resumes_student_teacher_centers_and_iteration(tmp_path, images, separate):
    config = tiny_v2(separate)
    state_dict_, nets = ssl_meta_arch(config, chunked=True)
    path = save(tmp_path / "model_0000041.pth", {"model": state_dict_, "iteration": ITERATION})
    state = interop.import_full_checkpoint(path, config)
    # train.py: do_train resumes at iteration + 1.
    assert int(state.step) == ITERATION + 1
    for which in ("student", "teacher"):
        assert_computes_as(getattr(state, which), nets[which], config, images)
    assert set(state.student) == {"backbone", "dino_head"} | ({"ibot_head"} if separate else set())
    np.testing.assert_array_equal(
        state.method_state["dino_center"], state_dict_["dino_loss.center"].numpy()[0]
    )
    np.testing.assert_array_equal(
        state.method_state["ibot_center"], state_dict_["ibot_patch_loss.center"].numpy()[0, 0]
    )
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
    assert moments and all(not np.any(np.asarray(m)) for m in moments)  # a fresh optimizer


def test_networks_write_back_the_official_keys_and_values():
    """to_state_dict of imported params gives the file's tensors under torch's own names, and
    reading that back gives the same params; block_chunks=2 writes BlockChunk's names."""
    config = tiny_v2(True)
    _, nets = ssl_meta_arch(config)
    want = {k: v.numpy() for k, v in nets["student"].state_dict().items()}
    abstract = jax.eval_shape(lambda k: init_state(config, k), jax.random.key(0)).student
    params = state_dict.dinov2_networks_from_state_dict(want, abstract, config, "student")
    written = state_dict.dinov2_networks_to_state_dict(params, config)
    assert set(written) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    chunked = state_dict.dinov2_networks_to_state_dict(params, config, block_chunks=2)
    assert "backbone.blocks.1.1.mlp.fc2.weight" in chunked
    assert "backbone.blocks.0.0.ls1.gamma" in chunked
    again = state_dict.dinov2_networks_from_state_dict(chunked, abstract, config, "student")
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_a_bare_state_dict_starts_at_step_0_and_places_on_a_mesh(tmp_path):
    config = tiny_v2(False)
    state_dict_, _ = ssl_meta_arch(config)
    mesh = parallel.make_mesh(config.compute.mesh)
    state = interop.import_full_checkpoint(save(tmp_path / "bare.pth", state_dict_), config, mesh)
    assert int(state.step) == 0
    cls = state.teacher["backbone"]["cls_token"]
    assert cls.sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(cls, state_dict_["teacher.backbone.cls_token"].numpy())


def test_new_run_from_a_full_checkpoint_keeps_the_weights_and_centers(tmp_path, images):
    config = tiny_v2(True)
    state_dict_, nets = ssl_meta_arch(config)
    path = save(tmp_path / "full.pth", {"model": state_dict_, "iteration": ITERATION})
    state, what = interop.init_state_from(path, config, jax.random.key(0))
    assert int(state.step) == 0 and "centers" in what
    assert_computes_as(state.student, nets["student"], config, images)
    assert_computes_as(state.teacher, nets["teacher"], config, images)
    np.testing.assert_array_equal(
        state.method_state["ibot_center"], state_dict_["ibot_patch_loss.center"].numpy()[0, 0]
    )


def test_new_run_from_teacher_checkpoint_takes_the_teacher_for_both(tmp_path, images):
    """dinov2/train/train.py: do_test saves {"teacher": model.teacher.state_dict()}."""
    config = tiny_v2(True)
    _, nets = ssl_meta_arch(config, chunked=False)
    teacher = nets["teacher"].state_dict()
    path = save(tmp_path / "teacher_checkpoint.pth", {"teacher": teacher})
    state, _ = interop.init_state_from(path, config, jax.random.key(0))
    for network in (state.student, state.teacher):
        assert_computes_as(network, nets["teacher"], config, images)
    assert state.student["backbone"]["cls_token"] is not state.teacher["backbone"]["cls_token"]
    assert not any(np.any(np.asarray(c)) for c in state.method_state.values())  # new centers


def test_new_run_from_a_backbone_file_keeps_fresh_heads(tmp_path):
    config = tiny_v2(True)
    _, nets = ssl_meta_arch(config)
    backbone = nets["teacher"]["backbone"].state_dict()
    path = save(tmp_path / "dinov2_tiny_pretrain.pth", backbone)
    state, _ = interop.init_state_from(path, config, jax.random.key(0))
    fresh = init_state(config, jax.random.key(0))
    for network in (state.student, state.teacher):
        np.testing.assert_array_equal(
            network["backbone"]["register_tokens"], backbone["register_tokens"].numpy()
        )
        for head in ("dino_head", "ibot_head"):
            jax.tree.map(np.testing.assert_array_equal, network[head], fresh.student[head])


def test_new_run_from_a_dinov2_export_takes_its_heads(tmp_path, images):
    config = tiny_v2(True)
    state_dict_, nets = ssl_meta_arch(config)
    imported = interop.import_full_checkpoint(save(tmp_path / "m.pth", state_dict_), config)
    export_teacher(tmp_path / "export", imported, config)
    state, _ = interop.init_state_from(tmp_path / "export", config, jax.random.key(0))
    assert_computes_as(state.student, nets["teacher"], config, images)


def dino_v1_checkpoint(config):
    """main_dino.py: train_dino's checkpoint.pth: networks with backbone.* and one head.*."""
    _, nets = ssl_meta_arch(config)
    network = {f"backbone.{k}": v for k, v in nets["student"]["backbone"].state_dict().items()}
    network.update({f"head.{k}": v for k, v in nets["student"]["dino_head"].state_dict().items()})
    return {
        "student": network,
        "teacher": network,
        "epoch": 3,
        "dino_loss": {"center": torch.zeros(1, config.dino.head_n_prototypes)},
    }


def one_line_error(call, *args) -> str:
    with pytest.raises(ValueError) as error:
        call(*args)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_refusals_are_one_line(tmp_path):
    separate = tiny_v2(True)
    full, _ = ssl_meta_arch(separate)
    path = save(tmp_path / "full.pth", {"model": full, "iteration": ITERATION})
    rng = jax.random.key(0)

    v1 = save(tmp_path / "checkpoint.pth", dino_v1_checkpoint(separate))
    assert "method='dino'" in one_line_error(interop.import_full_checkpoint, v1, separate)
    assert "DINO training checkpoint" in one_line_error(interop.init_state_from, v1, separate, rng)

    fewer = tiny_v2(True)
    fewer.dino.head_n_prototypes = 512
    message = one_line_error(interop.import_full_checkpoint, path, fewer)
    assert "head_n_prototypes=256" in message and "dino.head_n_prototypes=512" in message

    shared = tiny_v2(False)
    assert "ibot_head" in one_line_error(interop.import_full_checkpoint, path, shared)
    assert "ibot_head" in one_line_error(interop.init_state_from, path, shared, rng)

    no_ibot = tiny_v2(False)
    no_ibot.ibot.loss_weight = 0.0
    no_ibot_file, _ = ssl_meta_arch(tiny_v2(False))
    path_shared = save(tmp_path / "shared.pth", {"model": no_ibot_file, "iteration": 1})
    message = one_line_error(interop.import_full_checkpoint, path_shared, no_ibot)
    assert "ibot_patch_loss.center" in message and "ibot.loss_weight=0.0" in message

    as_dino = make_tiny_config(arch="dinov2_vit_small", patch_size=8, layerscale=1e-5)
    assert "method='dinov2'" in one_line_error(interop.import_full_checkpoint, path, as_dino)

    rank = save(tmp_path / "model_0000041.rank_0.pth", {"iteration": 41})
    assert "consolidate" in one_line_error(interop.import_full_checkpoint, rank, separate)
    flat = save(tmp_path / "local.pth", {"model": {"student.backbone._flat_param": torch.zeros(3)}})
    assert "FULL_STATE_DICT" in one_line_error(interop.init_state_from, flat, separate, rng)
