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
