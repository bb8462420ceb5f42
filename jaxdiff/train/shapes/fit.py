"""A shapes stage's training on the runner: its AdamW network, batches as a pure function of the step, one device.

Everything about the loop (orbax checkpoints in WORKDIR/<stage>/train every --save-every steps, exact resume,
SIGTERM, the non-finite guard, metrics.jsonl / TensorBoard / progress bar, refusing to resume other settings) is
`jaxdiff.train.runner`'s; a stage gives its networks, phases, first params and `batch_fn(rng) -> batch`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff import sharding
from jaxdiff.train import optim, runner
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib
from jaxdiff.train.shapes.common import Run, read_metrics

SPEED_KEYS = ("step", "time", "ok", "steps_per_s", "images_per_s", "tflops_per_s")  # not the stage's results


def network(run: Run, stage: str, name: str, steps: int, trainable: state_lib.Selector = None) -> step_lib.Network:
    """AdamW (weight decay on kernels only), warm-up then cosine to 10% of the rate, global-norm clipping at 1."""
    warmup = max(1, min(run.hp(stage, "warmup"), steps // 2))
    lr = optim.schedule(run.hp(stage, "lr"), max(steps, 2), kind="cosine", warmup_steps=warmup, final_fraction=0.1)
    tx = optim.optimizer("adamw", lr, weight_decay=run.hp(stage, "weight_decay"), decay_mask=optim.kernels_only)
    return step_lib.Network(name, tx, lr, trainable=trainable, clip_norm=1.0)


def train(
    run: Run,
    stage: str,
    networks: list[step_lib.Network],
    phases: list[step_lib.Phase],
    params: dict[str, Any],
    batch_fn: Callable[[np.random.Generator], dict],
    *,
    steps: int,
    seed: int,
    config: dict,
) -> tuple[dict[str, Any], dict]:
    """Train `params` ({network: params}) for `steps`, resuming from the stage's checkpoints; returns (the trained
    params on the host, info for done.json). Step i's batch is `batch_fn(default_rng([seed, i, crc32(stage)]))`.
    `config` (the stage's settings) is saved with the run: resuming with other values is refused."""
    nets = {n.name: n for n in networks}
    masks = {name: state_lib.mask(params[name], net.trainable) for name, net in nets.items()}
    txs = {name: net.tx for name, net in nets.items()}
    create = lambda p: state_lib.create(p, txs, masks, seed=seed)  # noqa: E731
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    state_sh = state_lib.shardings(jax.eval_shape(create, params), {}, mesh, sharding.DEFAULT_RULES)
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = step_lib.jit(step_lib.build(nets, phases, masks), state_sh, replicated)
    stream = zlib.crc32(stage.encode())
    batches = runner.StepBatches(lambda i: batch_fn(np.random.default_rng([run.opts.seed, i, stream])), replicated)
    settings = runner.Settings(
        total_steps=steps,
        checkpoint_every=run.opts.save_every,
        keep=2,
        async_save=False,  # small states: a synchronous write is quick and simpler to reason about
        log_every=min(25, steps),
        images_per_step=run.hp(stage, "batch"),
        label=f"{stage} step",
        resume_hint=f"the same flags, or --stage {stage} --redo to train the stage again from scratch",
    )
    workdir = run.train_dir(stage)
    saved_config = {"stage": stage, "steps": steps, "batch": settings.images_per_step, "seed": seed, **config}
    # As JSON reads it back (tuples become lists), so that an unchanged config compares equal on resume.
    saved_config = json.loads(json.dumps(saved_config))
    state, summary = runner.run(
        step_fn,
        lambda: jax.jit(create, out_shardings=state_sh)(params),
        state_lib.abstract(jax.eval_shape(create, params), state_sh),
        batches,
        str(workdir),
        settings,
        leaf_names=step_lib.leaf_names(params, masks, phases),
        config=saved_config,
    )
    return jax.device_get(state.params), {"steps": summary["step"], **summarize(run, stage, summary)}


def train_one(
    run: Run,
    stage: str,
    network_name: str,
    loss_fn: step_lib.LossFn,
    params: Any,
    batch_fn: Callable[[np.random.Generator], dict],
    *,
    seed: int,
    config: dict,
    trainable: state_lib.Selector = None,
) -> tuple[Any, dict]:
    """`train` for the usual stage: one network, one phase named after the stage, --<stage>-steps; returns (the
    network's trained params, info)."""
    steps = run.steps(stage)
    params, info = train(
        run,
        stage,
        [network(run, stage, network_name, steps, trainable)],
        [step_lib.Phase(stage, network_name, loss_fn)],
        {network_name: params},
        batch_fn,
        steps=steps,
        seed=seed,
        config=config,
    )
    return params[network_name], info


def summarize(run: Run, stage: str, summary: dict) -> dict:
    """The final logged metrics, speed and where the run resumed from; the metric rows are copied into log.jsonl."""
    records = read_metrics(run.train_dir(stage))
    logged = [r for r in records if "loss" in r]
    for r in logged:
        run.log({"stage": stage, **{k: v for k, v in r.items() if k != "time"}})
    final = logged[-1] if logged else {}
    rates = [r["steps_per_s"] for r in records if r.get("steps_per_s")]
    return {
        "final": {k: v for k, v in final.items() if k not in SPEED_KEYS},
        "resumed_from": summary["resumed_from"],
        "compile_s": round(summary["compile_s"], 1),
        "s_per_step": round(1.0 / float(np.median(rates)), 4) if rates else None,
    }
