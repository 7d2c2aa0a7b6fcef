"""nsync-jax: style learning for Stable Diffusion in JAX/Flax (NSYNC, Textual Inversion and relatives).

Exact, tested pins live in requirements.txt (install with `pip install -r requirements.txt -e .`);
the ranges here are what the code needs.
"""
from setuptools import find_packages, setup

setup(
    name="nsync_jax",
    version="0.1.0",
    description="NSYNC contrastive style learning for Stable Diffusion in JAX/Flax",
    python_requires=">=3.11",
    # configs/ (one experiment per file) installs as nsync_jax.configs: `nsync-jax demo` and `toyworld pretrain`
    # read their settings there.
    packages=find_packages(include=["nsync_jax", "nsync_jax.*"]) + ["nsync_jax.configs"],
    package_dir={"nsync_jax.configs": "configs"},
    # The bundled toy-world model, its judge and CLIP's BPE merges; the configs of the standard Stable Diffusion
    # architectures, for single-file checkpoints.
    package_data={"nsync_jax.toyworld": ["assets/*", "assets/*/*", "assets/*/*/*"],
                  "nsync_jax": ["architectures/*/*.json", "architectures/*/*/*.json"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "numpy>=2.0",
        "pillow",
        "tqdm",
        "tensorboardX",
    ],
    extras_require={
        # torch (CPU build) reads `.bin`/`.pt` files and writes A1111 `.pt` embeddings.
        "torch": ["torch==2.13.0"],
        # converting single-file (A1111 / LDM layout) checkpoints, once each, with diffusers' own converters.
        "single-file": ["torch==2.13.0", "diffusers==0.42.1"],
        # the parity oracle: diffusers/transformers PyTorch models on CPU.
        "test": ["torch==2.13.0", "diffusers==0.42.1", "accelerate", "peft", "pytest"],
    },
    entry_points={"console_scripts": ["nsync-jax=nsync_jax.cli:main"]},
)
