"""Hugging Face export: transformers loads each directory as the matching model (DINO's ViTs as
ViTModel, DINOv2's as Dinov2Model, with registers Dinov2WithRegistersModel) and its outputs
equal the official model's; load_pretrained reads such a directory back."""

import numpy as np
import pytest
import torch
import transformers
from torch_dinov2 import TorchDinoViT
from torch_reference import TorchViT, randomize_

import dino_jax
from dino_jax import convert
from dino_jax.interop import hf

RTOL = 1e-4  # transformers runs in float32, the twins in float64
SMALL14 = {"patch_size": 14, "embed_dim": 384, "depth": 2, "num_heads": 6, "img_size": 518}
DINOV2 = {
    "layerscale": ({"layerscale": 1.0}, "Dinov2Model"),
    "swiglu": ({"layerscale": 1e-5, "ffn_layer": "swiglufused"}, "Dinov2Model"),
    "registers": (
        {
            "layerscale": 1.0,
            "num_register_tokens": 4,
            "interpolate_offset": 0.0,
            "interpolate_antialias": True,
        },
        "Dinov2WithRegistersModel",
    ),
}


def assert_close(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.sqrt(np.mean(want**2)))


def nchw(images):
    return torch.from_numpy(np.asarray(images, np.float64).transpose(0, 3, 1, 2))


def exported(twin, tmp_path):
    """The twin saved as an official .pth, then `convert export --format hf`."""
    torch.save({k: v.float() for k, v in twin.state_dict().items()}, tmp_path / "official.pth")
    out = tmp_path / "hf"
    convert.main(["export", str(tmp_path / "official.pth"), "--format", "hf", "--out", str(out)])
    return out


def hf_tokens(directory, images):
    model = transformers.AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    return type(model).__name__, out.last_hidden_state.numpy()


def test_a_dino_vit_is_a_vitmodel(tmp_path):
    twin = randomize_(TorchViT(16, 384, 2, 6, img_size=224), 0).double().eval()
    directory = exported(twin, tmp_path)
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    kind, tokens = hf_tokens(directory, images)
    assert kind == "ViTModel"
    with torch.no_grad():
        [want] = twin.get_intermediate_layers(nchw(images), 1)  # the normed tokens
    assert_close(tokens, want.numpy())
    model, variables = dino_jax.load_pretrained(directory)
    assert not model.dinov2 and (model.embed_dim, model.depth, model.patch_size) == (384, 2, 16)
    other = np.random.default_rng(1).normal(size=(1, 96, 128, 3)).astype(np.float32)
    with torch.no_grad():  # away from 224 the official resize (offset 0.1) still holds
        want = twin(nchw(other)).numpy()
    assert_close(dino_jax.extract_features(model, variables, other), want)


@pytest.mark.parametrize("variant", list(DINOV2))
def test_a_dinov2_vit_is_a_dinov2model(tmp_path, variant):
    options, kind = DINOV2[variant]
    twin = randomize_(TorchDinoViT(**SMALL14, **options), 0).double().eval()
    directory = exported(twin, tmp_path)
    # At the model's own size (518 px) transformers does not resize the position embedding;
    # with registers it resizes as the official (to a size, antialiased), so 224 px too.
    sizes = [518, 224] if variant == "registers" else [518]
    for size in sizes:
        images = np.random.default_rng(size).normal(size=(1, size, size, 3)).astype(np.float32)
        got_kind, tokens = hf_tokens(directory, images)
        assert got_kind == kind
        with torch.no_grad():
            out = twin.forward_features(nchw(images))
        want = torch.cat(
            [out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]],
            dim=1,
        )
        assert_close(tokens, want.numpy())
    convert.main(["import", str(directory), "--out", str(tmp_path / "export")])
    model, variables = dino_jax.load_pretrained(tmp_path / "export")  # through convert import
    assert model.dinov2 and model.num_register_tokens == options.get("num_register_tokens", 0)
    images = np.random.default_rng(0).normal(size=(1, 98, 112, 3)).astype(np.float32)
    with torch.no_grad():
        want = twin.forward_features(nchw(images))["x_norm_patchtokens"].numpy()
    got = dino_jax.patch_features(model, variables, images).reshape(1, 56, 384)
    assert_close(got, want)


def test_only_vits_and_known_models(tmp_path, export_dir):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="transformers 'bert' model"):
        hf.load_hf(tmp_path)
    model, variables = dino_jax.load_pretrained(export_dir)
    state = hf.save_hf(model, variables, tmp_path / "tiny")
    assert "encoder.layer.1.attention.attention.query.weight" in state
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 16, 64)
