"""The runner's two-network toy: a critic and a generator on a 1-D problem (run as a script by the fault tests).

    real ~ N(2, 0.5²);  G(z) = a·z + b;  D(x) = c0 + c1·x + c2·x²  (a logit)
    phase "critic" ×2:  BCE(D(real), 1) + BCE(D(G(z)), 0)   (G's samples produced for the generator phase)
    phase "generator":  BCE(D(G(z)), 1)                       (non-saturating)

python tests/runner_toy.py WORKDIR [--steps N] [--every K] [--sync] [--config-extra X]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import sharding
from jaxdiff.errors import EXIT_PREEMPTED, Preempted
from jaxdiff.train import runner
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib


def _bce(logits, label):
    return jnp.mean(jax.nn.softplus(-logits) if label else jax.nn.softplus(logits))


def _critic(c, x):
    return c["c0"] + c["c1"] * x + c["c2"] * x**2


def _fake(g, z):
    return g["a"] * z + g["b"]


def critic_loss(params, frozen, batch, rng):
    fake = _fake(params["generator"], batch["z"])
    c = params["critic"]
    loss = _bce(_critic(c, batch["real"]), 1) + _bce(_critic(c, fake), 0)
    return loss, {"fake_mean": jnp.mean(fake)}


def generator_loss(params, frozen, batch, rng):
    noise = 0.01 * jax.random.normal(rng, batch["z"].shape)  # the rng must come back exactly on resume too
    return _bce(_critic(params["critic"], _fake(params["generator"], batch["z"] + noise)), 1), {}


def batch_fn(i: int) -> dict:
    rng = np.random.default_rng([7, i])
    return {"real": rng.normal(2.0, 0.5, 64).astype(np.float32), "z": rng.standard_normal(64).astype(np.float32)}


def build(steps: int, every: int, async_save: bool, extra: str = ""):
    networks = {
        "critic": step_lib.Network("critic", optax.adam(5e-2), clip_norm=1.0),
        "generator": step_lib.Network("generator", optax.adam(optax.linear_schedule(5e-2, 1e-2, steps)), ema_decay=0.9),
    }
    phases = [
        step_lib.Phase("critic", "critic", critic_loss, repeat=2),
        step_lib.Phase("generator", "generator", generator_loss),
    ]
    params = {
        "critic": {"c0": jnp.zeros(()), "c1": jnp.zeros(()), "c2": jnp.zeros(())},
        "generator": {"a": jnp.ones(()), "b": jnp.zeros(())},
    }
    masks = {k: jax.tree_util.tree_map(lambda _: True, v) for k, v in params.items()}
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])

    def create():
        return state_lib.create(params, {k: n.tx for k, n in networks.items()}, masks, seed=0, ema=("generator",))

    state_sh = state_lib.shardings(jax.eval_shape(create), {}, mesh, sharding.DEFAULT_RULES)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = step_lib.jit(step_lib.build(networks, phases, masks), state_sh, replicated)
    settings = runner.Settings(
        total_steps=steps, checkpoint_every=every, keep=2, async_save=async_save, log_every=1, progress=False
    )
    config = {"steps": steps, "every": every, "extra": extra}
    return (
        step,
        (lambda: jax.jit(create, out_shardings=state_sh)()),
        state_lib.abstract(jax.eval_shape(create), state_sh),
        (runner.StepBatches(batch_fn, replicated)),
        settings,
        config,
        step_lib.leaf_names(params, masks, phases),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--sync", action="store_true", help="synchronous checkpoint writes")
    p.add_argument("--config-extra", default="", help="changes the saved config (to test the refusal)")
    p.add_argument("--resume-if-changed", action="store_true")
    args = p.parse_args(argv)
    step, init, abstract, batches, settings, config, names = build(
        args.steps, args.every, not args.sync, args.config_extra
    )
    if args.resume_if_changed:
        import dataclasses

        settings = dataclasses.replace(settings, resume_if_changed=True)
    try:
        state, summary = runner.run(
            step, init, abstract, batches, args.workdir, settings, config=config, leaf_names=names
        )
    except Preempted as e:
        print(e, file=sys.stderr)
        return EXIT_PREEMPTED
    except ValueError as e:  # the config refusal
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = jax.device_get(state)
    leaves = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(state)]  # float32 -> JSON is exact
    print(
        json.dumps(
            {
                "summary": summary,
                "generator": jax.tree_util.tree_map(float, state.params["generator"]),
                "leaves": leaves,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
