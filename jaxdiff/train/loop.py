"""`train(config, workdir)`: mesh, model, data, compiled step, checkpoints and metrics; resumes automatically."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import sharding
from jaxdiff.train import checkpoint as ckpt_lib
from jaxdiff.train import config as config_lib
from jaxdiff.train import data as data_lib
from jaxdiff.train import distributed, objectives
from jaxdiff.train import frozen as frozen_lib
from jaxdiff.train import metrics as metrics_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def learning_rate_schedule(opt: mlc.ConfigDict, total_steps: int) -> Callable:
    """Linear warm-up for `warmup_steps`, then constant, cosine or linear decay to 0 at `total_steps`."""
    lr, warm = float(opt.learning_rate), int(opt.warmup_steps)
    rest = max(total_steps - warm, 1)
    after = {
        "constant": optax.constant_schedule(lr),
        "cosine": optax.cosine_decay_schedule(lr, rest),
        "linear": optax.linear_schedule(lr, 0.0, rest),
    }[opt.schedule]
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def optimizer(opt: mlc.ConfigDict, schedule: Callable) -> optax.GradientTransformation:
    """The optax transformation (clipping is done by the step, from the gradient norm it computes anyway)."""
    if opt.name == "adamw":
        return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    return optax.sgd(schedule, momentum=opt.b1 or None)


@dataclasses.dataclass
class Setup:
    """Everything `train` builds before compiling: no device memory is used for the state yet."""

    config: mlc.ConfigDict
    mesh: Mesh
    rules: tuple
    model: Any  # jaxdiff Model with abstract params
    phases: list[step_lib.Phase]
    masks: dict[str, Any]
    init_state: Callable[..., state_lib.TrainState]  # init_state(params=None): random init from the seed when None
    load_pretrained: Callable[[], Any] | None  # reads model.pretrained's weights; None without one
    abstract_state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    batch_sharding: NamedSharding
    frozen: frozen_lib.FrozenModels | None = None  # the VAE and text encoder of image + caption data
    frozen_shardings: Any = None  # {"vae", "text_encoder"} -> NamedSharding trees


def setup(config: mlc.ConfigDict, devices=None) -> Setup:
    """Validate the config (ConfigError before anything compiles) and build mesh, model, phases, shardings."""
    devices = list(devices if devices is not None else jax.devices())
    config = config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(config_lib.mesh_shape(config.mesh, len(devices)), devices)
    rules = sharding.rules_from_config(config.sharding_rules)
    dtype = DTYPES[config.model.compute_dtype]

    from jaxdiff.models.model import create
    from jaxdiff.models.registry import architecture_for

    load_pretrained = None
    if config.model.pretrained:
        import jaxdiff

        path = config.model.pretrained
        unet_config = dict(jaxdiff.init_model(path, abstract=True).config)  # reads config.json only

        def load_pretrained():  # the weights, read only when a run starts without a checkpoint
            return jaxdiff.load_model(path, dtype=dtype, attention=config.model.attention).params
    else:
        unet_config = {"_class_name": config.model.name, **config.model.unet.to_dict()}
    frozen = None
    if config.objective.image_key:
        frozen = frozen_lib.from_config(config, dtype)
        frozen_lib.check_unet(frozen, unet_config)
        if not config.data.tokenizer and frozen.paths["tokenizer"] is not None:
            config.data.tokenizer = str(frozen.paths["tokenizer"])  # captions are tokenized as the model's
    if config.data.tokenizer:
        config.data.tokenizer = str(frozen_lib.tokenizer_folder(config.data.tokenizer))
    arch = architecture_for(unet_config)
    model = create(arch, unet_config, abstract=True, dtype=dtype, attention=config.model.attention, seed=config.seed)

    apply_fn = model.apply
    if config.train.remat == "blocks":
        apply_fn = objectives.remat_blocks(apply_fn, objectives.unet_block_types())
    if frozen is None:
        loss_fn = objectives.OBJECTIVES[config.objective.name](apply_fn, config.objective)
    else:
        encode = frozen_lib.encoder(frozen, config.objective)
        loss_fn = objectives.image_caption_loss(apply_fn, config.objective, encode)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    tx = optimizer(config.optimizer, schedule)
    phases = [step_lib.Phase("model", loss_fn, tx, config.train.trainable, schedule, config.optimizer.clip_norm)]
    masks = {p.name: state_lib.mask(model.params, p.trainable) for p in phases}
    txs = {p.name: p.tx for p in phases}
    ema = config.train.ema_decay > 0
    inputs = arch.example_inputs(unet_config)

    def init_state(params=None):  # params are an argument, never constants baked into the program
        if params is None:
            params = nn.unbox(model.module.init(jax.random.PRNGKey(config.seed), *inputs)["params"])
        return state_lib.create(params, txs, masks, seed=config.seed, ema=ema)

    abstract = jax.eval_shape(init_state, model.params)
    shardings = state_lib.shardings(abstract, model.logical_axes, mesh, rules)
    spec = sharding.logical_to_mesh_spec(PartitionSpec("batch"), (config.data.global_batch_size,), mesh, rules)
    return Setup(
        config,
        mesh,
        rules,
        model,
        phases,
        masks,
        init_state,
        load_pretrained,
        abstract,
        shardings,
        NamedSharding(mesh, spec),
        frozen,
        None if frozen is None else frozen.shardings(mesh, rules),
    )


def restore(config: mlc.ConfigDict, workdir: str, step: int | None = None, devices=None):
    """(state, data position, meta) of a run's checkpoint, placed on *this* config's mesh (any shape)."""
    s = setup(config, devices)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=s.config.checkpoint.keep)
    try:
        return checkpointer.restore(step, state_lib.abstract(s.abstract_state, s.state_shardings))
    finally:
        checkpointer.close()


def train(config: mlc.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Train until `total_steps`, resuming from the latest checkpoint in `workdir/checkpoints` when there is one.

    Returns {"step", "loss", "compile_s", "preempted", "skipped"}; raises step.NonFiniteError when the loss or a
    gradient goes non-finite with train.nonfinite="stop" (no checkpoint of that step is written).
    """
    s = setup(config, devices)
    config = s.config
    main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    source = data_lib.make_source(config.data)
    batches = data_lib.BatchIterator(
        source,
        config.data.global_batch_size,
        s.batch_sharding,
        seed=config.data.seed,
        shuffle=config.data.shuffle,
        keys=config.data.features,
        prefetch=config.data.prefetch,
    )
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    checkpointer.install_sigterm()
    writer = None
    try:
        start = checkpointer.latest_step()
        if start is not None:
            state, data_state, _ = checkpointer.restore(start, state_lib.abstract(s.abstract_state, s.state_shardings))
            batches.restore(data_state)
            if int(state.data_position) != batches.batches_consumed():
                raise ValueError(
                    f"checkpoint {start}: the state consumed {int(state.data_position)} batches but the data iterator "
                    f"says {batches.batches_consumed()}"
                )
        else:
            start = 0
            if s.load_pretrained is None:
                init = jax.jit(s.init_state, out_shardings=s.state_shardings).lower().compile()
                distributed.barrier("initialiser compiled")
                state = init()
            else:
                params = jax.device_put(s.load_pretrained(), s.state_shardings.params)
                state = jax.jit(s.init_state, out_shardings=s.state_shardings)(params)
        # The VAE and text encoder are read from their folders on every start: they are not in the checkpoints.
        frozen = None if s.frozen is None else jax.device_put(s.frozen.load_params(), s.frozen_shardings)

        options = step_lib.Options(
            accum_steps=config.train.accum_steps,
            ema_decay=config.train.ema_decay,
            remat=config.train.remat,
            batch_sharding=s.batch_sharding,
        )
        step_fn = step_lib.jit(
            step_lib.build(s.phases, s.masks, options), s.state_shardings, s.batch_sharding, s.frozen_shardings
        )
        names = step_lib.leaf_names(s.abstract_state.params, s.masks)
        if start >= config.total_steps:
            return {"step": start, "loss": None, "compile_s": 0.0, "preempted": False, "skipped": 0}

        batch = next(batches)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch, frozen).compile()
        compile_s = time.perf_counter() - t0
        distributed.barrier("train step compiled")
        flops = metrics_lib.flops_of(compiled)
        writer = metrics_lib.MetricsWriter(
            workdir,
            total_steps=config.total_steps,
            initial_step=start,
            images_per_step=config.data.global_batch_size,
            step_flops=flops * len(s.mesh.devices.flat) if flops else None,
            tensorboard=config.log.tensorboard,
            progress=config.log.progress,
            enabled=main,
        )
        writer.message(
            f"step {start}: compiled the train step in {compile_s:.1f} s"
            + (f" ({flops * len(s.mesh.devices.flat) / 1e12:.3g} TFLOP per step)" if flops else "")
            + f"; mesh {dict(s.mesh.shape)}, {jax.process_count()} process(es)"
        )
        run = _Run(config, checkpointer, writer, batches, names)
        step = start
        while True:
            state, metrics = compiled(state, batch, frozen)
            step += 1
            run.pending(step, metrics)
            preempted = checkpointer.preempted(step)
            if step % config.checkpoint.every_steps == 0 or step == config.total_steps or preempted:
                run.flush()
                checkpointer.save(
                    step, state, batches.state(), {"step": step, "config": json.loads(config.to_json_best_effort())}
                )
            if preempted:
                checkpointer.wait()
                writer.message(f"preempted (SIGTERM) at step {step}: checkpoint saved; rerun the command to resume")
                return run.summary(step, compile_s, preempted=True)
            if step == config.total_steps:
                break
            batch = next(batches)
        run.flush()
        return run.summary(step, compile_s, preempted=False)
    finally:
        batches.close()
        checkpointer.close()
        if writer is not None:
            writer.close()


class _Run:
    """Host-side bookkeeping of the loop: metrics are read one step late so the host does not stall the device."""

    def __init__(self, config, checkpointer, writer, batches, names):
        self.config, self.checkpointer, self.writer, self.batches, self.names = (
            config,
            checkpointer,
            writer,
            batches,
            names,
        )
        self._pending = None
        self.skipped = self.skipped_in_a_row = 0
        self.last = {}

    def pending(self, step: int, metrics) -> None:
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        m = jax.device_get(metrics)
        report = step_lib.nonfinite_report(m, self.names, step)
        scalars = {k: v for k, v in m.items() if k != "finite"}
        self.last = scalars
        if report is not None:
            last_ckpt = self.checkpointer.latest_step()
            if self.config.train.nonfinite == "stop":
                self.checkpointer.wait()
                raise step_lib.NonFiniteError(
                    f"{report}. The update was not applied and no checkpoint of this step is written "
                    f"(train.nonfinite='stop'; last checkpoint: {last_ckpt})"
                )
            self.skipped += 1
            self.skipped_in_a_row += 1
            self.writer.message(f"skipped update: {report}")
            self.writer.write(step, {**scalars, "skipped": 1}, timed=False)
            limit = self.config.train.max_skipped_steps
            if limit and self.skipped_in_a_row >= limit:
                self.checkpointer.wait()
                raise step_lib.NonFiniteError(f"{self.skipped_in_a_row} updates in a row skipped; last: {report}")
        else:
            self.skipped_in_a_row = 0
        loss = float(scalars.get("loss", scalars.get(next(iter(scalars)), 0.0)))
        self.writer.advance(1, loss=loss)
        every = self.config.log.every_steps
        if report is None and (step % every == 0 or step == self.config.total_steps):
            self.writer.write(step, scalars)

    def summary(self, step: int, compile_s: float, preempted: bool) -> dict:
        loss = self.last.get("loss")
        return {
            "step": step,
            "loss": None if loss is None else float(loss),
            "compile_s": compile_s,
            "preempted": preempted,
            "skipped": self.skipped,
        }
