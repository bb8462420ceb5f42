"""One training step from (loss_fn, trainable leaves, optax chain) phases: accumulation, EMA, non-finite guard, jit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff.train import state as state_lib
from jaxdiff.train.state import TrainState

# loss_fn(params, frozen, batch, rng) -> (loss [], aux {name: []}): `params` is the state's params (the
# trainable leaves are differentiated, the rest held fixed), `frozen` the models that never train (VAE,
# text encoder, teacher), `batch` a dict of [B, ...] arrays.
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One optimiser's update inside a step; several phases run in order (e.g. critic, then generator)."""

    name: str
    loss_fn: LossFn
    tx: optax.GradientTransformation
    trainable: state_lib.Selector = None  # which leaves of params this phase trains (see state.mask)
    learning_rate: Callable[[jax.Array], jax.Array] | None = None  # schedule(count), logged
    clip_norm: float = 0.0  # > 0: scale the gradients to this global norm when above it


@dataclasses.dataclass(frozen=True)
class Options:
    accum_steps: int = 1  # micro-batches per step, accumulated with lax.scan
    ema_decay: float = 0.0
    remat: str = "none"  # "loss": jax.checkpoint around the loss saving only matmul outputs
    batch_sharding: NamedSharding | None = None  # to keep each micro-batch spread over the data axes


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient with nonfinite="stop"."""


def _remat(fn: Callable, how: str) -> Callable:
    if how == "loss":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


def _micro_batches(batch: dict, n: int, sharding: NamedSharding | None) -> dict:
    """[G, ...] -> [n, G/n, ...], micro-batch i = rows i, i+n, ... so each stays spread over the data axes."""

    def split(x):
        y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        if sharding is not None:
            spec = PartitionSpec(None, *sharding.spec)
            y = jax.lax.with_sharding_constraint(y, NamedSharding(sharding.mesh, spec))
        return y

    return jax.tree_util.tree_map(split, batch)


def _where(ok, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def build(phases: list[Phase], masks: dict[str, Any], options: Options = Options()) -> Callable:
    """step(state, batch, frozen) -> (state, metrics). Not jitted (see `jit`).

    metrics: "loss"/"loss_<phase>", "grad_norm[_<phase>]" (before clipping), "learning_rate[_<phase>]", each aux
    value, "ok" (the update was applied), and "finite/<phase>" = [loss finite, then one flag per trainable leaf]
    so that the host can name what went non-finite (`nonfinite_report`).
    """
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must differ: {names}")
    ema_mask = state_lib.union(*(masks[p.name] for p in phases))
    n = int(options.accum_steps)

    def phase_update(phase, index, params, opt_state, batch, frozen, rng):
        train, fixed = state_lib.partition(params, masks[phase.name])

        def loss_of(trainable, mb, r):
            loss, aux = phase.loss_fn(state_lib.merge(trainable, fixed), frozen, mb, r)
            return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}

        grad_fn = jax.value_and_grad(_remat(loss_of, options.remat), has_aux=True)
        rng = jax.random.fold_in(rng, index)
        if n == 1:
            (loss, aux), grads = grad_fn(train, batch, rng)
        else:
            micro = _micro_batches(batch, n, options.batch_sharding)

            def body(carry, xs):
                mb, i = xs
                (loss_i, aux_i), g = grad_fn(train, mb, jax.random.fold_in(rng, i))
                acc_g, acc_l, acc_a = carry
                add = lambda x, y: x + y
                new = (jax.tree_util.tree_map(add, acc_g, g), acc_l + loss_i, jax.tree_util.tree_map(add, acc_a, aux_i))
                return new, None

            zeros_g = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), train)
            _, aux_shape = jax.eval_shape(loss_of, train, jax.tree_util.tree_map(lambda x: x[0], micro), rng)
            zeros_a = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
            (grads, loss, aux), _ = jax.lax.scan(
                body, (zeros_g, jnp.zeros((), jnp.float32), zeros_a), (micro, jnp.arange(n))
            )
            grads = jax.tree_util.tree_map(lambda g, p: (g / n).astype(p.dtype), grads, train)
            loss, aux = loss / n, jax.tree_util.tree_map(lambda a: a / n, aux)

        # One pass over the gradients gives each leaf's sum of squares: finite iff the leaf is (barring overflow
        # of a sum above 3e38), and together the global norm for clipping and logging.
        squares = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(grads)]
        finite = jnp.isfinite(jnp.stack([loss] + squares))
        ok = jnp.all(finite)
        grad_norm = jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)
        if phase.clip_norm > 0:
            scale = jnp.minimum(1.0, phase.clip_norm / jnp.maximum(grad_norm, 1e-30))
            grads = jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads)

        def apply(_):
            updates, new_opt = phase.tx.update(grads, opt_state, train)
            return optax.apply_updates(train, updates), new_opt

        # A skipped update leaves params and optimiser state untouched. lax.cond runs only the taken branch, in
        # place on the donated buffers; a jnp.where over every parameter and moment made the SD1.5 step ~2x slower.
        new_train, new_opt = jax.lax.cond(ok, apply, lambda _: (train, opt_state), None)
        suffix = "" if len(phases) == 1 else f"_{phase.name}"
        metrics = {f"loss{suffix}": loss, f"grad_norm{suffix}": grad_norm}
        if phase.learning_rate is not None:
            metrics[f"learning_rate{suffix}"] = jnp.asarray(phase.learning_rate(_count(opt_state)), jnp.float32)
        metrics.update({f"{k}{suffix}": v for k, v in aux.items()})
        return state_lib.merge(new_train, fixed), new_opt, ok, finite, metrics

    def step(state: TrainState, batch: dict, frozen: Any = None):
        rng = jax.random.fold_in(state.rng, state.step)
        params, opt_states, metrics, finite, all_ok = state.params, dict(state.opt_state), {}, {}, jnp.bool_(True)
        for index, phase in enumerate(phases):
            params, opt_states[phase.name], ok, finite[phase.name], m = phase_update(
                phase, index, params, opt_states[phase.name], batch, frozen, rng
            )
            metrics.update(m)
            all_ok = all_ok & ok
        ema = state.ema
        if ema is not None:
            d = options.ema_decay
            current = state_lib.partition(params, ema_mask)[0]
            new_ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, current)
            ema = _where(all_ok, new_ema, ema)
        metrics["ok"] = all_ok
        metrics["finite"] = finite
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_states, ema=ema, data_position=state.data_position + 1
        )
        return new_state, metrics

    return step


def _count(opt_state) -> jax.Array:
    """The update count of the first optax state that has one (for logging the learning-rate schedule)."""
    for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        if leaf_path and getattr(leaf_path[-1], "name", None) == "count":
            return leaf
    return jnp.zeros((), jnp.int32)


def jit(step: Callable, state_shardings: TrainState, batch_sharding: NamedSharding, frozen_shardings: Any = None):
    """jax.jit with in/out shardings from the logical-axis rules and the train state donated."""
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, frozen_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def leaf_names(params: Any, masks: dict[str, Any]) -> dict[str, list[str]]:
    """Per phase, the paths of its trainable leaves in the order of the "finite/<phase>" flags."""
    return {
        name: [state_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state_lib.partition(params, m)[0])]
        for name, m in masks.items()
    }


def nonfinite_report(metrics: dict, names: dict[str, list[str]], step: int) -> str | None:
    """None when every loss and gradient was finite, else a message naming the loss and the param subtrees."""
    parts = []
    single = len(metrics["finite"]) == 1
    for name, flags in metrics["finite"].items():
        flags = np.asarray(flags)
        if flags.all():
            continue
        key = "loss" if single else f"loss_{name}"
        if not flags[0]:
            parts.append(f"non-finite {key} = {float(np.asarray(metrics[key])):.4g}")
        paths = names[name]
        bad = [p for p, f in zip(paths, flags[1:]) if not f]
        if bad:
            where = "" if single else f" ({name})"
            parts.append(
                f"non-finite gradient{where} in {len(bad)} of {len(paths)} param tensors: {_subtrees(bad, paths)}"
            )
    if not parts:
        return None
    return f"step {step}: " + "; ".join(parts)


def _subtrees(bad: list[str], paths: list[str], limit: int = 6) -> str:
    """Name the smallest enclosing subtrees that are wholly bad, e.g. "down_blocks_0/resnets_0/*"."""
    if len(bad) == len(paths):
        return "all"
    bad_set, names = set(bad), []
    for p in bad:
        parts = p.split("/")
        best = p
        for k in range(1, len(parts)):
            prefix = "/".join(parts[:k]) + "/"
            if all(q in bad_set for q in paths if q.startswith(prefix)):
                best = prefix + "*"
                break
        if best not in names:
            names.append(best)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
