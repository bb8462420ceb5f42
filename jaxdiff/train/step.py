"""One training step over named networks: phases in order (e.g. critic xk, then generator), each updating one
network with its optimiser; accumulation, EMA, the non-finite guard and clipping; jit with shardings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff.models import splash
from jaxdiff.train import state as state_lib
from jaxdiff.train.state import TrainState

# loss_fn(params, frozen, batch, rng) -> (loss [], aux): `params` is {network: params} (the phase's trainable
# leaves are differentiated, everything else held fixed), `frozen` the dict of models that never train (VAE, text
# encoder, teacher) plus frozen["step"] (the step index) and frozen["produced"][phase] = what an earlier phase of
# the same step returned in aux["produced"]; `batch` a dict of [B, ...] arrays. aux: {name: scalar} (logged) and
# optionally "produced": {name: array}.
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]
# grad_fn(params, frozen, batch, rng) -> (grads shaped like params[network], loss [], aux): for update rules that
# are not the gradient of one loss (DoCo's gradient surgery); leaves outside the network's mask are ignored.
GradFn = Callable[[Any, Any, dict, jax.Array], tuple[Any, jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Network:
    """A trained network: its optimiser, schedule (for logging), trainable leaves, clipping and EMA."""

    name: str
    tx: optax.GradientTransformation
    learning_rate: Callable[[jax.Array], jax.Array] | None = None  # schedule(count), logged
    trainable: state_lib.Selector = None  # which leaves of this network's params train (see state.mask)
    clip_norm: float = 0.0  # > 0: scale the gradients to this global norm when above it
    ema_decay: float = 0.0  # > 0: keep an EMA of the trainable leaves
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) at update n (EMA warm-up)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One update of one network inside a step; phases run in order, each sees the params the earlier ones left."""

    name: str
    network: str
    loss_fn: LossFn | None = None
    grad_fn: GradFn | None = None  # instead of loss_fn
    repeat: int = 1  # updates of this phase per step (e.g. a fake score k times per generator update)
    active: Callable[[jax.Array], jax.Array] | None = None  # step -> bool: apply the update only then (warm-ups)


@dataclasses.dataclass(frozen=True)
class Options:
    accum_steps: int = 1  # micro-batches per step, accumulated with lax.scan
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


def _check(networks: dict[str, Network], phases: list[Phase], masks: dict[str, Any], options: Options) -> None:
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must differ: {names}")
    for p in phases:
        if p.network not in networks:
            raise ValueError(f"phase {p.name!r} updates network {p.network!r}, not one of {sorted(networks)}")
        if (p.loss_fn is None) == (p.grad_fn is None):
            raise ValueError(f"phase {p.name!r} needs exactly one of loss_fn and grad_fn")
        if p.grad_fn is not None and options.accum_steps > 1:
            raise ValueError(f"phase {p.name!r}: a grad_fn phase does not support accum_steps > 1")
    missing = [n for n in networks if n not in masks]
    if missing:
        raise ValueError(f"no trainable mask for network(s) {missing}")


def build(
    networks: dict[str, Network], phases: list[Phase], masks: dict[str, Any], options: Options = Options()
) -> Callable:
    """step(state, batch, frozen) -> (state, metrics). Not jitted (see `jit`).

    metrics: "loss"/"loss_<phase>", "grad_norm[_<phase>]" (before clipping), "learning_rate[_<network>]", each aux
    scalar, "ok" (every update was applied), and "finite/<phase>" = [loss finite, then one flag per trainable leaf]
    so that the host can name what went non-finite (`nonfinite_report`). One phase: no suffixes.
    """
    _check(networks, phases, masks, options)
    n = int(options.accum_steps)
    single = len(phases) == 1

    def gradients(phase, params, frozen, batch, rng):
        net = phase.network
        train, fixed = state_lib.partition(params[net], masks[net])
        if phase.grad_fn is not None:
            grads, loss, aux = phase.grad_fn(params, frozen, batch, rng)
            grads = state_lib.partition(grads, masks[net])[0]
            return train, fixed, grads, jnp.asarray(loss, jnp.float32), aux

        def loss_of(trainable, mb, r):
            loss, aux = phase.loss_fn({**params, net: state_lib.merge(trainable, fixed)}, frozen, mb, r)
            produced = aux.pop("produced", {})
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
            return loss.astype(jnp.float32), (aux, produced)

        grad_fn = jax.value_and_grad(_remat(loss_of, options.remat), has_aux=True)
        if n == 1:
            (loss, (aux, produced)), grads = grad_fn(train, batch, rng)
            return train, fixed, grads, loss, {**aux, "produced": produced}
        micro = _micro_batches(batch, n, options.batch_sharding)

        def body(carry, xs):
            mb, i = xs
            (loss_i, (aux_i, _)), g = grad_fn(train, mb, jax.random.fold_in(rng, i))
            acc_g, acc_l, acc_a = carry
            add = lambda x, y: x + y
            return (
                jax.tree_util.tree_map(add, acc_g, g),
                acc_l + loss_i,
                jax.tree_util.tree_map(add, acc_a, aux_i),
            ), None

        zeros_g = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), train)
        _, (aux_shape, _) = jax.eval_shape(loss_of, train, jax.tree_util.tree_map(lambda x: x[0], micro), rng)
        zeros_a = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        (grads, loss, aux), _ = jax.lax.scan(
            body, (zeros_g, jnp.zeros((), jnp.float32), zeros_a), (micro, jnp.arange(n))
        )
        grads = jax.tree_util.tree_map(lambda g, p: (g / n).astype(p.dtype), grads, train)
        return train, fixed, grads, loss / n, jax.tree_util.tree_map(lambda a: a / n, aux)

    def phase_update(phase, rng, step, params, opt_state, frozen, batch):
        network = networks[phase.network]
        train, fixed, grads, loss, aux = gradients(phase, params, frozen, batch, rng)
        produced = aux.pop("produced", {})
        # One pass over the gradients gives each leaf's sum of squares: finite iff the leaf is (barring overflow
        # of a sum above 3e38), and together the global norm for clipping and logging.
        squares = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(grads)]
        finite = jnp.isfinite(jnp.stack([loss] + squares))
        ok = jnp.all(finite)
        grad_norm = jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)
        if network.clip_norm > 0:
            scale = jnp.minimum(1.0, network.clip_norm / jnp.maximum(grad_norm, 1e-30))
            grads = jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads)

        def apply(_):
            updates, new_opt = network.tx.update(grads, opt_state, train)
            return optax.apply_updates(train, updates), new_opt

        # A skipped update leaves params and optimiser state untouched. lax.cond runs only the taken branch, in
        # place on the donated buffers; a jnp.where over every parameter and moment made the SD1.5 step ~2x slower.
        take = ok if phase.active is None else ok & phase.active(step)
        new_train, new_opt = jax.lax.cond(take, apply, lambda _: (train, opt_state), None)
        suffix = "" if single else f"_{phase.name}"
        metrics = {f"loss{suffix}": loss, f"grad_norm{suffix}": grad_norm}
        metrics.update({f"{k}{suffix}": jnp.asarray(v, jnp.float32) for k, v in aux.items()})
        return state_lib.merge(new_train, fixed), new_opt, ok, finite, metrics, produced

    def step(state: TrainState, batch: dict, frozen: Any = None):
        rng = jax.random.fold_in(state.rng, state.step)
        params, opt_states = dict(state.params), dict(state.opt_state)
        metrics, finite, produced = {}, {}, {}
        ok_of = {net: jnp.bool_(True) for net in networks}
        for index, phase in enumerate(phases):
            net = phase.network
            inputs = {**(frozen or {}), "step": state.step, "produced": dict(produced)}
            phase_rng = jax.random.fold_in(rng, index)
            params[net], opt_states[net], ok, fin, m, out = phase_update(
                phase, phase_rng, state.step, params, opt_states[net], inputs, batch
            )
            if phase.repeat > 1:
                # Updates 2..k in a loop: one copy of the phase in the program, not k (a DMD2 step with its fake
                # score 10x unrolled took minutes to compile). Update r draws from fold_in(phase_rng, r).

                def again(r, carry, phase=phase, net=net, inputs=inputs, phase_rng=phase_rng):
                    net_params, opt, ok, fin, _, _ = carry
                    p_r = {**params, net: net_params}
                    new_p, new_opt, ok_r, fin_r, m_r, out_r = phase_update(
                        phase, jax.random.fold_in(phase_rng, r), state.step, p_r, opt, inputs, batch
                    )
                    return new_p, new_opt, ok & ok_r, fin & fin_r, m_r, out_r

                carry = (params[net], opt_states[net], ok, fin, m, out)
                params[net], opt_states[net], ok, fin, m, out = jax.lax.fori_loop(1, phase.repeat, again, carry)
            ok_of[net] = ok_of[net] & ok
            finite[phase.name] = fin
            metrics.update(m)
            if out:
                produced[phase.name] = out
        for net, network in networks.items():
            if network.learning_rate is not None:
                key = "learning_rate" if len(networks) == 1 else f"learning_rate_{net}"
                metrics[key] = jnp.asarray(network.learning_rate(_count(state.opt_state[net])), jnp.float32)
        ema = dict(state.ema)
        for net, old in state.ema.items():
            d = jnp.float32(networks[net].ema_decay)
            if networks[net].ema_warmup:
                count = state.step.astype(jnp.float32)
                d = jnp.minimum(d, (1.0 + count) / (10.0 + count))
            current = state_lib.partition(params[net], masks[net])[0]
            ema[net] = _where(ok_of[net], jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, old, current), old)
        all_ok = jnp.bool_(True)
        for ok in ok_of.values():
            all_ok = all_ok & ok
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
        splash.traced_over(batch_sharding.mesh, step),  # Pallas attention partitioned over the mesh
        in_shardings=(state_shardings, batch_sharding, frozen_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def leaf_names(params: dict[str, Any], masks: dict[str, Any], phases: list[Phase]) -> dict[str, list[str]]:
    """Per phase, the paths of its network's trainable leaves in the order of the "finite/<phase>" flags."""
    return {
        p.name: [
            state_lib.path_str(path)
            for path, _ in jax.tree_util.tree_leaves_with_path(
                state_lib.partition(params[p.network], masks[p.network])[0]
            )
        ]
        for p in phases
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
