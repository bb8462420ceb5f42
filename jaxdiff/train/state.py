"""The train state pytree (step, per-network params, optimiser states and EMA, rng, data position), its shardings."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import selectors
from jaxdiff import sharding as sharding_lib

# Which leaves train: see jaxdiff.selectors (None = all, a named selector, a regex on "a/b/c" paths, a callable
# (path_string, leaf) -> bool, or a pytree of bools).
Selector = selectors.Selector
path_str = selectors.path_str
mask = selectors.mask


def partition(tree: Any, selected: Any) -> tuple[Any, Any]:
    """(selected leaves, other leaves): two trees shaped like `tree` with None where a leaf belongs to the other."""
    take = jax.tree_util.tree_map(lambda m, x: x if m else None, selected, tree)
    rest = jax.tree_util.tree_map(lambda m, x: None if m else x, selected, tree)
    return take, rest


def merge(a: Any, b: Any) -> Any:
    """Inverse of `partition`: each leaf from whichever tree has it."""
    return jax.tree_util.tree_map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-for-bit: a pytree of arrays, saved whole in each checkpoint.

    params: {network: params} (float32 master weights, frozen leaves of a network included);
    opt_state: {network: optax state of its trainable leaves}; ema: {network: EMA of its trainable leaves} for
    the networks that keep one; rng: the run's base PRNG key (step s uses fold_in(rng, s));
    data_position: global batches consumed.
    """

    step: jax.Array
    params: dict[str, Any]
    opt_state: dict[str, Any]
    ema: dict[str, Any]
    rng: jax.Array
    data_position: jax.Array

    def ema_params(self, network: str) -> Any:
        """`network`'s params with EMA values on its trainable leaves (the params themselves without EMA)."""
        ema = self.ema.get(network)
        return self.params[network] if ema is None else merge(ema, self.params[network])


def create(
    params: dict[str, Any],
    txs: dict[str, optax.GradientTransformation],
    masks: dict[str, Any],
    *,
    seed: int,
    ema: tuple[str, ...] = (),
) -> TrainState:
    """A fresh state: `txs[net]` is initialised on the leaves of `params[net]` that `masks[net]` selects; the
    networks named in `ema` start their EMA at their params."""
    opt_state = {net: tx.init(partition(params[net], masks[net])[0]) for net, tx in txs.items()}
    ema_trees = {net: jax.tree_util.tree_map(jnp.copy, partition(params[net], masks[net])[0]) for net in ema}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        ema=ema_trees,
        rng=jax.random.PRNGKey(seed),
        data_position=jnp.zeros((), jnp.int32),
    )


def _like_params(tree: Any, params: Any, param_shardings: Any, replicated: NamedSharding) -> Any:
    """Shardings for an optimiser / EMA tree of one network: a leaf takes the sharding of the param whose path ends
    its own and whose shape it has (Adam's mu and nu); anything else (counts, scalars) is replicated."""
    by_path = {}
    for (path, leaf), sh in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(param_shardings)
    ):
        by_path[tuple(path_str([k]) for k in path)] = (tuple(leaf.shape), sh)

    def like_param(path, leaf):
        keys = tuple(path_str([k]) for k in path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(like_param, tree)


def shardings(abstract_state: TrainState, logical_axes: dict[str, Any], mesh: Mesh, rules) -> TrainState:
    """NamedShardings for every leaf: each network's params by its logical axes (replicated where a network has
    none), its optimiser and EMA leaves like the params they follow; step, rng and position replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = {}
    for net, params in abstract_state.params.items():
        axes = (logical_axes or {}).get(net)
        if axes is None:
            params_sh[net] = jax.tree_util.tree_map(lambda _: replicated, params)
        else:
            params_sh[net] = sharding_lib.param_shardings(params, axes, mesh, rules)

    def per_network(trees):
        return {
            net: _like_params(tree, abstract_state.params[net], params_sh[net], replicated)
            for net, tree in trees.items()
        }

    return TrainState(
        step=replicated,
        params=params_sh,
        opt_state=per_network(abstract_state.opt_state),
        ema=per_network(abstract_state.ema),
        rng=replicated,
        data_position=replicated,
    )


def abstract(tree: Any, shardings_tree: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what a restore onto this mesh needs)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings_tree)
