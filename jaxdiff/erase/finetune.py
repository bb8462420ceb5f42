"""Erasure fine-tuning on the runner: named networks (the selected UNet leaves, adapters, a discriminator) sharded by
their logical axes on the job's mesh, the frozen UNet(s) beside them, batches as a pure function of the step.

An objective `loss(trainable, frozen, batch, rng)` (see `jaxdiff.erase.common`) becomes one phase of one network
("unet"); methods with their own update rule (DoCo's discriminator and gradient surgery) pass their networks and
phases. Everything else — non-finite guard, clipping, optax, checkpoints, resume after a kill, SIGTERM, metrics — is
`jaxdiff.train.runner`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import sharding
from jaxdiff.errors import UserError
from jaxdiff.train import optim, runner
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib

if TYPE_CHECKING:
    from jaxdiff.erase.job import Job

BatchFn = Callable[[int], dict]  # step index -> batch (deterministic)


def schedule(train: mlc.ConfigDict) -> Callable:
    """The learning-rate schedule of an erase config's `train` block."""
    return optim.schedule(
        train.learning_rate,
        train.steps,
        kind=train.lr_schedule,
        warmup_steps=train.warmup_steps,
        cycles=int(train.get("lr_cycles", 1)),
    )


def optimizer(train: mlc.ConfigDict, learning_rate=None) -> optax.GradientTransformation:
    """Adam / AdamW / plain SGD from an erase config's `train` block (PyTorch's defaults)."""
    lr = schedule(train) if learning_rate is None else learning_rate
    return optim.optimizer(
        train.optimizer, lr, b1=0.0 if train.optimizer == "sgd" else 0.9, weight_decay=float(train.weight_decay)
    )


def logical_axes_like(tree, model_axes) -> Any:
    """The model's logical axes for the leaves of `tree` found at the same path in the model's params (a selected
    subtree); PartitionSpec() (replicated) for leaves the model does not have, e.g. adapters."""
    from jaxdiff.erase.common import flatten, unflatten

    known = flatten(model_axes)
    return unflatten({p: known.get(p, PartitionSpec()) for p in flatten(tree)})


def frozen_shardings(frozen: dict, model, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> dict:
    """Shardings of the frozen models passed to the step: each entry shaped like the model's params follows its
    logical axes (fsdp/tensor), anything else is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shape = jax.tree_util.tree_structure(model.params)
    return {
        k: sharding.param_shardings(v, model.logical_axes, mesh, rules)
        if jax.tree_util.tree_structure(v) == shape
        else jax.tree_util.tree_map(lambda _: replicated, v)
        for k, v in frozen.items()
    }


def unet_network(train: mlc.ConfigDict, tx: optax.GradientTransformation | None = None) -> step_lib.Network:
    """The "unet" network of a config's `train` block: its optimiser (or `tx`), schedule and clipping."""
    lr = schedule(train)
    return step_lib.Network(
        "unet", optimizer(train, lr) if tx is None else tx, lr, clip_norm=float(train.max_grad_norm)
    )


def single_loss(loss) -> list[step_lib.Phase]:
    """One phase training "unet" on `loss(trainable, frozen, batch, rng)`."""
    return [step_lib.Phase("unet", "unet", lambda p, frozen, batch, rng: loss(p["unet"], frozen, batch, rng))]


def run(
    networks: list[step_lib.Network],
    phases: list[step_lib.Phase],
    params: dict[str, Any],
    frozen: dict,
    batch_fn: BatchFn,
    train: mlc.ConfigDict,
    workdir: str,
    *,
    seed: int,
    mesh: Mesh,
    model,
    progress: bool = True,
    rules=sharding.DEFAULT_RULES,
    label: str = "erasure step",
    images_per_step: int | None = None,
    config: dict | None = None,
    frozen_sharding: dict | None = None,
) -> tuple[Any, dict]:
    """Train `params` ({network: initial params}) until `train.steps`, resuming from `workdir`; (final state, info).
    `label` names the step in the progress bar and logs; `images_per_step` adds an images/s figure; `config` (the
    job's settings) is recorded with the checkpoints so that a resume with other settings is refused.

    The "unet" network's leaves and every frozen entry shaped like the model's params are sharded by the model's
    logical axes on `mesh` (or as `frozen_sharding` says); other networks (adapters, a discriminator) and batches
    are replicated.
    """
    nets = {n.name: n for n in networks}
    masks = {name: state_lib.mask(params[name], nets[name].trainable) for name in nets}
    ema = tuple(name for name, n in nets.items() if n.ema_decay > 0)
    create = lambda p: state_lib.create(p, {k: n.tx for k, n in nets.items()}, masks, seed=seed, ema=ema)  # noqa: E731
    axes = {"unet": logical_axes_like(params["unet"], model.logical_axes)} if "unet" in params else {}
    state_sh = state_lib.shardings(jax.eval_shape(create, params), axes, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_sh = frozen_shardings(frozen, model, mesh, rules) if frozen_sharding is None else frozen_sharding
    step = step_lib.jit(step_lib.build(nets, phases, masks), state_sh, replicated, frozen_sh)
    settings = runner.Settings(
        total_steps=int(train.steps),
        checkpoint_every=int(train.checkpoint_every),
        keep=2,
        async_save=False,
        log_every=int(train.log_every),
        progress=progress,
        label=label,
        **({"images_per_step": int(images_per_step)} if images_per_step else {}),
    )
    abstract = state_lib.abstract(jax.eval_shape(create, params), state_sh)
    state, summary = runner.run(
        step,
        lambda: jax.jit(create, out_shardings=state_sh)(params),
        abstract,
        runner.StepBatches(batch_fn, replicated),
        workdir,
        settings,
        frozen=jax.device_put(frozen, frozen_sh),
        leaf_names=step_lib.leaf_names(params, masks, phases),
        **({"config": config} if config is not None else {}),
        where=f"mesh {dict(mesh.shape)}",
    )
    info = {k: summary[k] for k in ("resumed_from", "compile_s", "last", "skipped")}
    return state, {"steps": summary["step"], **info, **training_movement(params, state.params, workdir)}


def logged_rows(workdir: str, prefix: str) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` that log a metric named `prefix`…: [{"step", those metrics}, ...]."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    rows = [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith(prefix)}} for r in rows]
    return [r for r in rows if len(r) > 1]


def logged_losses(workdir: str) -> dict:
    """The first and last rows of `workdir/metrics.jsonl` that log a loss: {"loss_initial": {"step", "loss"...},
    "loss_final": {...}} with every "loss*" scalar of the row ({} when nothing was logged). The first logged row is
    step `log_every` (or 1 with log_every 1), the nearest the runner records to the untrained model's loss."""
    rows = logged_rows(workdir, "loss")
    return {"loss_initial": rows[0], "loss_final": rows[-1]} if rows else {}


def training_movement(initial: dict, final: dict, workdir: str) -> dict:
    """What shows whether training moved anything: the initial and final logged losses and ‖Δθ‖ (float), the L2 norm
    of the change of the edited model's network ("unet": selected leaves or adapters); per network when several
    train (e.g. DoCo's discriminator)."""
    norms = {
        name: float(optax.global_norm(jax.tree_util.tree_map(lambda a, b: b - a, initial[name], final[name])))
        for name in initial
    }
    out = {**logged_losses(workdir), "delta_norm": norms.get("unet", next(iter(norms.values()), 0.0))}
    if len(norms) > 1:
        out["delta_norm_by_network"] = norms
    return out


# ------------------------------------------------------------------------------------------- for the methods


def pick(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Deterministic indices of the examples of step `step` (resumable: a pure function of the step)."""
    return np.random.default_rng([seed, 7, step]).integers(0, n, size=batch)


def train_networks(job: Job, networks, phases, params: dict, frozen: dict, batch_fn: BatchFn) -> tuple[Any, dict]:
    """`run` with the job's train block, seed, mesh, model, workdir (OUT/train) and progress setting."""
    t = job.config.train
    return run(
        networks,
        phases,
        params,
        frozen,
        batch_fn,
        t,
        job.train_dir(),
        seed=job.config.seed,
        mesh=job.mesh,
        model=job.model,
        progress=job.progress,
    )


def retention_refused(method: str) -> UserError:
    """The error for `train.retain_weight` set on a method without the retain term (MethodInfo.retention)."""
    from jaxdiff.erase import registry

    with_it = ", ".join(name for name, info in registry.methods().items() if info.retention)
    return UserError(
        f"config.train.retain_weight applies to the methods that fine-tune the UNet's leaves ({with_it}), "
        f"not to {method}; drop it"
    )


def refuse_retention(job: Job) -> None:
    """A clear error when `train.retain_weight` is set for a method that does not fine-tune UNet leaves."""
    if float(job.config.train.get("retain_weight", 0.0)) != 0.0:
        raise retention_refused(job.config.method)


def _key_of(frozen: dict, tree, name: str) -> tuple[dict, str]:
    """The key under which `frozen` already holds `tree` (no second copy on the devices), else `name` added."""
    for k, v in frozen.items():
        if v is tree:
            return frozen, k
    return {**frozen, name: tree}, name


def with_retention(job: Job, loss, batch_fn: BatchFn, base, frozen: dict) -> tuple[Any, BatchFn, dict]:
    """`loss` + w · ‖ε_θ(x_t, c_p) − sg ε_θ*(x_t, c_p)‖² (w = `train.retain_weight`, θ* the original UNet, c_p the
    preserved concepts' captions, x_t their original samples noised at t ~ U[0, T)), with the batches and frozen
    entries it reads; unchanged when w is 0. Trainable leaves combine with `base`, as in `train_selected`."""
    from jaxdiff import selectors
    from jaxdiff.erase import common
    from jaxdiff.sampling.schedulers.common import add_noise

    t = job.config.train
    weight = float(t.get("retain_weight", 0.0))
    if weight == 0.0:
        return loss, batch_fn, frozen
    if weight < 0 or int(t.get("retain_images", 64)) < 1:
        raise UserError(
            f"config.train.retain_weight={weight}, retain_images={t.get('retain_images')}: the weight must be >= 0 "
            "and at least one retain image is needed"
        )
    z, contexts = job.retain_data(int(t.retain_images))
    sched = common.ddim(job.pipe.scheduler_config or None)
    acp, T = jnp.asarray(sched.alphas_cumprod), sched.num_train_timesteps
    model = job.model
    frozen, base_key = _key_of(frozen, base, "retain_base")
    frozen, ref_key = _key_of(frozen, job.original, "retain_ref")

    def retained(trainable, frozen, batch, rng):
        value, aux = loss(trainable, frozen, batch, rng)
        k_noise, k_t = jax.random.split(jax.random.fold_in(rng, 7919))
        z0 = batch["retain_latents"].astype(jnp.float32)
        noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
        steps = jax.random.randint(k_t, (z0.shape[0],), 0, T)
        x = add_noise(acp, z0, noise, steps)
        pred = common.eps(model, selectors.combine(trainable, frozen[base_key]), x, steps, batch["retain"])
        ref = jax.lax.stop_gradient(common.eps(model, frozen[ref_key], x, steps, batch["retain"]))
        kept = common.mse(pred, ref)
        return value + weight * kept, {**aux, "retain": kept}

    b, n = int(t.batch_size), z.shape[0]

    def batches(i):
        idx = pick(i, n, b, job.config.seed + 3)
        return {**batch_fn(i), "retain_latents": z[idx], "retain": contexts[idx]}

    return retained, batches, frozen


def train_unet(
    job: Job, loss, trainable, frozen, batch_fn: BatchFn, tx=None, *, retention: bool = False
) -> tuple[Any, dict]:
    """Train `trainable` (the "unet" network: selected UNet leaves or adapters) on `loss` with the runner; returns
    (trained, info). `retention`: the loss already holds the retain term (else `train.retain_weight` is refused)."""
    if not retention:
        refuse_retention(job)
    networks = [unet_network(job.config.train, tx)]
    state, info = train_networks(job, networks, single_loss(loss), {"unet": trainable}, frozen, batch_fn)
    return state.params["unet"], info


def train_selected(job: Job, loss, batch_fn: BatchFn, base=None, frozen=None, tx=None) -> tuple[Any, dict]:
    """Fine-tune the leaves of `base` (default: the original UNet) that `config.train.selector` picks; returns the
    full edited params and the info. `frozen` defaults to {"base": the original UNet}."""
    from jaxdiff.erase import common

    base = job.original if base is None else base
    trainable, _ = common.split(base, job.config.train.selector)
    frozen = {"base": job.original} if frozen is None else frozen
    loss, batch_fn, frozen = with_retention(job, loss, batch_fn, base, frozen)
    trained, info = train_unet(job, loss, trainable, frozen, batch_fn, tx, retention=True)
    return common.combine(trained, base), info
