"""The erasure fine-tuning loop: the trainer's step over a trainable subtree, progress, resumable checkpoints.

An objective `loss(trainable, frozen, batch, rng)` (see `jaxdiff.erase.common`) trains through `jaxdiff.train.step`
(non-finite guard, clipping, the optax chain, one jitted program with the state donated); methods with their own
update rule (DoCo's two optimisers and gradient surgery) give a `step(state, batch, frozen)` instead. Batches are a
pure function of the step index, so a killed run resumes from its last orbax checkpoint and ends bit-identical to
an uninterrupted one. The frozen models are a jit argument, never constants baked into the program.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections as mlc
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import sharding
from jaxdiff.train import checkpoint as ckpt_lib
from jaxdiff.train import metrics as metrics_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib

BatchFn = Callable[[int], dict]  # step index -> batch (deterministic)
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "cosine_with_restarts", "linear")


def learning_rate(train: mlc.ConfigDict) -> Callable:
    """Linear warm-up, then constant / cosine / cosine with `lr_cycles` hard restarts (SPM) / linear decay."""
    lr, warm, steps = float(train.learning_rate), int(train.warmup_steps), int(train.steps)
    rest = max(steps - warm, 1)
    kind = train.lr_schedule
    if kind not in SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, rest)
    elif kind == "linear":
        after = optax.linear_schedule(lr, 0.0, rest)
    else:
        cycles = int(train.get("lr_cycles", 1))
        length = max(rest // cycles, 1)
        after = optax.join_schedules(
            [optax.cosine_decay_schedule(lr, length) for _ in range(cycles)], [length * i for i in range(1, cycles)]
        )
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def optimizer(train: mlc.ConfigDict, schedule: Callable) -> optax.GradientTransformation:
    """Adam / AdamW (PyTorch defaults: betas 0.9/0.999, eps 1e-8) / SGD from a config's `train` block."""
    if train.optimizer == "adam":
        return optax.adam(schedule)
    if train.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=float(train.weight_decay))
    if train.optimizer == "sgd":
        return optax.sgd(schedule)
    raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {train.optimizer!r}")


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


@dataclasses.dataclass
class Trainer:
    """A compiled-on-first-use erasure step with its initial state and where its inputs live."""

    step: Callable  # jitted step(state, batch, frozen) -> (state, metrics), state donated
    state: Any
    leaf_names: dict  # the trainable leaves' paths, to name non-finite gradients
    batch_sharding: Any = None  # None: wherever the arrays are (single device)
    frozen_sharding: Any = None


def trainer_step(
    loss,
    trainable,
    train: mlc.ConfigDict,
    seed: int,
    tx: optax.GradientTransformation | None = None,
    *,
    mesh: Mesh | None = None,
    model=None,
    frozen=None,
    rules=sharding.DEFAULT_RULES,
) -> Trainer:
    """An erasure loss through the trainer's step. With a `mesh` (and the `model` whose params the trainable leaves
    come from, and the `frozen` models), the state and the frozen models are sharded by their logical axes and the
    step is jitted with those shardings (batches replicated); without one it runs where the arrays are."""
    schedule = learning_rate(train)
    tx = optimizer(train, schedule) if tx is None else tx
    phase = step_lib.Phase("model", loss, tx, None, schedule, float(train.max_grad_norm))
    masks = {"model": jax.tree_util.tree_map(lambda _: True, trainable)}
    build = step_lib.build([phase], masks)
    create = lambda p: state_lib.create(p, {"model": tx}, masks, seed=seed, ema=False)  # noqa: E731
    names = step_lib.leaf_names(trainable, masks)
    if mesh is None:
        return Trainer(jax.jit(build, donate_argnums=(0,)), jax.jit(create)(trainable), names)
    axes = logical_axes_like(trainable, model.logical_axes)
    state_sh = state_lib.shardings(jax.eval_shape(create, trainable), axes, mesh, rules)
    state = jax.jit(create, out_shardings=state_sh)(trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_sh = frozen_shardings(frozen, model, mesh, rules)
    return Trainer(step_lib.jit(build, state_sh, replicated, frozen_sh), state, names, replicated, frozen_sh)


def run(
    step: Callable,
    state: Any,
    frozen: Any,
    batch_fn: BatchFn,
    steps: int,
    workdir: str,
    *,
    checkpoint_every: int = 0,
    log_every: int = 10,
    progress: bool = True,
    leaf_names: dict | None = None,
    nonfinite: str = "stop",
    batch_sharding=None,
    frozen_sharding=None,
) -> tuple[Any, dict]:
    """Run `step` until `steps`, resuming from `workdir/checkpoints`; returns (final state, info).

    checkpoint_every 0: a checkpoint only at the end (and on SIGTERM). A non-finite loss or gradient stops the run
    (`step.NonFiniteError`, naming the tensors) unless nonfinite="skip" (the trainer's step left them unchanged).
    `batch_sharding` / `frozen_sharding`: where to place each batch and the frozen models (a sharded step's).
    """
    if frozen_sharding is not None:
        frozen = jax.device_put(frozen, frozen_sharding)
    place = (lambda b: jax.device_put(b, batch_sharding)) if batch_sharding is not None else (lambda b: b)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, async_save=False)
    checkpointer.install_sigterm()
    start = checkpointer.latest_step() or 0
    writer = None
    try:
        if start:
            abstract = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
            )
            state, _, _ = checkpointer.restore(start, abstract)
        writer = metrics_lib.MetricsWriter(
            workdir, total_steps=steps, initial_step=start, images_per_step=1, tensorboard=True, progress=progress
        )
        if start >= steps:
            return state, {"steps": start, "resumed_from": start, "compile_s": 0.0, "last": {}}
        t0 = time.perf_counter()
        compiled = step.lower(state, place(batch_fn(start)), frozen).compile()
        compile_s = time.perf_counter() - t0
        writer.message(f"step {start}: compiled the erasure step in {compile_s:.1f} s" + (", resumed" if start else ""))
        writer.reset_timer(start)
        tally = {"last": {}, "skipped": 0}
        pending = []  # (step, metrics on device): read one step late so the host never stalls the device

        def flush():
            if not pending:
                return
            done, metrics = pending.pop()
            metrics = jax.device_get(metrics)
            if "finite" in metrics:
                report = step_lib.nonfinite_report(metrics, leaf_names or {}, done)
                if report is not None:
                    if nonfinite == "stop":
                        raise step_lib.NonFiniteError(f"{report}; last checkpoint: {checkpointer.latest_step()}")
                    tally["skipped"] += 1
                    writer.message(f"skipped update: {report}")
            last = {k: float(v) for k, v in metrics.items() if k != "finite" and getattr(v, "ndim", 1) == 0}
            tally["last"] = last
            writer.advance(1, loss=last.get("loss", next(iter(last.values()), 0.0)))
            if done % max(log_every, 1) == 0 or done == steps:
                writer.write(done, last)

        for i in range(start, steps):
            state, metrics = compiled(state, place(batch_fn(i)), frozen)
            flush()  # the previous step's metrics, while this one runs
            pending.append((i + 1, metrics))
            preempted = checkpointer.preempted(i + 1)
            if (checkpoint_every and (i + 1) % checkpoint_every == 0) or i + 1 == steps or preempted:
                flush()  # never checkpoint a step whose non-finite report has not been read
                checkpointer.save(i + 1, state, {"step": i + 1}, {"step": i + 1})
            if preempted:
                checkpointer.wait()
                writer.message(f"preempted (SIGTERM) at step {i + 1}: checkpoint saved; rerun to resume")
                raise KeyboardInterrupt("preempted")
        flush()
        last, skipped = tally["last"], tally["skipped"]
        return state, {"steps": steps, "resumed_from": start, "compile_s": compile_s, "last": last, "skipped": skipped}
    finally:
        checkpointer.close()
        if writer is not None:
            writer.close()
