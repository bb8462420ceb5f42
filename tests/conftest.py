"""Test setup: 8 virtual CPU devices for sharding tests, a persistent compilation cache, float32 parity helpers."""

import os

import pytest

DEVICES = 8
# Always 8 virtual devices, whatever XLA_FLAGS already holds (a device count there is replaced, the rest kept): the
# sharding tests assert they have them instead of skipping.
_flags = [
    f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
]
# The tests' programs are tiny, so XLA's compile time dominates the suite: compiling them without the CPU backend's
# expensive optimisations halves its CPU time (measured on the cache-schedule and erase-command files: 417 s -> 208 s
# of CPU, every test still passing). JAXDIFF_TEST_XLA_OPT=1 keeps XLA's default optimisation instead.
_fast_compile = (
    []
    if os.environ.get("JAXDIFF_TEST_XLA_OPT") == "1"
    else [
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
)
_flags = [f for f in _flags if f.split("=")[0] not in {g.split("=")[0] for g in _fast_compile}]
os.environ["XLA_FLAGS"] = " ".join([*_flags, *_fast_compile, f"--xla_force_host_platform_device_count={DEVICES}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "JAXDIFF_TEST_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The commands the tests run as subprocesses (kill -9 and resume, multi-process, the CLI) share the cache: a rerun
# of the same command loads its programs instead of compiling them again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 devices the multi-device tests run on: fewer is a failure, never a silent skip."""
    devices = jax.devices()
    assert len(devices) >= DEVICES, (
        f"{len(devices)} {jax.default_backend()} device(s), the test needs {DEVICES} "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r})"
    )
    return devices[:DEVICES]


# The slowest files first (per-file seconds from the CI rehearsal's --durations, largest first), then the rest by
# their number of tests: run with `--dist loadfile --no-loadscope-reorder` (tools/test.sh), the two workers start on
# the long files and fill the end with short ones, instead of xdist's default order (most tests first), which left
# the single-test multi-host and resume files for last and one worker idle for minutes.
SLOW_FIRST = (
    "test_train_resume.py",
    "test_train_multihost.py",
    "test_train_sharded.py",
    "test_erase_command.py",
    "test_runner_faults.py",
    "test_distill_dmd2.py",
    "test_distill_sid.py",
    "test_aot_tpu.py",
    "test_distill_scm.py",
    "test_cache_schedules.py",
    "test_bench_gpu.py",
    "test_dreambooth_full.py",
    "test_distill_lcm.py",
    "test_train_pipeline_data.py",
    "test_attencraft.py",
    "test_distill_command.py",
    "test_evaluate_command.py",
    "test_shapes_models.py",
    "test_train_step.py",
    "test_attention_control.py",
    "test_prospect.py",
    "test_dreamcreature.py",
    "test_personalize_command.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Order the collected tests file by file: SLOW_FIRST, then the other files by their number of tests (the order
    within a file is kept)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1

    def rank(name: str) -> tuple[int, int, str]:
        if name in SLOW_FIRST:
            return (SLOW_FIRST.index(name), 0, name)
        return (len(SLOW_FIRST), -counts[name], name)

    order = {name: rank(name) for name in counts}
    items.sort(key=lambda item: order[item.path.name])  # stable: a file's own order stays
