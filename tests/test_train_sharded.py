"""8 virtual CPU devices: data-parallel and FSDP training match one device; FSDP holds ~1/8 of the state per
device; a checkpoint restores onto a different mesh shape."""

import json

import jax
import numpy as np
import pytest
import train_worker as tw

from jaxdiff import sharding
from jaxdiff.train import loop

pytestmark = pytest.mark.usefixtures("eight_devices")

COMMON = (
    "--config.total_steps=3",
    "--config.log.every_steps=1",
    "--config.checkpoint.every_steps=3",
    "--config.data.global_batch_size=8",
    # unet_tiny.py warms up linearly from 0, so its first step would not move the params: here all three do. SGD
    # (momentum 0.9), not Adam: Adam's first step is lr * sign(g) per element, which turns the rounding noise of
    # near-zero gradients (summed in another order on 8 devices) into lr-sized differences (6e-5 at lr 1e-3, where
    # the gradients agree to 1e-7). SGD's update is linear in the gradient: equal params mean equal gradients.
    "--config.optimizer.name=sgd",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.learning_rate=0.1",
)
MESHES = {
    "one_device": ("--config.mesh.data=1",),
    "data_parallel": ("--config.mesh.data=8",),
    "fsdp": ("--config.mesh.data=1", "--config.mesh.fsdp=8"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, mesh in MESHES.items():
        workdir = tmp_path_factory.mktemp(name)
        devices = jax.devices()[:1] if name == "one_device" else jax.devices()
        loop.train(tw.tiny_config(*COMMON, *mesh), str(workdir), devices=devices)
        metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        out[name] = (workdir, metrics)
    return out


@pytest.fixture(scope="module")
def initial_params():
    config = tw.tiny_config(*COMMON, *MESHES["one_device"])
    return jax.device_get(loop.setup(config, jax.devices()[:1]).init_state().params)


@pytest.mark.parametrize("name", ["data_parallel", "fsdp"])
def test_three_sharded_steps_match_one_device(runs, initial_params, name):
    base_dir, base = runs["one_device"]
    workdir, metrics = runs[name]
    expected, _, _ = tw.load_state(base_dir, 3, *COMMON)
    actual, _, _ = tw.load_state(workdir, 3, *COMMON)
    # Three real updates: a learning rate at every step, and params far beyond the bound below from where they began.
    assert [m["step"] for m in base] == [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["learning_rate"] > 0 and m["grad_norm"] > 0 for m in base)
    assert tw.max_abs_diff(expected.params, initial_params) > 1000 * 1e-5
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(expected.params), jax.tree.leaves(initial_params))]
    assert np.mean(moved) > 0.9, f"only {np.mean(moved):.0%} of the param leaves changed"

    for key in ("loss", "grad_norm", "learning_rate"):  # step by step
        np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in base], rtol=1e-5, atol=0, err_msg=key)
    assert tw.max_abs_diff(actual.params, expected.params) <= 1e-5
    assert tw.max_abs_diff(actual.opt_state, expected.opt_state) <= 1e-5  # the momentum: a sum of the gradients


def test_fsdp_state_takes_an_eighth_of_the_bytes_per_device(runs):
    workdir, _ = runs["fsdp"]
    config = tw.tiny_config(*COMMON, *MESHES["fsdp"])
    state, _, _ = loop.restore(config, str(workdir), 3)
    held = state.params, state.opt_state
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(held))
    per_device = sharding.bytes_per_device(held)
    assert len(per_device) == 8
    assert max(per_device.values()) <= 1.3 * total / 8, (max(per_device.values()), total / 8)
    kernel = state.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.sharding.spec[-1] == "fsdp"
    trace = state.opt_state["unet"][0].trace["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert trace.sharding == kernel.sharding


@pytest.mark.parametrize("mesh", [{"data": 2, "fsdp": 4}, {"data": 1, "fsdp": 2, "tensor": 4}, {"data": 1}])
def test_checkpoint_restores_onto_a_different_mesh_shape(runs, mesh):
    workdir, _ = runs["fsdp"]
    saved, _, _ = tw.load_state(workdir, 3, *COMMON)
    devices = jax.devices()[: int(np.prod(list(mesh.values())))]
    config = tw.tiny_config(*COMMON, *(f"--config.mesh.{k}={v}" for k, v in {"data": 1, "fsdp": 1, **mesh}.items()))
    state, data, meta = loop.restore(config, str(workdir), 3, devices=devices)
    assert tw.bitwise_equal(jax.tree_util.tree_map(np.asarray, state), saved)
    assert {d for leaf in jax.tree_util.tree_leaves(state) for d in leaf.sharding.device_set} == set(devices)
    if mesh.get("fsdp", 1) > 1:
        kernel = state.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
        assert kernel.sharding.mesh.shape["fsdp"] == mesh["fsdp"] and kernel.sharding.spec[-1] == "fsdp"
    assert data["position"] == 3 and meta["step"] == 3
