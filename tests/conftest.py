"""Test setup: 8 simulated CPU devices (must be set before JAX is imported)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """XLA:CPU maps memory for every program it compiles, and keeps it while the program
    is cached. The whole suite in one process compiles enough programs to pass Linux's
    default `vm.max_map_count` (65,530 mappings), after which a later compile segfaults.
    Dropping each test module's compiled programs keeps the count bounded."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()

