"""`train(config, workdir)`: `jaxdiff train` as one network ("unet") on the runner: mesh, model, data, encoders."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import platforms, sharding
from jaxdiff.train import checkpoint as ckpt_lib
from jaxdiff.train import config as config_lib
from jaxdiff.train import data as data_lib
from jaxdiff.train import distributed, objectives, optim, runner
from jaxdiff.train import frozen as frozen_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Setup:
    """Everything `train` builds before compiling: no device memory is used for the state yet."""

    config: mlc.ConfigDict
    mesh: Mesh
    rules: tuple
    model: Any  # jaxdiff Model with abstract params
    networks: dict[str, step_lib.Network]
    phases: list[step_lib.Phase]
    masks: dict[str, Any]  # network -> trainable mask
    init_state: Callable[..., state_lib.TrainState]  # init_state(params=None): random init from the seed when None
    load_pretrained: Callable[[], Any] | None  # reads model.pretrained's weights; None without one
    abstract_state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    batch_sharding: NamedSharding
    frozen: frozen_lib.FrozenModels | None = None  # the VAE and text encoder of image + caption data
    frozen_shardings: Any = None  # {"vae", "text_encoder"} -> NamedSharding trees


def setup(config: mlc.ConfigDict, devices=None) -> Setup:
    """Validate the config (ConfigError before anything compiles) and build mesh, model, phases, shardings.

    `devices` (default: jax.devices()) may be of another platform than the host's, e.g. the TPU devices of a
    topology description for ahead-of-time compilation: the models are built for the mesh's platform."""
    devices = list(devices if devices is not None else jax.devices())
    config = config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(config_lib.mesh_shape(config.mesh, len(devices)), devices)
    platform = platforms.of(mesh)
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
            return jaxdiff.load_model(path, dtype=dtype, attention=config.model.attention, platform=platform).params
    else:
        unet_config = {"_class_name": config.model.name, **config.model.unet.to_dict()}
    frozen = None
    if config.objective.image_key:
        frozen = frozen_lib.from_config(config, dtype, platform)
        frozen_lib.check_unet(frozen, unet_config)
        if not config.data.tokenizer and frozen.paths["tokenizer"] is not None:
            config.data.tokenizer = str(frozen.paths["tokenizer"])  # captions are tokenized as the model's
    if config.data.tokenizer:
        config.data.tokenizer = str(frozen_lib.tokenizer_folder(config.data.tokenizer))
    arch = architecture_for(unet_config)
    model = create(
        arch,
        unet_config,
        abstract=True,
        dtype=dtype,
        attention=config.model.attention,
        seed=config.seed,
        platform=platform,
    )
    if config.model.scan_layers:
        model = model.with_module(scan_layers=True)

    apply_fn = model.apply
    if config.train.remat == "blocks":
        apply_fn = objectives.remat_blocks(apply_fn, objectives.unet_block_types())
    if frozen is None:
        loss_fn = objectives.OBJECTIVES[config.objective.name](apply_fn, config.objective)
    else:
        encode = frozen_lib.encoder(frozen, config.objective)
        loss_fn = objectives.image_caption_loss(apply_fn, config.objective, encode)
    opt = config.optimizer
    schedule = optim.schedule(opt.learning_rate, config.total_steps, kind=opt.schedule, warmup_steps=opt.warmup_steps)
    tx = optim.optimizer(opt.name, schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    unet = step_lib.Network(
        "unet", tx, schedule, config.train.trainable, opt.clip_norm, config.train.ema_decay, config.train.ema_warmup
    )
    phases = [step_lib.Phase("unet", "unet", lambda p, frozen, batch, rng: loss_fn(p["unet"], frozen, batch, rng))]
    masks = {"unet": state_lib.mask(model.params, unet.trainable)}
    ema = ("unet",) if config.train.ema_decay > 0 else ()
    inputs = arch.example_inputs(unet_config)

    def init_state(params=None):  # params are an argument, never constants baked into the program
        if params is None:
            params = nn.unbox(model.module.init(jax.random.PRNGKey(config.seed), *inputs)["params"])
        return state_lib.create({"unet": params}, {"unet": tx}, masks, seed=config.seed, ema=ema)

    abstract = jax.eval_shape(init_state, model.params)
    shardings = state_lib.shardings(abstract, {"unet": model.logical_axes}, mesh, rules)
    spec = sharding.logical_to_mesh_spec(PartitionSpec("batch"), (config.data.global_batch_size,), mesh, rules)
    return Setup(
        config,
        mesh,
        rules,
        model,
        {"unet": unet},
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
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=s.config.checkpoint.keep, platform=platforms.of(s.mesh)
    )
    try:
        return checkpointer.restore(step, state_lib.abstract(s.abstract_state, s.state_shardings))
    finally:
        checkpointer.close()


def train(config: mlc.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Train until `total_steps`, resuming from the latest checkpoint in `workdir/checkpoints` when there is one.

    Returns {"step", "loss", "compile_s", "skipped", ...} (see runner.run); raises step.NonFiniteError when the loss
    or a gradient goes non-finite with train.nonfinite="stop" (no checkpoint of that step is written) and
    errors.Preempted after saving on SIGTERM.
    """
    s = setup(config, devices)
    config = s.config
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

    def init_state():
        if s.load_pretrained is None:
            init = jax.jit(s.init_state, out_shardings=s.state_shardings).lower().compile()
            distributed.barrier("initialiser compiled")
            return init()
        params = jax.device_put(s.load_pretrained(), s.state_shardings.params["unet"])
        return jax.jit(s.init_state, out_shardings=s.state_shardings)(params)

    options = step_lib.Options(
        accum_steps=config.train.accum_steps, remat=config.train.remat, batch_sharding=s.batch_sharding
    )
    step_fn = step_lib.jit(
        step_lib.build(s.networks, s.phases, s.masks, options), s.state_shardings, s.batch_sharding, s.frozen_shardings
    )
    settings = runner.Settings(
        total_steps=config.total_steps,
        checkpoint_every=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
        log_every=config.log.every_steps,
        progress=config.log.progress,
        tensorboard=config.log.tensorboard,
        nonfinite=config.train.nonfinite,
        max_skipped_steps=config.train.max_skipped_steps,
        images_per_step=config.data.global_batch_size,
        resume_if_changed=config.resume_if_changed,
    )
    # The VAE and text encoder are read from their folders on every start: they are not in the checkpoints.
    frozen = None if s.frozen is None else jax.device_put(s.frozen.load_params(), s.frozen_shardings)
    _, summary = runner.run(
        step_fn,
        init_state,
        state_lib.abstract(s.abstract_state, s.state_shardings),
        batches,
        workdir,
        settings,
        frozen=frozen,
        leaf_names=step_lib.leaf_names(s.abstract_state.params, s.masks, s.phases),
        config=json.loads(config.to_json_best_effort()),
        step_flops_scale=len(s.mesh.devices.flat),
        where=f"mesh {dict(s.mesh.shape)}",
    )
    return summary
