"""Test setup: 8 simulated CPU devices (must be set before JAX is imported)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gc  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent compilation cache per test run, as the runners use one per user: made by
# the first process that loads this file (pytest's controller, before it starts the xdist
# workers), inherited through the environment by the workers and by the rehearsal's runner
# subprocesses, so a program compiled once is loaded from disk everywhere after. A fresh
# folder each run: tests never see programs left by an earlier run.
_OWN_CACHE = "PERSONA_JAX_COMPILATION_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["PERSONA_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="persona_jax_jax_cache_")

from persona_jax.runtime import compile_cache  # noqa: E402

compile_cache.enable()


def pytest_unconfigure(config):
    if _OWN_CACHE:  # the process that made the folder (the controller) removes it
        import shutil
        shutil.rmtree(os.environ["PERSONA_JAX_COMPILATION_CACHE"], ignore_errors=True)


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



# ---- order and units of work on the two pytest-xdist workers -------------------------
# The tests that take minutes, longest first (measured with `--durations` in `.ci/run`):
# started first, so the two workers end together instead of one running the organism's
# fine-tuning alone at the end. Each fragment matches a scheduling unit (below).
SLOW_FIRST = ("test_organism_finetune.py", "test_rehearsal.py",
              "test_organism_real_path.py", "test_organism.py", "test_gpu_bench_smoke.py", "test_engine.py")


def _unit(nodeid: str) -> str:
    """The scheduling unit of a test: its file, except that each rehearsal target (a
    checkpoint whose README commands share one workdir, in order) is a unit of its own, so
    the targets of one file spread over the workers."""
    path, _, rest = nodeid.partition("::")
    if path.rsplit("/", 1)[-1].startswith("test_rehearsal") and "[" in rest:
        return f"{path}::{rest.split('[', 1)[1].split('-', 1)[0]}"
    return path


def _slowness(nodeid: str) -> int:
    name = nodeid.partition("::")[0].rsplit("/", 1)[-1]
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)


def pytest_collection_modifyitems(config, items):
    # stable: the order within a file (and a rehearsal target's command order) is kept
    items.sort(key=lambda item: _slowness(item.nodeid))


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the rehearsal targets as units, handed out in collection
    order (slowest first) rather than by xdist's count of tests per unit."""
    from xdist.scheduler import LoadScopeScheduling

    class RehearsalAwareFileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _unit(nodeid)

    config.option.loadscopereorder = False
    return RehearsalAwareFileScheduling(config, log)
