"""Helpers for the trainer tests: the tiny config, data sources with injected faults, running `jaxdiff train` in a
subprocess with the shared compilation cache, and reading a run's checkpoint back as numpy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import numpy as np

from jaxdiff.config import load_config
from jaxdiff.train import config as config_lib
from jaxdiff.train import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "train", "unet_tiny.py")


def tiny_config(*overrides: str):
    return config_lib.apply_overrides(
        load_config(TINY),
        ["--config.log.progress=false", "--config.log.tensorboard=false", *overrides],
    )


class SlowSource(data_lib.SyntheticSource):
    """Synthetic records that take a while to read, so a subprocess can be killed mid-run."""

    def __getitem__(self, index):
        time.sleep(0.03)
        return super().__getitem__(index)


class NaNSource(data_lib.SyntheticSource):
    """Synthetic records; record NAN_INDEX's latents are NaN."""

    nan_index = 0

    def __getitem__(self, index):
        record = super().__getitem__(index)
        if index == self.nan_index:
            record["latents"] = np.full_like(record["latents"], np.nan)
        return record


def slow_source(data_config):
    return SlowSource(**dict(data_config.synthetic), seed=data_config.seed)


def nan_source(data_config):
    source = NaNSource(**dict(data_config.synthetic), seed=data_config.seed)
    source.nan_index = int(os.environ.get("NAN_INDEX", "0"))
    return source


def xla_flags_without_device_count() -> str:
    """This process's XLA flags (conftest's fast-compile ones) less the device count, which each subprocess sets."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if not f.startswith("--xla_force_host_platform_device_count"))


def env(devices: int = 1, **extra) -> dict:
    """A subprocess's environment: `devices` CPU devices and the same compile flags and cache as the tests."""
    e = dict(os.environ)
    e.update(
        XLA_FLAGS=f"{xla_flags_without_device_count()} --xla_force_host_platform_device_count={devices}".strip(),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
        JAX_COMPILATION_CACHE_DIR=os.environ.get("JAXDIFF_TEST_CACHE", os.path.join(ROOT, ".jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train_command(workdir, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxdiff",
        "train",
        "--config",
        TINY,
        "--workdir",
        str(workdir),
        "--config.log.progress=false",
        *overrides,
    ]


def run_train(workdir, *overrides: str, devices: int = 1, timeout: float = 900, **extra) -> subprocess.CompletedProcess:
    result = subprocess.run(
        train_command(workdir, *overrides),
        env=env(devices, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise AssertionError(f"jaxdiff train failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def committed_steps(workdir) -> list[int]:
    folder = os.path.join(str(workdir), "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def load_state(workdir, step=None, *overrides: str, devices=None):
    """A run's checkpointed TrainState as numpy arrays (restored onto `devices`, default one device)."""
    from jaxdiff.train import loop

    config = tiny_config(*overrides)
    state, data, meta = loop.restore(config, str(workdir), step, devices=devices or jax.devices()[:1])
    return jax.tree_util.tree_map(np.asarray, state), data, meta


def max_abs_diff(a, b) -> float:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
        for x, y in zip(leaves_a, leaves_b)
    )


def bitwise_equal(a, b) -> bool:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(leaves_a, leaves_b)
    )


def _restore_main(workdir: str, out: str, *overrides: str) -> None:
    """Under launch/local.sh: restore the run's latest checkpoint onto this job's mesh (all processes), gather it,
    and let process 0 write the params to `out` (.npz)."""
    from jax.experimental import multihost_utils

    from jaxdiff.train import distributed, loop
    from jaxdiff.train import state as state_lib

    distributed.initialize_distributed_from_env()
    state, data, meta = loop.restore(tiny_config(*overrides), workdir)
    kernel = state.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert len(kernel.sharding.device_set) == jax.device_count() > len(jax.local_devices())
    gathered = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        flat = {state_lib.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(gathered)}
        np.savez(out, **flat, __step=np.int64(meta["step"]), __position=np.int64(data["position"]))


if __name__ == "__main__":
    if sys.argv[1] == "restore":
        _restore_main(*sys.argv[2:])
