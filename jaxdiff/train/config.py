"""Training configs: the schema of every key, its `--config.a.b=value` overrides and validation."""

from __future__ import annotations

import math

import ml_collections as mlc

from jaxdiff import config as config_io
from jaxdiff import sharding
from jaxdiff.config import ConfigError, unknown_key  # noqa: F401  (ConfigError: part of this API)

# Subtrees whose keys are free-form (a diffusers config.json's keys), not checked against the schema.
OPEN = ("model.unet", "data.options")

CHOICES = {
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "objective.name": ("denoising",),
    "objective.prediction_type": ("epsilon", "v_prediction"),
    "objective.beta_schedule": ("scaled_linear", "linear"),
    "optimizer.name": ("adamw", "adam", "sgd"),
    "optimizer.schedule": ("constant", "cosine", "cosine_with_restarts", "linear"),
    "train.remat": ("none", "loss", "blocks"),
    "train.nonfinite": ("skip", "stop"),
}


def default_config() -> mlc.ConfigDict:
    """Every key a training config may set, with its default (configs/train/*.py start from this)."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.total_steps = 100
    c.resume_if_changed = False  # resume a workdir whose saved config differs (the changed keys are printed)

    c.model = mlc.ConfigDict()
    c.model.name = "UNet2DConditionModel"
    c.model.unet = mlc.ConfigDict()  # diffusers config.json keys; ignored when `pretrained` is set
    c.model.pretrained = ""  # a diffusers or jaxdiff UNet folder; "" = random init from `seed`
    c.model.compute_dtype = "float32"  # params stay float32 (master weights); activations in this dtype
    c.model.attention = "auto"
    # Each stack of identical transformer blocks (SDXL's 2- and 10-deep) as one lax.scan: one copy in the compiled
    # program, a far shorter XLA:TPU compile (tools/aot_compile.py's default); same params and results.
    c.model.scan_layers = False
    # Frozen encoders for image + caption data (objective.image_key): a diffusers or jaxdiff pipeline folder, or a
    # built-in name ("shapes"), whose vae/, text_encoder/ and tokenizer/ are used unless given one by one below.
    c.model.pipeline = ""
    c.model.pretrained_vae = ""  # an AutoencoderKL folder (diffusers or jaxdiff)
    c.model.pretrained_text_encoder = ""  # a CLIPTextModel folder (transformers or jaxdiff)
    c.model.tokenizer = ""  # a CLIP tokenizer folder (for the empty prompt of caption dropout)

    c.objective = mlc.ConfigDict()
    c.objective.name = "denoising"
    c.objective.prediction_type = "epsilon"
    c.objective.snr_gamma = 0.0  # > 0: min-SNR-gamma loss weighting (arXiv 2303.09556), 5.0 in the paper
    c.objective.num_train_timesteps = 1000
    c.objective.beta_schedule = "scaled_linear"
    c.objective.beta_start = 0.00085
    c.objective.beta_end = 0.012
    c.objective.input_key = "latents"  # batch feature holding x0 [B, H, W, C]
    c.objective.context_key = "encoder_hidden_states"  # batch feature holding the text context [B, L, D]
    c.objective.input_scale = 1.0  # x0 = batch[input_key] * input_scale (0.18215 for unscaled SD latents)
    # Image + caption data instead of cached latents: "" = off; else the batch feature holding uint8 images
    # [B, H, W, 3], encoded in the step by the frozen VAE (posterior sample, shifted and scaled as its config says).
    c.objective.image_key = ""
    c.objective.caption_key = "input_ids"  # with image_key: CLIP token ids [B, L], encoded by the frozen text encoder
    c.objective.caption_dropout = 0.0  # probability of the empty prompt's ids instead (classifier-free guidance)

    c.data = mlc.ConfigDict()
    c.data.source = "synthetic"  # "synthetic" | "tfds" | "package.module:function" (returns a random-access source)
    c.data.name = ""  # TFDS dataset name (source="tfds")
    c.data.split = "train"
    c.data.data_dir = ""
    c.data.features = ()  # features passed to the objective; () = every numeric feature
    c.data.shuffle = True
    c.data.seed = 0
    c.data.global_batch_size = 8
    c.data.prefetch = 2  # host batches read ahead in a thread
    c.data.tokenizer = ""  # for sources that tokenize captions: a tokenizer or pipeline folder; "" = the model's
    c.data.options = mlc.ConfigDict()  # keyword options of a "package.module:function" source (free-form)
    c.data.synthetic = mlc.ConfigDict(
        dict(num_records=256, size=8, channels=4, context_length=4, context_dim=32, classes=8)
    )

    c.optimizer = mlc.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"  # after `warmup_steps` of linear warm-up
    c.optimizer.warmup_steps = 0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-2
    c.optimizer.clip_norm = 1.0  # global-norm clipping; 0 = off

    c.train = mlc.ConfigDict()
    c.train.trainable = ""  # regex on "a/b/c" param paths; "" = every param
    c.train.accum_steps = 1  # micro-batches per step (gradient accumulation with lax.scan)
    c.train.ema_decay = 0.0  # 0 = no EMA params
    c.train.ema_warmup = False  # decay min(ema_decay, (1 + step) / (10 + step)): early EMA follows the params
    c.train.remat = "none"  # "loss": jax.checkpoint on the loss (save matmuls); "blocks": per UNet block
    c.train.nonfinite = "stop"  # non-finite loss/grad: "skip" the update or "stop" the run
    c.train.max_skipped_steps = 0  # with "skip": stop after this many skipped steps in a row (0 = never)

    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # one axis may be -1 (all remaining devices)
    c.sharding_rules = tuple(sharding.DEFAULT_RULES)

    c.checkpoint = mlc.ConfigDict(dict(every_steps=100, keep=3, async_save=True))
    c.log = mlc.ConfigDict(dict(every_steps=10, tensorboard=True, progress=True))
    return c


def finetune_block(
    steps: int,
    learning_rate: float,
    batch_size: int,
    *,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    warmup_steps: int = 0,
    log_every: int = 10,
    checkpoint_every: int = 0,
) -> mlc.ConfigDict:
    """The `train` block of a fine-tuning job on the runner (`erase.finetune.run`: erasure, personalization,
    ControlNet training): steps, optimiser and schedule, clipping, logging and checkpoint cadence."""
    t = mlc.ConfigDict()
    t.steps = steps
    t.learning_rate = learning_rate
    t.batch_size = batch_size
    t.optimizer = optimizer  # adamw | adam | sgd
    t.weight_decay = weight_decay
    t.max_grad_norm = max_grad_norm  # 0: no clipping
    t.lr_schedule = "constant"  # constant | cosine | cosine_with_restarts | linear
    t.lr_cycles = 1
    t.warmup_steps = warmup_steps
    t.log_every = log_every
    t.checkpoint_every = checkpoint_every  # 0: only at the end
    return t


def apply_overrides(config: mlc.ConfigDict, overrides: list[str]) -> mlc.ConfigDict:
    """`--config.a.b=value` overrides of a training config, checked against this schema (free-form under OPEN)."""
    return config_io.apply_overrides(config, overrides, schema=default_config(), open_keys=OPEN)


def _open(path: str) -> bool:
    return config_io.is_open(path, OPEN)


def _unknown_keys(config, schema, prefix="") -> list[str]:
    problems = []
    for key in config.keys():
        path = f"{prefix}{key}"
        if _open(path):
            continue
        if key not in schema:
            problems.append(unknown_key(path, schema))
        elif isinstance(schema[key], mlc.ConfigDict):
            if not isinstance(config[key], (mlc.ConfigDict, dict)):
                problems.append(f"config key {path!r} must be a group of keys ({', '.join(schema[key])})")
            else:
                problems += _unknown_keys(mlc.ConfigDict(config[key]), schema[key], path + ".")
    return problems


def complete(config: mlc.ConfigDict) -> mlc.ConfigDict:
    """The schema's defaults for every key the config leaves out (unknown keys are left for `validate`)."""
    full = default_config()
    _merge(full, config)
    return full


def _merge(into: mlc.ConfigDict, src) -> None:
    for key, value in src.items():
        if key in into and isinstance(into[key], mlc.ConfigDict) and isinstance(value, (mlc.ConfigDict, dict)):
            _merge(into[key], value)
        else:
            into[key] = value


def mesh_shape(mesh: dict, num_devices: int) -> dict[str, int]:
    """Resolve the -1 axis of a mesh config against `num_devices`; raises ConfigError when it does not fit."""
    shape = {k: int(v) for k, v in dict(mesh).items()}
    bad = [f"{k}={v}" for k, v in shape.items() if v == 0 or v < -1]
    if bad:
        raise ConfigError(f"mesh axis sizes must be positive or -1, got {', '.join(bad)}")
    auto = [k for k, v in shape.items() if v == -1]
    if len(auto) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {', '.join(auto)}")
    known = math.prod(v for v in shape.values() if v != -1)
    if auto:
        if num_devices % known:
            raise ConfigError(
                f"mesh {_fmt(shape)} does not divide the {num_devices} devices ({known} does not divide it)"
            )
        shape[auto[0]] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(f"mesh {_fmt(shape)} needs {math.prod(shape.values())} devices but there are {num_devices}")
    return shape


def _fmt(shape: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in shape.items()) + "}"


def batch_axes(rules) -> tuple[str, ...]:
    target = dict(sharding.rules_from_config(rules)).get("batch")
    return (target,) if isinstance(target, str) else tuple(target or ())


FROZEN_KEYS = ("pipeline", "pretrained_vae", "pretrained_text_encoder", "tokenizer")


def _data_path_problems(config: mlc.ConfigDict) -> list[str]:
    """Latents + contexts, or images + captions with the frozen encoders that read them: not half of each."""
    obj, model, problems = config.objective, config.model, []
    if not 0.0 <= float(obj.caption_dropout) <= 1.0:
        problems.append(f"config.objective.caption_dropout must be in [0, 1], got {obj.caption_dropout}")
    if obj.image_key:
        if not model.pipeline and not (model.pretrained_vae and model.pretrained_text_encoder):
            problems.append(
                f"config.objective.image_key={obj.image_key!r} needs the frozen encoders: set config.model.pipeline "
                "(a pipeline folder or 'shapes'), or config.model.pretrained_vae and "
                "config.model.pretrained_text_encoder"
            )
        if obj.caption_dropout > 0 and not (model.pipeline or model.tokenizer):
            problems.append(
                "config.objective.caption_dropout > 0 needs the empty prompt's token ids: set config.model.tokenizer "
                "(or config.model.pipeline)"
            )
        if obj.input_scale != 1.0:
            problems.append(
                "config.objective.input_scale applies to cached latents; with image_key the VAE's scaling_factor "
                "is used"
            )
        features = tuple(config.data.features)
        missing = [k for k in (obj.image_key, obj.caption_key) if features and k not in features]
        if missing:
            problems.append(f"config.data.features={features} leaves out the objective's {missing}")
    else:
        set_keys = [f"config.model.{k}" for k in FROZEN_KEYS if model[k]]
        if set_keys:
            problems.append(
                f"{', '.join(set_keys)}: frozen encoders are for image + caption data; set config.objective.image_key "
                f"(e.g. 'image') or leave them empty to train on cached {obj.input_key!r}"
            )
        if obj.caption_dropout > 0:
            problems.append("config.objective.caption_dropout needs image + caption data (config.objective.image_key)")
    return problems


def validate(config: mlc.ConfigDict, num_devices: int) -> mlc.ConfigDict:
    """The completed config, or a ConfigError naming every problem (nothing has been compiled yet)."""
    problems = _unknown_keys(config, default_config())
    if problems:
        raise ConfigError("; ".join(problems))
    config = complete(config)
    for path, allowed in CHOICES.items():
        group, key = path.split(".")
        if config[group][key] not in allowed:
            problems.append(f"config.{path}={config[group][key]!r} is not one of {', '.join(allowed)}")
    unknown_axes = set(config.mesh) - set(sharding.MESH_AXES)
    if unknown_axes:
        problems.append(f"unknown mesh axes {sorted(unknown_axes)}; use {', '.join(sharding.MESH_AXES)}")
    for key in ("total_steps",):
        if config[key] <= 0:
            problems.append(f"config.{key} must be positive, got {config[key]}")
    for path in ("data.global_batch_size", "train.accum_steps", "checkpoint.every_steps", "checkpoint.keep"):
        group, key = path.split(".")
        if int(config[group][key]) <= 0:
            problems.append(f"config.{path} must be positive, got {config[group][key]}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        problems.append(f"config.train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    problems += _data_path_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))

    shape = mesh_shape(config.mesh, num_devices)
    shards = math.prod(shape[a] for a in batch_axes(config.sharding_rules) if a in shape)
    batch, accum = config.data.global_batch_size, config.train.accum_steps
    if batch % accum:
        raise ConfigError(f"data.global_batch_size={batch} is not divisible by train.accum_steps={accum}")
    if (batch // accum) % shards:
        used = [a for a in batch_axes(config.sharding_rules) if a in shape]
        axes = "×".join(f"{a}={shape[a]}" for a in used if shape[a] > 1) or "×".join(f"{a}=1" for a in used)
        per_step = f" / train.accum_steps={accum} = {batch // accum} per micro-batch" if accum > 1 else ""
        raise ConfigError(
            f"data.global_batch_size={batch}{per_step} is not divisible by the data axes ({axes}) = {shards} devices; "
            f"use a global_batch_size that is a multiple of {shards * accum}"
        )
    return config
