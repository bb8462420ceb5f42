"""Parameter selectors: named selectors on a tiny UNet, regex / callable / pytree forms, split/combine, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import selectors
from jaxdiff.models import unet
from jaxdiff.models.model import create

# The smallest UNet with a cross-attention transformer (one, in the down block).
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8,),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=12,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("UpBlock2D",),
    mid_block_type=None,
    attention_head_dim=2,
)


@pytest.fixture(scope="module")
def params():
    # Abstract params (ShapeDtypeStructs): selectors only read paths and leaves, nothing is computed.
    return create(unet.ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=True, attention="einsum").params


def _names(params, selector):
    return {selectors.path_str(p) for p in selectors.selected_paths(params, selector)}


def test_named_selectors_pick_exactly_the_expected_leaves(params):
    flat = {selectors.path_str(p) for p in selectors.flatten(params)}
    attn2 = {p for p in flat if "/attn2/" in p}
    assert _names(params, "esd-x") == attn2 == _names(params, "xattn")  # attn2 holds only Linear layers
    assert len(attn2) == 5  # to_q, to_k, to_v kernels, to_out_0 kernel + bias
    strict = _names(params, "esd-x-strict")
    assert strict == {p for p in attn2 if p.endswith(("to_k/kernel", "to_v/kernel"))} and len(strict) == 2
    assert _names(params, "cross-attn-kv") == strict
    linear = {p for p in flat if p.rsplit("/", 1)[0] + "/kernel" in flat}
    assert _names(params, "esd-u") == linear - attn2
    assert _names(params, "esd-all") == linear
    assert "conv_in/kernel" in _names(params, "esd-u") and "time_embedding/linear_1/bias" in _names(params, "esd-u")
    assert not any(p.endswith("scale") for p in _names(params, "esd-u"))  # norms are not Linear/Conv
    outside = ("time_embedding", "conv_out", "conv_norm_out")
    noxattn = _names(params, "noxattn")
    assert noxattn == {p for p in flat - attn2 if not p.startswith(outside)}
    assert any(p.endswith("norm1/scale") for p in noxattn)
    assert _names(params, "notime") == {p for p in flat if not p.startswith(outside)}
    assert _names(params, "selfattn") == {p for p in flat if "/attn1/" in p}
    assert _names(params, "full") == flat
    assert _names(params, "trce") == {p for p in flat if "/attn1/" in p or "/attn2/to_q/" in p}
    sites = _names(params, "transformers")
    assert sites == {p for p in linear if "/attentions_" in p}
    assert any("proj_in" in p for p in sites) and any("ff/net_0/proj" in p for p in sites)
    assert not any("resnets" in p or "/norm" in p for p in sites)


def test_regex_callable_and_pytree_forms(params):
    flat = {selectors.path_str(p): leaf for p, leaf in selectors.flatten(params).items()}
    # any other string is a regex searched in the "a/b/c" path
    assert _names(params, r"attn2/to_[kv]/") == _names(params, "cross-attn-kv")
    assert _names(params, "^conv_in/") == {"conv_in/bias", "conv_in/kernel"}
    # None and "" select everything
    assert _names(params, None) == _names(params, "") == set(flat)
    # a callable gets the path string and the leaf
    convs = _names(params, lambda path, leaf: len(leaf.shape) == 4)
    assert convs == {p for p, leaf in flat.items() if len(leaf.shape) == 4} and "conv_in/kernel" in convs
    # a full pytree of bools, and a prefix of one broadcast over the subtrees it names
    m = selectors.mask(params, "esd-x")
    assert selectors.mask(params, m) == m
    assert jax.tree_util.tree_structure(m) == jax.tree_util.tree_structure(params)
    prefix = {k: k == "conv_in" for k in params}
    assert _names(params, prefix) == {"conv_in/bias", "conv_in/kernel"}
    # masks are Python bools (usable by optax.masked and in Python conditions)
    assert all(type(b) is bool for b in jax.tree_util.tree_leaves(m)) and sum(jax.tree_util.tree_leaves(m)) == 5


def test_a_name_takes_priority_over_the_regex_reading(params):
    # "xattn" matches no path as a regex, "full" neither: both are names
    assert _names(params, "xattn") and len(_names(params, "full")) == len(selectors.flatten(params))


def test_selecting_nothing_is_a_clear_error(params):
    for selector in ("nope", "attn3", lambda p, leaf: False, jax.tree_util.tree_map(lambda _: False, params)):
        with pytest.raises(ValueError, match="selects no parameter") as err:
            selectors.mask(params, selector)
        assert "esd-x" in str(err.value) and "cross-attn-kv" in str(err.value)  # the named selectors are listed
        assert "down_blocks_0/" in str(err.value) or "conv_in/" in str(err.value)  # what paths look like
    with pytest.raises(ValueError, match="not a valid regex"):
        selectors.mask(params, "attn2(")
    with pytest.raises(ValueError, match="selects no parameter"):
        selectors.split(params, "nope")


def test_split_and_combine_round_trip():
    tree = {"a": {"attn2": {"kernel": jnp.ones(2), "bias": jnp.zeros(2)}}, "b": {"kernel": jnp.ones((2, 2))}}
    selected, rest = selectors.split(tree, "xattn")
    assert selectors.flatten(selected).keys() == {("a", "attn2", "kernel"), ("a", "attn2", "bias")}
    assert selectors.flatten(rest).keys() == {("b", "kernel")}
    back = selectors.combine(selected, tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        assert a is b
    new = selectors.combine({"b": {"kernel": jnp.zeros((2, 2))}}, tree)
    np.testing.assert_array_equal(new["b"]["kernel"], 0.0)
    assert new["a"]["attn2"]["kernel"] is tree["a"]["attn2"]["kernel"]
    with pytest.raises(KeyError, match="c/kernel"):
        selectors.combine({"c": {"kernel": jnp.zeros(1)}}, tree)


def test_path_str_of_key_paths_and_name_tuples():
    tree = {"down": [{"conv": jnp.zeros(1)}]}
    ((path, _),) = jax.tree_util.tree_leaves_with_path(tree)
    assert selectors.path_str(path) == "down/0/conv"
    assert selectors.path_str(("down_blocks_0", "attn2", "kernel")) == "down_blocks_0/attn2/kernel"
    assert selectors.unflatten(selectors.flatten({"a": {"b": 1}})) == {"a": {"b": 1}}
