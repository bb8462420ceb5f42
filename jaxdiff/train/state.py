"""The train state pytree (step, params, optimiser states, EMA, rng, data position) and its mesh shardings."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import sharding as sharding_lib

# A selector of trainable leaves: None (all), a regex searched in "a/b/c" leaf paths, a callable
# (path_string, leaf) -> bool, or a pytree of bools shaped like the params.
Selector = Any


def path_str(path) -> str:
    """ "down_blocks_0/resnets_0/conv1/kernel" for a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def mask(params: Any, selector: Selector) -> Any:
    """A pytree of Python bools shaped like `params`: which leaves train."""
    if selector is None or selector == "":
        return jax.tree_util.tree_map(lambda _: True, params)
    if isinstance(selector, str):
        pattern = re.compile(selector)
        fn: Callable = lambda path, leaf: bool(pattern.search(path))
    elif callable(selector):
        fn = selector
    else:
        return jax.tree_util.tree_map(bool, selector)
    result = jax.tree_util.tree_map_with_path(lambda p, leaf: bool(fn(path_str(p), leaf)), params)
    if not any(jax.tree_util.tree_leaves(result)):
        raise ValueError(f"the trainable selector {selector!r} selects no parameter")
    return result


def partition(tree: Any, selected: Any) -> tuple[Any, Any]:
    """(selected leaves, other leaves): two trees shaped like `tree` with None where a leaf belongs to the other."""
    take = jax.tree_util.tree_map(lambda m, x: x if m else None, selected, tree)
    rest = jax.tree_util.tree_map(lambda m, x: None if m else x, selected, tree)
    return take, rest


def merge(a: Any, b: Any) -> Any:
    """Inverse of `partition`: each leaf from whichever tree has it."""
    return jax.tree_util.tree_map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def union(*masks: Any) -> Any:
    return jax.tree_util.tree_map(lambda *ms: any(ms), *masks)


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-for-bit: a pytree of arrays, saved whole in each checkpoint.

    params: the models being trained (float32 master weights, frozen leaves included, as their optimisers need);
    opt_state: one optimiser state per phase, e.g. {"model": ...} or {"generator": ..., "critic": ...};
    ema: EMA of the trainable leaves (None elsewhere), or None when disabled;
    rng: the run's base PRNG key (step s uses fold_in(rng, s)); data_position: global batches consumed.
    """

    step: jax.Array
    params: Any
    opt_state: dict[str, Any]
    ema: Any
    rng: jax.Array
    data_position: jax.Array

    def ema_params(self) -> Any:
        """The full params with EMA values on the trainable leaves (the params themselves without EMA)."""
        return self.params if self.ema is None else merge(self.ema, self.params)


def create(params: Any, txs: dict[str, optax.GradientTransformation], masks: dict[str, Any], *, seed: int, ema: bool):
    """A fresh state: `txs[name]` is initialised on the leaves `masks[name]` selects."""
    opt_state = {name: tx.init(partition(params, masks[name])[0]) for name, tx in txs.items()}
    ema_tree = partition(params, union(*masks.values()))[0] if ema else None
    if ema_tree is not None:
        ema_tree = jax.tree_util.tree_map(jnp.copy, ema_tree)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        ema=ema_tree,
        rng=jax.random.PRNGKey(seed),
        data_position=jnp.zeros((), jnp.int32),
    )


def shardings(abstract_state: TrainState, logical_axes: Any, mesh: Mesh, rules) -> TrainState:
    """NamedShardings for every leaf: params by their logical axes; optimiser and EMA leaves like the param whose
    path ends theirs (same shape); everything else (counts, keys, step) replicated."""
    param_sh = sharding_lib.param_shardings(abstract_state.params, logical_axes, mesh, rules)
    by_path = {}
    for (path, leaf), sh in zip(
        jax.tree_util.tree_leaves_with_path(abstract_state.params), jax.tree_util.tree_leaves(param_sh)
    ):
        by_path[tuple(path_str([k]) for k in path)] = (tuple(leaf.shape), sh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_param(path, leaf):
        keys = tuple(path_str([k]) for k in path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return TrainState(
        step=replicated,
        params=param_sh,
        opt_state=jax.tree_util.tree_map_with_path(like_param, abstract_state.opt_state),
        ema=None if abstract_state.ema is None else jax.tree_util.tree_map_with_path(like_param, abstract_state.ema),
        rng=replicated,
        data_position=replicated,
    )


def abstract(tree: Any, shardings_tree: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what a restore onto this mesh needs)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings_tree)
