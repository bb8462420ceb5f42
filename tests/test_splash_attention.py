"""Splash attention (the TPU Pallas kernel) equals XLA attention in Pallas' interpret mode, partitions over a mesh,
is what "auto" picks on TPU, and compiles for a TPU topology (libtpu, no chips)."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff import sharding
from jaxdiff.models import attention, splash

# float32 on CPU: the kernel's online softmax and XLA's one-pass softmax differ only by rounding.
ATOL = 2e-5


def _qkv(lq, lk, heads=2, dim=40, batch=2, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (batch, lq, heads, dim))
    k = jax.random.normal(ks[1], (batch, lk, heads, dim))
    v = jax.random.normal(ks[2], (batch, lk, heads, dim))
    return q, k, v


@pytest.mark.parametrize("lq,lk", [(256, 256), (128, 77), (512, 128)])
def test_splash_equals_xla_attention_and_its_gradients(lq, lk):
    """Self-attention, and cross-attention on CLIP's 77 keys (padded to 128 and masked by segment ids)."""
    q, k, v = _qkv(lq, lk)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, implementation=impl)))

    np.testing.assert_allclose(
        attention.dot_product_attention(q, k, v, implementation="splash"),
        attention.dot_product_attention(q, k, v, implementation="xla"),
        atol=ATOL,
    )
    grads = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_unsupported_shapes_and_masks_fall_back_to_xla():
    q, k, v = _qkv(64, 64)  # 64 queries: below the kernel's 128-row block
    assert not splash.supported(q, k)
    np.testing.assert_array_equal(
        attention.dot_product_attention(q, k, v, implementation="splash"),
        attention.dot_product_attention(q, k, v, implementation="xla"),
    )
    q, k, v = _qkv(128, 128)
    mask = jnp.ones((1, 1, 128, 128), bool)
    assert splash.supported(q, k) and not splash.supported(q, k, mask)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.attention(*_qkv(64, 64))


def test_auto_picks_splash_on_tpu_only_where_it_fits():
    q128, q64 = jnp.zeros((1, 128, 8, 40)), jnp.zeros((1, 64, 8, 40))
    assert attention.auto_implementation(q128, None, "tpu") == "splash"
    assert attention.auto_implementation(q64, None, "tpu") == "xla"
    assert attention.auto_implementation(q128, jnp.ones((1, 1, 128, 128), bool), "tpu") == "xla"
    assert attention.auto_implementation(q128, None, "cpu") == "chunked"


def test_partitioned_over_a_mesh_equals_one_device():
    """Batch over fsdp, heads over tensor (shard_map around the kernel); a batch the axes do not divide replicates."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def grad_q(q, k, v):
        return jax.grad(lambda q: jnp.sum(attention.dot_product_attention(q, k, v, implementation="splash") ** 2))(q)

    for batch in (4, 1):
        q, k, v = _qkv(128, 77, heads=4, batch=batch)
        fn = jax.jit(splash.traced_over(mesh, grad_q), in_shardings=(rows,) * 3 if batch == 4 else None)
        assert "manual_computation" in fn.lower(q, k, v).as_text()  # shard_map
        np.testing.assert_allclose(fn(q, k, v), grad_q(q, k, v), atol=1e-4)
    assert splash.current_mesh() is None  # the context ends with the trace


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the tpu-aot extra)")
def test_compiles_for_a_tpu_topology_as_a_pallas_kernel():
    """XLA:TPU compiles the kernel (Mosaic custom call) for v5e devices, forward and backward, sharded over four."""
    from jax.experimental import topologies

    # As tools/aot_compile.py: no pod to look for, and other processes may hold libtpu (compiling holds no chip).
    for key, value in (
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(key, value)
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    shapes = [jax.ShapeDtypeStruct((8, n, 8, 40), jnp.bfloat16, sharding=rows) for n in (1024, 77, 77)]

    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, platform="tpu")  # auto: splash on TPU at 1024 queries
        return jnp.sum(out.astype(jnp.float32) ** 2)

    lowered = jax.jit(splash.traced_over(mesh, jax.grad(loss, argnums=(0, 1, 2)))).lower(*shapes)
    assert "tpu_custom_call" in lowered.as_text()
    compiled = lowered.compile()
    # The [8 heads, 1024, 128] probabilities of XLA attention are never materialised: far less than one copy.
    probabilities = 2 * 8 * 1024 * 128 * 2
    assert compiled.memory_analysis().temp_size_in_bytes < probabilities
    assert math.prod(compiled.input_shardings[0][0].shard_shape((8, 1024, 8, 40))) == 2 * 1024 * 8 * 40
