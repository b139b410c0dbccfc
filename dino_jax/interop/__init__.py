"""Interoperation with other formats: the official state dicts and Hugging Face directories <->
Flax variables, training states from official checkpoints and other runs, and the public Python
API (`dino_jax.load_pretrained`, features, attention) over any of them."""
