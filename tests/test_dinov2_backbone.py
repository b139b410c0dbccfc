"""DINOv2's ViT (LayerScale, SwiGLU, registers, mask token, both position-embedding resizes and
its stochastic depth) and its released weights, against a PyTorch re-implementation of the
official DinoVisionTransformer (tests/torch_dinov2.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gradients import assert_gradients_close
from torch.nn import functional as F
from torch_dinov2 import TorchDinoViT
from torch_reference import randomize_

import dino_jax
from dino_jax import convert, cpu
from dino_jax.interop import hub, state_dict
from dino_jax.interop.training_state import export_backbone
from dino_jax.models import build_backbone
from dino_jax.models.vit import VisionTransformer, resize_pos_embed, swiglu_hidden_dim

RTOL = 1e-5
# ViT-S/14 of depth 2 with the released files' 518-px position embedding (37 x 37).
SMALL = {"patch_size": 14, "embed_dim": 384, "depth": 2, "num_heads": 6, "img_size": 518}
VARIANTS = {
    "layerscale": {"layerscale": 1.0},
    "registers_antialias": {
        "layerscale": 1.0,
        "num_register_tokens": 4,
        "interpolate_offset": 0.0,
        "interpolate_antialias": True,
    },
    "registers_offset": {"layerscale": 1e-5, "num_register_tokens": 4},
    "swiglu": {"layerscale": 1.0, "ffn_layer": "swiglufused"},
}


def assert_close(got, want):
    """1e-5 relative per entry, or 1e-5 of the tensor's RMS near 0 (float32 against float64)."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.sqrt(np.mean(want**2)))


def twin_and_ours(variant, seed=0):
    """(float64 torch twin with random weights, our model, its variables from the twin's
    state dict through the checkpoint conversion)."""
    options = VARIANTS[variant]
    twin = randomize_(TorchDinoViT(**SMALL, **options), seed).double().eval()
    model = VisionTransformer(dinov2=True, **SMALL, **options)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
    state = {k: v.float().numpy() for k, v in twin.state_dict().items()}
    variables = state_dict.from_state_dict(state, abstract, state_dict.backbone_key, "twin")
    return twin, model, variables


def nchw(images):
    return torch.from_numpy(np.asarray(images, np.float64).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("side", [2, 7, 16, 37, 40])
@pytest.mark.parametrize(
    ("offset", "antialias"), [(0.1, False), (0.0, False), (0.0, True)], ids=["offset", "size", "aa"]
)
def test_pos_embed_resize_is_torch_bicubic(side, offset, antialias):
    """resize_pos_embed equals F.interpolate as the official interpolate_pos_encoding calls it,
    shrinking (37 -> 2, 7, 16) and growing (37 -> 40)."""
    pos = np.random.default_rng(side).normal(size=(1, 1 + 37 * 37, 8))
    grid = torch.from_numpy(pos[0, 1:].reshape(1, 37, 37, 8)).permute(0, 3, 1, 2)
    kwargs = {"scale_factor": ((side + offset) / 37,) * 2} if offset else {"size": (side, side)}
    want = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    want = want.permute(0, 2, 3, 1).reshape(1, side * side, 8).numpy()
    got = resize_pos_embed(jnp.asarray(pos, jnp.float32), side, side, offset, antialias)
    if side == 37:
        np.testing.assert_array_equal(got, np.float32(pos))  # the official skips the resize
        return
    assert_close(got[:, 1:], want)
    np.testing.assert_array_equal(got[:, 0], np.float32(pos[:, 0]))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", [224, 98])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
def test_outputs_equal_the_official(variant, size, masked):
    twin, model, variables = twin_and_ours(variant)
    images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    patches = (size // 14) ** 2
    masks = np.random.default_rng(1).random((2, patches)) < 0.4 if masked else None
    with torch.no_grad():
        torch_masks = None if masks is None else torch.from_numpy(masks)
        want = {k: v.numpy() for k, v in twin.forward_features(nchw(images), torch_masks).items()}
        want_layers = twin.get_intermediate_layers(nchw(images), 2, True, True, False)
        want_attn = twin.get_last_selfattention(nchw(images)).numpy()
    got = model.apply(variables, images, masks, method="forward_features")
    r = model.num_register_tokens
    assert got["x_norm_regtokens"].shape == (2, r, 384)
    assert got["x_prenorm"].shape == (2, 1 + r + patches, 384)
    for key in want:
        if want[key].size:  # no registers: x_norm_regtokens is [2, 0, 384]
            assert_close(got[key], want[key])
    if masked:  # the mask token changes the masked patches only from the first block on
        plain = model.apply(variables, images, method="forward_features")["x_prenorm"]
        assert np.abs(plain - got["x_prenorm"]).max() > 1e-3
        return
    layers = model.apply(variables, images, 2, True, True, False, method="get_intermediate_layers")
    for (patch, cls), (want_patch, want_cls) in zip(layers, want_layers, strict=True):
        assert patch.shape == (2, size // 14, size // 14, 384)
        assert_close(patch, want_patch.permute(0, 2, 3, 1).numpy())  # NHWC
        assert_close(cls, want_cls.numpy())
    assert_close(model.apply(variables, images, method="get_last_selfattention"), want_attn)
    assert_close(model.apply(variables, images), want["x_norm_clstoken"])


@pytest.mark.parametrize("variant", ["registers_antialias", "swiglu"])
def test_the_cpu_layers_give_the_official_outputs(variant):
    twin, model, variables = twin_and_ours(variant)
    model = model.clone(layers=cpu.LAYERS)
    images = np.random.default_rng(0).normal(size=(2, 98, 98, 3)).astype(np.float32)
    masks = np.random.default_rng(1).random((2, 49)) < 0.4
    with torch.no_grad():
        want = twin.forward_features(nchw(images), torch.from_numpy(masks))
    got = jax.jit(lambda v, x, m: model.apply(v, x, m, method="forward_features"))(
        variables, images, masks
    )
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert_close(got[key], want[key].numpy())


@pytest.mark.parametrize("layers", ["stock", "cpu"])
def test_scanned_blocks_equal_the_loop(layers):
    """scan_blocks: the same outputs and parameter gradients, the parameters still one subtree
    per block (the official names), one while loop in the program."""
    model = build_backbone(
        "dinov2_vit_small", 14, img_size=56, depth=4, layerscale=0.1, num_register_tokens=2
    )
    model = model.clone(layers=cpu.LAYERS) if layers == "cpu" else model
    images = jax.random.normal(jax.random.key(1), (2, 42, 42, 3))
    variables = model.init(jax.random.key(0), images)
    scanned = model.clone(scan_blocks=True)
    assert scanned.init(jax.random.key(0), images)["params"].keys() == variables["params"].keys()
    for method in ("forward_features", "get_last_selfattention"):
        want = model.apply(variables, images, method=method)
        got = scanned.apply(variables, images, method=method)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)  # float32 summation order
    weights = jax.random.normal(jax.random.key(2), (2, 384))  # a sum of LayerNorm outputs has
    grads = [  # no gradient to speak of
        jax.grad(lambda v, m=m: jnp.sum(m.apply(v, images) * weights))(variables)
        for m in (scanned, model)
    ]
    assert_gradients_close(grads[0], grads[1], 1e-4)
    program = jax.jit(lambda v, x: scanned.apply(v, x)).lower(variables, images).as_text()
    assert program.count("stablehlo.while") == 1


def test_stochastic_depth_is_the_officials_batch_subset():
    """Above a rate of 0.1 each branch runs on int(b (1 - rate)) random samples, added back
    scaled by b / subset (drop_add_residual_stochastic_depth); with the subsets our forward
    drew, the official's formula gives our output."""
    twin, model, variables = twin_and_ours("layerscale")
    model = model.clone(drop_path_rate=0.4, drop_path_uniform=True)
    images = np.random.default_rng(0).normal(size=(5, 28, 28, 3)).astype(np.float32)
    got, state = model.apply(
        variables,
        images,
        method="forward_features",
        train=True,
        rngs={"drop_path": jax.random.key(3)},
        mutable=["intermediates"],
    )
    drawn = state["intermediates"]
    branges = [
        [torch.from_numpy(np.array(i)) for i in drawn[f"blocks_{b}"]["drop_path_subset"]]
        for b in range(2)
    ]
    assert all(len(brange) == 3 for pair in branges for brange in pair)  # int(5 * 0.6)
    with torch.no_grad():
        want = twin.forward_features(nchw(images), branges=branges)["x_prenorm"].numpy()
    assert_close(got["x_prenorm"], want)
    # The samples outside a block's both subsets passed it unchanged.
    with torch.no_grad():
        plain = twin.forward_features(nchw(images))["x_prenorm"].numpy()
    assert np.abs(plain - want).max() > 1e-3


def test_stochastic_depth_subsets_are_drawn_per_rank():
    """With drop_path_groups=2 (two ranks) each rank's crops run the official's batch-subset
    formula on subsets of its own: the torch twin on each half, with that half's subsets, gives
    our output for it."""
    twin, model, variables = twin_and_ours("layerscale")
    model = model.clone(drop_path_rate=0.4, drop_path_uniform=True, drop_path_groups=2)
    images = np.random.default_rng(1).normal(size=(6, 28, 28, 3)).astype(np.float32)
    got, state = model.apply(
        variables,
        images,
        method="forward_features",
        train=True,
        rngs={"drop_path": jax.random.key(4)},
        mutable=["intermediates"],
    )
    drawn = state["intermediates"]
    for rank in range(2):
        branges = [
            [torch.from_numpy(np.array(i[rank])) for i in drawn[f"blocks_{b}"]["drop_path_subset"]]
            for b in range(2)
        ]
        assert all(len(brange) == 1 for pair in branges for brange in pair)  # int(3 * 0.6)
        half = images[3 * rank : 3 * rank + 3]
        with torch.no_grad():
            want = twin.forward_features(nchw(half), branges=branges)["x_prenorm"].numpy()
        assert_close(got["x_prenorm"][3 * rank : 3 * rank + 3], want)


def test_init_is_the_officials():
    model = build_backbone(
        "dinov2_vit_small", 14, img_size=224, depth=2, layerscale=1e-5, num_register_tokens=4
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
    assert np.std(params["cls_token"]) < 2e-6 and np.std(params["register_tokens"]) < 2e-6
    assert not np.any(params["mask_token"]) and params["mask_token"].shape == (1, 384)
    assert 0.018 < np.std(params["pos_embed"]) < 0.022
    block = params["blocks_0"]
    np.testing.assert_array_equal(block["ls1"]["gamma"], np.full(384, 1e-5, np.float32))
    assert 0.018 < np.std(block["attn"]["qkv"]["kernel"]) < 0.022
    assert not np.any(block["attn"]["qkv"]["bias"])
    np.testing.assert_array_equal(block["norm1"]["scale"], np.ones(384, np.float32))
    bound = 1 / np.sqrt(3 * 14 * 14)  # torch Conv2d's default: U(+-1/sqrt(fan_in))
    kernel = params["patch_embed"]["kernel"]
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    assert swiglu_hidden_dim(384) == 1024 and swiglu_hidden_dim(1536) == 4096


def released(shapes: dict) -> dict:
    return {k: np.zeros(v, np.float32) for k, v in shapes.items()}


@pytest.mark.parametrize(
    ("arch", "width", "depth", "swiglu"),
    [
        ("dinov2_vit_small", 384, 12, False),
        ("dinov2_vit_large", 1024, 24, False),
        ("dinov2_vit_giant2", 1536, 40, True),
    ],
)
@pytest.mark.parametrize("registers", [0, 4])
def test_the_released_files_are_recognised(arch, width, depth, swiglu, registers):
    """dinov2_vit{s,l,g}14[_reg4]_pretrain.pth shapes (518 px: a 37 x 37 grid)."""
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, 1 + 37 * 37, width),
        "mask_token": (1, width),
        "patch_embed.proj.weight": (width, 3, 14, 14),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, width)
    for i in range(depth):
        shapes[f"blocks.{i}.ls1.gamma"] = (width,)
        shapes[f"blocks.{i}.mlp.{'w12' if swiglu else 'fc1'}.weight"] = (8, width)
    config = state_dict.infer_backbone_config(released(shapes))
    s = config.student
    assert (s.arch, s.patch_size, s.img_size, s.depth) == (arch, 14, 518, None)
    assert (s.layerscale, s.num_register_tokens) == (1.0, registers)
    assert s.ffn_layer == ("swiglufused" if swiglu else "mlp")
    assert (s.interpolate_offset, s.interpolate_antialias) == (
        (0.0, True) if registers else (0.1, False)
    )


@pytest.mark.parametrize("variant", ["registers_antialias", "swiglu"])
@pytest.mark.parametrize("layout", ["release", "chunked", "teacher_checkpoint"])
def test_released_weights_load_and_export_with_strict(tmp_path, variant, layout):
    """A release-layout file (blocks.{i}, or FSDP's blocks.{chunk}.{i}, or a training run's
    teacher_checkpoint.pth) loads with the model inferred; `convert import` then `convert
    export` writes a file the official model loads with strict=True and the same features."""
    twin, _, _ = twin_and_ours(variant, seed=1)
    state = twin.float().state_dict()
    if layout == "chunked":  # block_chunks=2 over 2 blocks: blocks.0.0, blocks.1.1
        state = {k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v
                 for k, v in state.items()}  # fmt: skip
    if layout == "teacher_checkpoint":
        heads = {"dino_head.last_layer.weight_g": torch.ones(8, 1)}
        state = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **heads}}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    twin = twin.double()
    model, variables = dino_jax.load_pretrained(path)
    assert model.dinov2 and model.depth == 2 and model.patch_size == 14
    if variant == "swiglu":  # without registers the file says nothing of the hub's resize
        assert (model.interpolate_offset, model.interpolate_antialias) == (0.1, False)
    images = np.random.default_rng(0).normal(size=(2, 98, 126, 3)).astype(np.float32)
    with torch.no_grad():
        want = twin.forward_features(nchw(images))
    assert_close(hub.extract_features(model, variables, images), want["x_norm_clstoken"].numpy())
    patches = hub.patch_features(model, variables, images)
    assert patches.shape == (2, 7, 9, 384)
    assert_close(patches.reshape(2, 63, 384), want["x_norm_patchtokens"].numpy())
    masks = np.zeros((2, 63), bool)
    masks[:, ::5] = True
    with torch.no_grad():
        want_masked = twin.forward_features(nchw(images), torch.from_numpy(masks))
    got = dino_jax.forward_features(model, variables, images, masks)
    assert_close(got["x_prenorm"], want_masked["x_prenorm"].numpy())
    [(last, cls)] = dino_jax.get_intermediate_layers(
        model, variables, images, 1, reshape=True, return_class_token=True
    )
    assert last.shape == (2, 7, 9, 384)
    assert_close(cls, want["x_norm_clstoken"].numpy())

    convert.main(["import", str(path), "--out", str(tmp_path / "export")])
    export_backbone(tmp_path / "export", tmp_path / "out.pth")
    fresh = TorchDinoViT(**SMALL, **VARIANTS[variant])
    fresh.load_state_dict(torch.load(tmp_path / "out.pth"), strict=True)
    with torch.no_grad():
        again = fresh.double().eval().forward_features(nchw(images))
    for key, value in want.items():
        np.testing.assert_allclose(again[key].numpy(), value.numpy(), rtol=1e-6, atol=1e-6)


def test_attention_maps_skip_the_registers(tmp_path):
    twin, _, _ = twin_and_ours("registers_antialias", seed=2)
    torch.save(twin.float().state_dict(), tmp_path / "reg.pth")
    model, variables = dino_jax.load_pretrained(tmp_path / "reg.pth")
    images = np.random.default_rng(0).normal(size=(1, 42, 56, 3)).astype(np.float32)
    with torch.no_grad():
        attn = twin.double().get_last_selfattention(nchw(images)).numpy()
    maps = hub.attention_maps(model, variables, images)
    assert maps.shape == (1, 6, 3, 4)
    assert_close(maps, attn[:, :, 0, 5:].reshape(1, 6, 3, 4))  # cls, 4 registers, patches


def test_dino_archs_refuse_dinov2_options():
    with pytest.raises(ValueError, match="DINOv2's: set dinov2=True"):
        VisionTransformer(layerscale=1e-5).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="masks need DINOv2's mask token"):
        model = VisionTransformer(patch_size=8, img_size=16, embed_dim=64, depth=1, num_heads=4)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
        model.apply(variables, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4), bool),
                    method="forward_features")  # fmt: skip
