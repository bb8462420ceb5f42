"""jaxdiff: functional, sharded Stable-Diffusion-family models in JAX/Flax for erasure, distillation and measurement."""

from setuptools import find_packages, setup

# Ranges admit both the CPU development machines (Python 3.11, jax 0.10) and GPU hosts (Python 3.12,
# jax 0.11); `constraints.txt` pins the exact versions the README and CI install.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1,<2",
    "transformers>=5,<6",
    "numpy>=1.26",
    "ml_dtypes>=0.5",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pillow>=10",
]

EXTRAS = {
    # PyTorch only for importing .bin/.ckpt pickles and for the reference tests; the CPU wheel is pinned exactly.
    "torch": ["torch==2.13.0"],
    "reference": ["torch==2.13.0", "diffusers>=0.40,<0.43"],
    "data": ["tensorflow-datasets>=4.9.6,<5"],
    # Adaptive teacher ODE solvers for distillation pairs (pairs.scheduler="tsit5"/"dopri5"); 0.7.2 resolves with
    # jax 0.10.2 (Python 3.11) and jax 0.11 (Python 3.12).
    "distill": ["diffrax>=0.7.2,<0.8"],
    "test": [
        "torch==2.13.0",
        "diffusers>=0.40,<0.43",
        "pytest>=8",
        "pytest-xdist>=3.6,<4",
        "tensorflow-datasets>=4.9.6,<5",
        "diffrax>=0.7.2,<0.8",
    ],
    # Accelerator builds of jax (see README): pip install -e ".[cuda]" or ".[tpu]".
    "cuda": ["jax[cuda12]>=0.10.2,<0.12"],
    "tpu": ["jax[tpu]>=0.10.2,<0.12"],
    # libtpu on any host (no TPU chips needed): tools/aot_compile.py and tests/test_aot_tpu.py compile for TPU
    # topologies with it. jax[tpu] pins the libtpu that matches jax, so jax and jaxlib stay as they are.
    "tpu-aot": ["jax[tpu]>=0.10.2,<0.12"],
}

setup(
    name="jaxdiff",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["jaxdiff", "jaxdiff.*"]),
    package_data={"jaxdiff": ["assets/**/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["jaxdiff=jaxdiff.cli:main"]},
)
