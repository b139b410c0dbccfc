"""ViT backbones in and out of Hugging Face `transformers`' layout: a directory with config.json
and model.safetensors.

DINO's ViTs are written as `ViTModel` (without the pooler, as the hub's `facebook/dino-*`
checkpoints), DINOv2's as `Dinov2Model`, with registers as `Dinov2WithRegistersModel`, under the
hub's parameter names (`encoder.layer.{i}.attention.attention.query`, ...), which every
`transformers` version loads. Going through the official state dict (`state_dict.py`) keeps one
set of name rules per format. `transformers` resizes position embeddings to a size (bicubic,
antialiased with registers), so its features equal ours at the model's own resolution; loaded
here, a directory gives the official model, which resizes as the official code does.
"""

from __future__ import annotations

import json
import re

import numpy as np
from etils import epath

from dino_jax.core.config import base_config
from dino_jax.interop.state_dict import (
    DINOV2_WIDTHS,
    VIT_WIDTHS,
    backbone_key,
    from_state_dict,
    set_registers,
    to_state_dict,
)
from dino_jax.models import ARCH_SPECS, VisionTransformer, backbone_of
from dino_jax.models.layers import LN_EPS

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

# Official (dino / dinov2 state dict) name -> the hub's, per block and outside the blocks.
_BLOCK = {
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
}
_VIT_BLOCK = {  # ViTModel's names where Dinov2Model's differ
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_OUTSIDE = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
_QKV = ("query", "key", "value")


def is_hf_dir(path: epath.Path) -> bool:
    return (path / CONFIG_FILE).exists() and (path / WEIGHTS_FILE).exists()


def _rename(key: str, table: dict[str, str]) -> str:
    """`key` with its longest prefix found in `table` replaced."""
    for old in sorted(table, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return table[old] + key[len(old) :]
    return key


def hf_config(model: VisionTransformer) -> dict:
    """The transformers config.json of a ViT backbone."""
    common = {
        "hidden_size": model.embed_dim,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "hidden_act": "gelu",  # exact erf GELU in transformers
        "layer_norm_eps": LN_EPS,
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
    }
    if not model.dinov2:
        intermediate = int(model.embed_dim * model.mlp_ratio)
        return {
            "model_type": "vit",
            "architectures": ["ViTModel"],
            **common,
            "intermediate_size": intermediate,
        }
    config = {
        **common,
        "mlp_ratio": int(model.mlp_ratio),  # transformers takes an int
        "layerscale_value": 1.0 if model.layerscale is None else model.layerscale,
        "use_swiglu_ffn": model.ffn_layer != "mlp",
    }
    if model.num_register_tokens:
        registers = {"num_register_tokens": model.num_register_tokens}
        kind = {
            "model_type": "dinov2_with_registers",
            "architectures": ["Dinov2WithRegistersModel"],
        }
        return {**kind, **config, **registers}
    return {"model_type": "dinov2", "architectures": ["Dinov2Model"], **config}


def to_hf_state(model: VisionTransformer, variables: dict) -> dict[str, np.ndarray]:
    """A ViT backbone's variables as the hub's state dict (float32 NumPy)."""
    official = to_state_dict(variables, backbone_key)
    block_names = _BLOCK if model.dinov2 else {**_BLOCK, **_VIT_BLOCK}
    state = {}
    for key, value in official.items():
        block = re.match(r"blocks\.(\d+)\.(.*)", key)
        if block is None:
            state[_rename(key, _OUTSIDE)] = value
            continue
        prefix, rest = f"encoder.layer.{block.group(1)}.", block.group(2)
        if rest.startswith("attn.qkv."):
            leaf = rest.rsplit(".", 1)[1]
            for name, part in zip(_QKV, np.split(value, 3, axis=0), strict=True):
                state[f"{prefix}attention.attention.{name}.{leaf}"] = part
            continue
        state[prefix + _rename(rest, block_names)] = value
    if model.dinov2 and model.layerscale is None:  # Dinov2Model always scales: by ones
        for i in range(model.depth):
            for j in (1, 2):
                state[f"encoder.layer.{i}.layer_scale{j}.lambda1"] = np.ones(model.embed_dim)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


def save_hf(model: VisionTransformer, variables: dict, directory: str | epath.PathLike) -> dict:
    """Writes config.json and model.safetensors of a ViT backbone to `directory`, which
    `transformers.AutoModel.from_pretrained` loads. Returns the state dict written."""
    from safetensors.numpy import save_file

    if not isinstance(model, VisionTransformer):
        raise ValueError(f"Hugging Face export is for ViTs; got a {type(model).__name__}.")
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = to_hf_state(model, variables)
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config(model), indent=2) + "\n")
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return state


def _from_hf_state(state: dict[str, np.ndarray], dinov2: bool) -> dict[str, np.ndarray]:
    """The hub's state dict back in the official layout (the inverse of `to_hf_state`)."""
    outside = {v: k for k, v in _OUTSIDE.items()}
    block_names = {v: k for k, v in (_BLOCK if dinov2 else {**_BLOCK, **_VIT_BLOCK}).items()}
    official: dict[str, np.ndarray] = {}
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        block = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if block is None:
            if not key.startswith("pooler."):  # ViTModel's pooler is no part of the backbone
                official[_rename(key, outside)] = value
            continue
        index, rest = int(block.group(1)), block.group(2)
        qkv = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if qkv:
            parts.setdefault((index, qkv.group(2)), {})[qkv.group(1)] = value
            continue
        official[f"blocks.{index}.{_rename(rest, block_names)}"] = value
    for (index, leaf), qkv in parts.items():
        official[f"blocks.{index}.attn.qkv.{leaf}"] = np.concatenate([qkv[n] for n in _QKV])
    return official


def load_hf(directory: str | epath.PathLike):
    """(backbone module, variables, config) of a transformers directory of a ViTModel,
    Dinov2Model or Dinov2WithRegistersModel, as the official model of those weights."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    directory = epath.Path(directory)
    hf = json.loads((directory / CONFIG_FILE).read_text())
    kind = hf.get("model_type")
    if kind not in ("vit", "dinov2", "dinov2_with_registers"):
        raise ValueError(
            f"{directory} holds a transformers {kind!r} model; dino_jax reads vit, dinov2 and "
            "dinov2_with_registers."
        )
    dinov2 = kind != "vit"
    width = hf["hidden_size"]
    widths = DINOV2_WIDTHS if dinov2 else VIT_WIDTHS
    if width not in widths:
        raise ValueError(f"{directory}: hidden_size {width} is none of the official ViTs.")
    config = base_config()
    s = config.student
    s.arch, heads = widths[width]
    s.patch_size, s.img_size = hf["patch_size"], hf["image_size"]
    s.depth, s.num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    if s.depth == ARCH_SPECS[s.arch].depth:
        s.depth = None
    if s.num_heads == heads:
        s.num_heads = None
    state = load_file(str(directory / WEIGHTS_FILE))
    if dinov2:
        s.layerscale = float(hf.get("layerscale_value", 1.0))
        s.ffn_layer = "swiglufused" if hf.get("use_swiglu_ffn") else "mlp"
        set_registers(s, int(hf.get("num_register_tokens", 0)))
    model = backbone_of(config)
    side = s.patch_size * 2
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
    official = _from_hf_state(state, dinov2)
    variables = from_state_dict(official, abstract, backbone_key, f"model in {directory}")
    return model, variables, config
