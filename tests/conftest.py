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


# The slowest test files (minutes each on 2 cores), started first: with two xdist workers
# taking whole files (`--dist loadfile`, the README's test command), a long file started last
# would run alone at the end. Order within a file is kept (the rehearsal's commands share a
# workdir and run in the README's order).
SLOW_FIRST = ("test_organism_finetune.py", "test_rehearsal_families.py", "test_organism_real_path.py",
              "test_rehearsal.py", "test_organism.py", "test_gpu_bench_smoke.py", "test_engine.py",
              "test_cross_trait.py", "test_generate.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
