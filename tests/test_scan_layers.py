"""Transformer stacks as one lax.scan (`scan_layers`): the unrolled model's results, one block in the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import attention_control
from jaxdiff.models.model import create
from jaxdiff.models.unet import ARCHITECTURES

# SDXL's shape in miniature: stacks of 2 and 3 transformer blocks.
CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=12,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(2, 3),
    use_linear_projection=True,
)


def _model(dtype=jnp.float32):
    model = create(ARCHITECTURES["UNet2DConditionModel"], CONFIG, abstract=False, dtype=dtype, attention="xla")
    # Random, not initial, params: the initialisers zero some projections, which would hide a misordered layer.
    leaves, tree = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return model, jax.tree_util.tree_unflatten(tree, params)


def _inputs():
    k = jax.random.split(jax.random.PRNGKey(2), 2)
    x = jax.random.normal(k[0], (2, 8, 8, 4))
    context = jax.random.normal(k[1], (2, 5, 12))
    return x, jnp.array([10.0, 700.0]), context


@pytest.fixture(scope="module")
def models():
    model, params = _model()
    return model, model.with_module(scan_layers=True), params


def test_scanned_stacks_match_the_unrolled_model(models):
    unrolled, scanned, params = models
    a = jax.jit(unrolled.apply)(params, *_inputs())
    b = jax.jit(scanned.apply)(params, *_inputs())
    # Same float32 operations in the same order; XLA may fuse them differently inside the loop body.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_scanned_stacks_give_the_unrolled_gradients(models):
    unrolled, scanned, params = models

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, *_inputs()) ** 2)))(params)

    a, b = grads(unrolled), grads(scanned)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True):
        scale = max(1.0, float(np.max(np.abs(x))))
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-4 * scale, err_msg=str(path))


def test_scanned_stacks_in_bfloat16_stay_with_the_unrolled_model():
    model, params = _model(jnp.bfloat16)
    a = np.asarray(jax.jit(model.apply)(params, *_inputs()), np.float32)
    b = np.asarray(jax.jit(model.with_module(scan_layers=True).apply)(params, *_inputs()), np.float32)
    # The matmul weights are cast to bf16 before stacking (as Dense casts them); the norms stay float32.
    assert np.max(np.abs(a - b)) <= 0.02 * max(1.0, float(np.max(np.abs(a))))


def _dots(model, params) -> int:
    return jax.jit(model.apply).lower(params, *_inputs()).as_text().count("stablehlo.dot_general")


def test_the_program_holds_one_copy_of_each_stacked_block(models):
    unrolled, scanned, params = models
    # Attentions: down 2 + 3 deep, mid 3, up (layers_per_block + 1 = 2 per level) 3, 3, 2, 2: 18 blocks unrolled,
    # 7 scanned bodies. Per block 14 dot_generals: q, k, v, out and the two attention einsums, twice (self, cross),
    # then GEGLU's and the feed-forward's output. Everything else (resnets, proj_in/out) is the same in both.
    saved = _dots(unrolled, params) - _dots(scanned, params)
    assert saved == (18 - 7) * 14


def test_attention_control_sees_every_layer_with_scan_layers_on(models):
    unrolled, scanned, params = models
    _, maps = attention_control.apply_with_maps(scanned, params, *_inputs())
    _, expected = attention_control.apply_with_maps(unrolled, params, *_inputs())
    assert sorted(maps) == sorted(expected)
    assert len(maps) == 2 * 18  # self- and cross-attention of every block
