"""dino_jax: DINO self-supervised vision training in JAX/Flax."""

__version__ = "0.1.0"

# The public helpers of dino_jax.interop.hub, imported on first use so that `import dino_jax`
# stays light.
_HUB = (
    "load_pretrained",
    "extract_features",
    "patch_features",
    "attention_maps",
    "forward_features",
    "intermediate_layers",
    "get_intermediate_layers",
)


def __getattr__(name: str):
    if name in _HUB:
        from dino_jax.interop import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'dino_jax' has no attribute {name!r}")
