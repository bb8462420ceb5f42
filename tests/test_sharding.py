"""FSDP over 8 virtual CPU devices: same UNet output as unsharded, ~1/8 of the parameter bytes per device."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from parity import assert_parity

from jaxdiff import sharding
from jaxdiff.models.model import create
from jaxdiff.models.unet import ARCHITECTURES

CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
)


@pytest.mark.usefixtures("eight_devices")
def test_fsdp_sharded_unet_matches_unsharded_with_an_eighth_of_the_bytes():
    model = create(ARCHITECTURES["UNet2DConditionModel"], CONFIG, abstract=False, seed=3)
    mesh = sharding.make_mesh({"fsdp": 8})
    sharded = sharding.shard_params(model.params, model.logical_axes, mesh)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 16, 4)).astype(np.float32)
    t = np.linspace(1, 999, 8).astype(np.float32)
    ctx = rng.standard_normal((8, 5, 32)).astype(np.float32)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    x_s, t_s, ctx_s = (jax.device_put(a, batch) for a in (x, t, ctx))

    expected = jax.jit(model.apply)(model.params, x, t, ctx)
    actual = jax.jit(model.apply)(sharded, x_s, t_s, ctx_s)
    assert_parity(actual, expected, rel=1e-5, what="sharded UNet output")

    total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(model.params))
    per_device = sharding.bytes_per_device(sharded)
    assert len(per_device) == 8
    # Only norm scales/biases and the few tensors with a dimension not divisible by 8 stay replicated.
    assert max(per_device.values()) <= 1.15 * total / 8, (max(per_device.values()), total / 8)


@pytest.mark.usefixtures("eight_devices")
def test_logical_rules_replicate_what_does_not_divide_and_use_each_mesh_axis_once():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    spec = sharding.logical_to_mesh_spec(PartitionSpec("embed", "heads"), (64, 64), mesh)
    assert spec == PartitionSpec("fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(PartitionSpec("embed", "conv_out"), (64, 64), mesh) == PartitionSpec(
        "fsdp", None
    )
    assert sharding.logical_to_mesh_spec(PartitionSpec("embed", "mlp"), (6, 3), mesh) == PartitionSpec(None, None)


def test_mesh_that_does_not_divide_the_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh({"fsdp": 3}, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 2})
