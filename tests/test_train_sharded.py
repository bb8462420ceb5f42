"""8 virtual CPU devices: data-parallel and FSDP training match one device; FSDP holds ~1/8 of the state per
device; a checkpoint restores onto a different mesh shape."""

import json

import jax
import numpy as np
import pytest
import train_worker as tw

from jaxdiff import sharding
from jaxdiff.train import loop

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)

COMMON = (
    "--config.total_steps=3",
    "--config.log.every_steps=1",
    "--config.checkpoint.every_steps=3",
    "--config.data.global_batch_size=8",
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
        losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        out[name] = (workdir, losses)
    return out


@pytest.mark.parametrize("name", ["data_parallel", "fsdp"])
def test_three_sharded_steps_match_one_device(runs, name):
    base_dir, base_losses = runs["one_device"]
    workdir, losses = runs[name]
    assert len(losses) == 3
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5, atol=0)
    expected, _, _ = tw.load_state(base_dir, 3, *COMMON)
    actual, _, _ = tw.load_state(workdir, 3, *COMMON)
    assert tw.max_abs_diff(actual.params, expected.params) <= 1e-5
    assert tw.max_abs_diff(actual.opt_state, expected.opt_state) <= 1e-5


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
    mu = state.opt_state["unet"][0].mu["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert mu.sharding == kernel.sharding


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
