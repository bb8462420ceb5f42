"""Multi-host on one machine: 2 processes x 2 CPU devices (jax.distributed, gloo, 127.0.0.1) train three steps,
save, restore, and match 1 process x 4 devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_worker as tw

from jaxdiff.train import state as state_lib

OVERRIDES = (
    "--config.total_steps=3",
    "--config.checkpoint.every_steps=3",
    "--config.log.every_steps=1",
    "--config.mesh.data=4",
)


def _local_sh(*args, timeout=900):
    env = tw.env(devices=2, CPU_DEVICES=2, PYTHON=sys.executable)
    env["XLA_FLAGS"] = tw.xla_flags_without_device_count()  # local.sh sets the device count per process
    result = subprocess.run(
        ["bash", os.path.join(tw.ROOT, "launch", "local.sh"), "2", *args],
        env=env,
        cwd=tw.ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"launch/local.sh failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("eight_devices")  # restores the 4-device runs here
def test_two_processes_of_two_devices_match_one_process_of_four(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    # The single-process reference runs alongside (it mostly waits for its compile-cache hits).
    reference = subprocess.Popen(
        tw.train_command(single, *OVERRIDES),
        env=tw.env(devices=4),
        cwd=tw.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = _local_sh("--config", tw.TINY, "--workdir", str(multi), "--config.log.progress=false", *OVERRIDES)
    out, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, out
    assert "2 process(es)" in run.stdout and "mesh {'data': 4" in run.stdout
    assert tw.committed_steps(multi) == [3] == tw.committed_steps(single)

    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-6)
    devices = jax.devices()[:4]
    expected, _, _ = tw.load_state(single, 3, *OVERRIDES, devices=devices)
    actual, data, _ = tw.load_state(multi, 3, *OVERRIDES, devices=devices)  # written by 2 processes
    assert data["position"] == 3
    assert tw.max_abs_diff(actual.params, expected.params) <= 1e-6
    assert tw.max_abs_diff(actual.opt_state, expected.opt_state) <= 1e-6

    # Restore under jax.distributed onto the 2 x 2 mesh (each process reads its own shards), gather, compare.
    npz = tmp_path / "restored.npz"
    _local_sh(
        "--exec",
        sys.executable,
        os.path.join(tw.ROOT, "tests", "train_worker.py"),
        "restore",
        str(multi),
        str(npz),
        *OVERRIDES,
    )
    restored = np.load(npz)
    assert int(restored["__step"]) == 3 and int(restored["__position"]) == 3
    for path, leaf in jax.tree_util.tree_leaves_with_path(actual.params):
        np.testing.assert_array_equal(restored[state_lib.path_str(path)], leaf)
