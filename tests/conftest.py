"""Test setup: 8 virtual CPU devices for sharding tests, a persistent compilation cache, float32 parity helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAXDIFF_TEST_CACHE", _CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

