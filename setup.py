from setuptools import find_packages, setup

setup(
    name="persona_jax",
    version="0.1.0",
    description="Persona vectors (monitor, steer, prevent, flag) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["persona_jax", "persona_jax.*"]),
    package_data={"persona_jax": ["organism/assets/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "transformers>=5.0",
        "safetensors>=0.6",
        "numpy>=2.0",
        "scipy>=1.11",
        "ml-collections>=1.1",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "openai>=1.50",
        "gguf>=0.10",  # llama.cpp control vectors (io/vectors.py export_gguf / import_gguf)
        "pandas>=2.1",  # multiple-choice items from CSV / parquet (method/capability.py)
    ],
    extras_require={
        # peft: the adapter interop reference; pytest-xdist: the suite runs on 2 workers
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "peft>=0.13"],
        "docs": ["sphinx>=8", "myst-parser>=4"],  # the docs site (docs/, built by .ci/run with -W)
        "parquet": ["pyarrow>=14"],  # capability items in .parquet (cais/mmlu's own files)
    },
)
