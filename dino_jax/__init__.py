"""dino_jax: DINO self-supervised vision training in JAX/Flax."""

__version__ = "0.1.0"
