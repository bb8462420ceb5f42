"""Compile jaxdiff's train step, sampling loop or a distillation step for a TPU topology on this host: per-chip HBM,
FLOPs, roofline time.

Needs libtpu (`pip install -e ".[tpu-aot]"`, i.e. jax[tpu]; no TPU chips): JAX describes the topology's devices
(`jax.experimental.topologies`), the real program is built for them (the trainer's step from `jaxdiff.train.loop`
with AdamW and optionally EMA, or the pipeline's compiled denoising loop + VAE decode) from abstract params,
lowered and compiled by XLA:TPU, and XLA's own memory and cost analyses are printed.

    python tools/aot_compile.py --topology v5e:2x2 --model tiny --mesh fsdp=4 --batch 8
    python tools/aot_compile.py --topology v5e:4x4 --model sd15 --mesh fsdp=16 --batch 64 --res 512 --remat blocks
    python tools/aot_compile.py --topology v5p:2x2x1 --model sdxl --task sample --mesh data=4 --batch 8 --res 1024
    python tools/aot_compile.py --topology v5e:4x4 --model path/to/diffusers-pipeline --mesh fsdp=16 --batch 64
    python tools/aot_compile.py --topology v5e:2x2 --model sd15 --task distill --method dmd2 --mesh fsdp=4 --batch 8

HBM per device: arguments (params, optimiser state, EMA, the batch), outputs, temporaries and generated code, and
their peak (arguments + outputs - donated aliases + temporaries + code) against the chip's capacity. FLOPs are
XLA's count per device, which misses loop trips (SPMD windowed einsums, scans); the roofline time is
max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth) with the larger of XLA's and the model FLOPs (3x the
UNet forward's matmul and convolution FLOPs for training), and the implied MFU divides the model FLOPs by the peak
over that time: what the step would reach if it ran at the roofline (remat's recomputation and non-matmul work
lower it). Sampling: XLA counts the loop body once, so the time is from the model FLOPs of `--steps` guided
UNet calls and one VAE decode.

Distillation (`--task distill --method M`): the step `jaxdiff distill` trains (the networks and phases of the
method's `build` in `jaxdiff.distill`, its config `configs/distill/<M>.py` with `--set KEY=VALUE` overrides,
train.batch_size = `--batch`), the student, fake score / target networks and the frozen teacher all from abstract
params, every UNet-shaped tree sharded by the UNet's logical axes and the batch over the batch axes (the runner
itself trains on one device). Its model FLOPs are the matmuls and convolutions of the whole step's jaxpr (every
UNet call, forward and backward, scan trips counted; a backward-simulation loop of traced length once).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

# The host compiles on its CPU backend; the TPU devices come from the topology description, not from chips.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu's start-up otherwise looks for the (absent) pod's workers and metadata server, and warns at length.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Compiling holds no chips: let several compiles (and a training job on a TPU VM) load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float  # HBM per chip
    bf16_tflops: float  # dense bf16 peak per chip
    hbm_gbps: float  # HBM bandwidth per chip, GB/s


# Vendor data sheets (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS = {
    "v4": Chip(32, 275, 1228),
    "v5e": Chip(16, 197, 819),
    "v5p": Chip(95, 459, 2765),
    "v6e": Chip(32, 918, 1640),
}
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e"}
MODELS = ("tiny", "sd15", "sd21", "sdxl")
# --method -> (jaxdiff.distill module, its default config); sfd and rcm are variants of SiD and sCM.
DISTILL_METHODS = {
    "reflow": ("rectified_flow", "configs/distill/reflow.py"),
    "instaflow": ("rectified_flow", "configs/distill/instaflow.py"),
    "sid": ("sid", "configs/distill/sid.py"),
    "sfd": ("sid", "configs/distill/sid.py:sfd"),
    "dmd2": ("dmd2", "configs/distill/dmd2.py"),
    "lcm": ("lcm", "configs/distill/lcm.py"),
    "scm": ("scm", "configs/distill/scm.py"),
    "rcm": ("scm", "configs/distill/scm.py:rcm"),
}
OPT_LEVELS = ("default", "O0", "O1", "O2", "O3")
OPT_LEVEL_HELP = (
    "XLA's optimisation level for the compile (default: the backend's own, what a training run gets). O0 compiled "
    "the SD1.5 train step for v5e:4x4 in 262 s instead of 1340-1557 s, in 7 GB of host memory instead of 18; it "
    "leaves out the default's asynchronous prefetch copies and extra all-gathers, so its peak HBM is lower "
    "(-7 to -8 %%) and XLA's HBM traffic count about half: plans at O0 are estimates (docs/tpu_plans.md)"
)
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "bfloat16": "bfloat16", "float32": "float32"}


@dataclasses.dataclass
class ModelSpec:
    """Configs of the UNet and VAE and the shapes of their conditioning; nothing is read but config.json files."""

    name: str
    unet: dict
    vae: dict
    context_length: int
    prediction_type: str = "epsilon"
    train_config: str = "configs/train/sd15.py:synthetic"
    scheduler: dict = dataclasses.field(default_factory=dict)

    @property
    def context_dim(self) -> int:
        cross = self.unet.get("cross_attention_dim", 1280)
        return cross[0] if isinstance(cross, (list, tuple)) else int(cross)

    @property
    def pooled_dim(self) -> int | None:
        if self.unet.get("addition_embed_type") != "text_time":
            return None
        return self.unet["projection_class_embeddings_input_dim"] - 6 * self.unet["addition_time_embed_dim"]

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", (64,))) - 1)

    @property
    def native_res(self) -> int:
        return int(self.unet.get("sample_size", 64)) * self.vae_factor


# diffusers' SD scheduler_config.json (PNDM for SD 1.x, DDIM for 2.x; the loop's cost does not depend on it).
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def model_spec(name: str) -> ModelSpec:
    """tiny | sd15 | sd21 | sdxl, or a diffusers/jaxdiff pipeline folder or UNet folder (config.json only)."""
    from jaxdiff.models import unet, vae

    if name == "tiny":
        from jaxdiff.config import load_config

        c = load_config(str(ROOT / "configs/train/unet_tiny.py"))
        tiny_vae = dict(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
        )
        return ModelSpec(
            "tiny",
            {"_class_name": "UNet2DConditionModel", **c.model.unet.to_dict()},
            tiny_vae,
            int(c.data.synthetic.context_length),
            train_config="configs/train/unet_tiny.py:single",
            scheduler=SD_SCHEDULER,
        )
    if name == "sd15":
        return ModelSpec("sd15", dict(unet.SD15_CONFIG), dict(vae.SD_CONFIG), 77, scheduler=SD_SCHEDULER)
    if name == "sd21":
        return ModelSpec(
            "sd21", dict(unet.SD21_CONFIG), dict(vae.SD_CONFIG), 77, "v_prediction", scheduler=SD_SCHEDULER
        )
    if name == "sdxl":
        return ModelSpec(
            "sdxl", dict(unet.SDXL_CONFIG), dict(vae.SD_CONFIG, scaling_factor=0.13025), 77, scheduler=SD_SCHEDULER
        )
    from jaxdiff.convert.checkpoint import read_json

    path = Path(name).expanduser()
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {name}: not one of {', '.join(MODELS)} and no config.json in {folder}")
    unet_config = read_json(folder / "config.json")
    vae_path = path / "vae" / "config.json"
    vae_config = read_json(vae_path) if vae_path.is_file() else dict(vae.SD_CONFIG)
    text_path = path / "text_encoder" / "config.json"
    length = read_json(text_path).get("max_position_embeddings", 77) if text_path.is_file() else 77
    sched_path = path / "scheduler" / "scheduler_config.json"
    scheduler = read_json(sched_path) if sched_path.is_file() else SD_SCHEDULER
    prediction = scheduler.get("prediction_type", "epsilon")
    return ModelSpec(path.name, unet_config, vae_config, int(length), prediction, scheduler=scheduler)


def topology(name: str):
    """(chip name, Chip, devices, devices per chip) of a topology such as "v5e:4x4" or "v5p:2x2x1"."""
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing, or a name it does not know
        raise SystemExit(f"--topology {name}: {type(e).__name__}: {e}") from None
    devices = list(desc.devices)
    kind = DEVICE_KINDS.get(devices[0].device_kind) or name.split(":")[0].lower()
    if kind not in CHIPS:
        raise SystemExit(f"--topology {name}: unknown chip {devices[0].device_kind!r} (known: {', '.join(CHIPS)})")
    chips = math.prod(int(d) for d in name.split(":")[1].split("x")) if ":" in name else len(devices)
    return kind, CHIPS[kind], devices, max(1, len(devices) // chips)


def parse_mesh(text: str) -> dict[str, int]:
    """ "fsdp=16" or "data=2,fsdp=8" -> {"data": 2, "fsdp": 8, "tensor": 1} (one axis may be -1)."""
    from jaxdiff import sharding

    mesh = {a: 1 for a in sharding.MESH_AXES}
    for part in filter(None, text.replace(" ", "").split(",")):
        axis, _, size = part.partition("=")
        if axis not in mesh or not size.lstrip("-").isdigit():
            raise SystemExit(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE] with axes {', '.join(mesh)}")
        mesh[axis] = int(size)
    return mesh


def matmul_flops(fn, *args) -> float:
    """FLOPs of the matmuls and convolutions in `fn`'s jaxpr (2 per multiply-add): the model FLOPs of MFU."""
    import jax

    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the matmuls and convolutions in `jaxpr` (2 per multiply-add; a scan's body times its length, a while
    loop's body once, every branch of a cond, a Pallas kernel's body times its grid)."""
    import numpy as np

    def walk(jaxpr, times=1.0):
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                k = np.prod([lhs[d] for d in contract]) if contract else 1
                total += times * 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(k)
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape  # the kernel: its spatial dims and input features per group
                spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
                per_output = np.prod([rhs[d] for d in spec[1:]])
                total += times * 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(per_output)
            if name == "pallas_call":  # a kernel body runs once per grid point (splash attention: per block pair)
                grid = eqn.params["grid_mapping"].grid
                total += walk(eqn.params["jaxpr"], times * float(np.prod([int(g) for g in grid])))
                continue
            scale = eqn.params.get("length", 1) if name == "scan" else 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        total += walk(sub, times * scale)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        total += walk(sub.jaxpr, times * scale)
        return total

    return walk(jaxpr)


@dataclasses.dataclass
class Program:
    """A jitted program, its abstract arguments (with shardings) and its model FLOPs (global, per call)."""

    fn: object
    args: tuple
    model_flops: float
    num_params: int
    mesh: dict
    notes: list
    traced: object = None  # `fn` already traced on `args` (its jaxpr gave the model FLOPs): lowered from this
    trace_s: float = 0.0  # the seconds that tracing took (counted as lowering)


def train_program(spec: ModelSpec, devices, mesh: dict, args) -> Program:
    """The trainer's step (`jaxdiff train`: denoising loss, AdamW, clipping, EMA, non-finite guard) on `devices`."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.config import load_config
    from jaxdiff.train import config as config_lib
    from jaxdiff.train import loop
    from jaxdiff.train import state as state_lib
    from jaxdiff.train import step as step_lib

    config = load_config(str(ROOT / spec.train_config))
    config.model.unet = dict(spec.unet)
    config.model.name = spec.unet.get("_class_name", "UNet2DConditionModel")
    size = args.res // spec.vae_factor
    overrides = [
        f"--config.data.global_batch_size={args.batch}",
        f"--config.model.compute_dtype={DTYPES[args.dtype]}",
        f"--config.model.attention={args.attention}",
        f"--config.model.scan_layers={args.scan_layers}",
        f"--config.train.remat={args.remat}",
        f"--config.train.accum_steps={args.accum}",
        f"--config.train.ema_decay={0.9999 if args.ema else 0.0}",
        f"--config.objective.prediction_type={spec.prediction_type}",
        "--config.data.source=synthetic",
        f"--config.data.synthetic.size={size}",
        f"--config.data.synthetic.context_length={spec.context_length}",
        f"--config.data.synthetic.context_dim={spec.context_dim}",
        *(f"--config.mesh.{axis}={n}" for axis, n in mesh.items()),
    ]
    config = config_lib.apply_overrides(config, overrides)
    s = loop.setup(config, devices=devices)
    b, channels = args.batch, int(spec.unet.get("in_channels", 4))
    batch = {
        "latents": jax.ShapeDtypeStruct((b, size, size, channels), jnp.float32, sharding=s.batch_sharding),
        "encoder_hidden_states": jax.ShapeDtypeStruct(
            (b, spec.context_length, spec.context_dim), jnp.float32, sharding=s.batch_sharding
        ),
    }
    if spec.pooled_dim is not None:  # SDXL: pooled text embeddings and size/crop ids (objectives.ADDED_COND_KEYS)
        batch["text_embeds"] = jax.ShapeDtypeStruct((b, spec.pooled_dim), jnp.float32, sharding=s.batch_sharding)
        batch["time_ids"] = jax.ShapeDtypeStruct((b, 6), jnp.float32, sharding=s.batch_sharding)
    options = step_lib.Options(accum_steps=args.accum, remat=args.remat, batch_sharding=s.batch_sharding)
    fn = step_lib.jit(step_lib.build(s.networks, s.phases, s.masks, options), s.state_shardings, s.batch_sharding)
    state = state_lib.abstract(s.abstract_state, s.state_shardings)
    unet_args = [batch["latents"], jax.ShapeDtypeStruct((b,), jnp.float32), batch["encoder_hidden_states"]]
    if spec.pooled_dim is not None:
        unet_args.append({"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]})
    forward = matmul_flops(s.model.apply, s.model.params, *unet_args)
    notes = [
        f"platform {s.model.platform}, attention {config.model.attention}, EMA {'on' if args.ema else 'off'}, "
        f"{_scan_note(args, spec)}"
    ]
    return Program(fn, (state, batch, None), 3.0 * forward, s.model.num_params(), dict(s.mesh.shape), notes)


def _scan_note(args, spec) -> str:
    depth = spec.unet.get("transformer_layers_per_block", 1)
    deepest = max(depth) if isinstance(depth, (list, tuple)) else int(depth)
    if deepest < 2:
        return "transformer stacks 1 deep (nothing to scan)"
    return f"transformer stacks up to {deepest} deep {'scanned' if args.scan_layers else 'unrolled'}"


def make_mesh(mesh: dict, devices):
    """The jax Mesh of `parse_mesh`'s axes over `devices` (an axis of -1 takes the devices the others leave)."""
    from jaxdiff import sharding

    shape = {a: n for a, n in mesh.items()}
    if -1 in shape.values():
        known = math.prod(n for n in shape.values() if n != -1)
        shape = {a: (len(devices) // known if n == -1 else n) for a, n in shape.items()}
    return sharding.make_mesh(shape, devices)


def distill_config(args):
    """(the method's module name in jaxdiff.distill, its config): configs/distill/<method>.py, then
    train.batch_size = --batch and the --set KEY=VALUE overrides."""
    from jaxdiff.config import apply_overrides, load_config

    module_name, spec = DISTILL_METHODS[args.method]
    path, _, variant = spec.partition(":")
    config = load_config(str(ROOT / path) + (f":{variant}" if variant else ""))
    overrides = [f"--config.train.batch_size={args.batch}"]
    overrides += [item if item.startswith("--config.") else f"--config.{item}" for item in args.set or ()]
    return module_name, apply_overrides(config, overrides)


def forget_rows(config, batch: int) -> int:
    """SFD's extra forget rows per phase (`sfd.forget_batch_size`, -1 = the batch size) when a forget concept is
    set (the real run adds them only when a training prompt names it)."""
    if "sfd" not in config or not str(config.sfd.forget_concept).strip():
        return 0
    n = int(config.sfd.forget_batch_size)
    return batch if n < 0 else n


def distill_program(spec: ModelSpec, devices, mesh: dict, args) -> Program:
    """The step `jaxdiff distill` trains for `--method` (the method's `build` and `initial_params` in
    `jaxdiff.distill`, as its `train` passes them to the runner), from abstract params, on `devices`."""
    import importlib

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxdiff import platforms, sharding
    from jaxdiff.models.model import create
    from jaxdiff.models.registry import architecture_for
    from jaxdiff.train import state as state_lib
    from jaxdiff.train import step as step_lib

    if spec.pooled_dim is not None:
        raise SystemExit(f"--task distill: {spec.name} takes added conditioning (SDXL); jaxdiff distill refuses it")
    name, config = distill_config(args)
    module = importlib.import_module(f"jaxdiff.distill.{name}")
    m = make_mesh(mesh, devices)
    platform, dtype = platforms.of(m), getattr(jnp, DTYPES[args.dtype])
    unet_config = dict(spec.unet)
    unet_config.setdefault("_class_name", "UNet2DConditionModel")
    unet = create(
        architecture_for(unet_config),
        unet_config,
        abstract=True,
        dtype=dtype,
        attention=args.attention,
        platform=platform,
    ).with_module(scan_layers=args.scan_layers)
    apply = unet.apply
    if args.remat == "blocks":  # not what the runner does: an option to see what block remat would save
        from jaxdiff.train import objectives

        apply = objectives.remat_blocks(apply, objectives.unet_block_types())
    # As the methods' train(): one jitted UNet call (and its bottleneck for DMD2's GAN head).
    unet_fn = jax.jit(lambda p, x, t, c: apply(p, x, t, c))
    features_fn = jax.jit(lambda p, x, t, c: apply(p, x, t, c, method="encode")["mid"])
    size = args.res // spec.vae_factor
    latent_shape = (size, size, int(spec.unet.get("in_channels", 4)))
    scheduler_config = dict(spec.scheduler, prediction_type=spec.prediction_type)
    models = [unet]  # the Models whose params trees are sharded by their logical axes
    extra, extra_note = {}, ""
    if hasattr(module, "student_model") and module.embedding_dim(config[args.method]):  # LCM's w-embedding student
        student = module.student_model(unet, config[args.method])
        models.append(student)
        extra["student_fn"] = module.student_unet_fn(student)
        extra_note = f"; the student has LCM's w-embedding (time_cond_proj_dim {module.embedding_dim(config.lcm)})"
    if name == "scm":  # the tangent's jax.jvp needs an attention forward mode goes through (XLA's on TPU)
        forward_mode = unet.for_forward_mode()
        extra["jvp_unet_fn"] = jax.jit(lambda p, x, t, c: forward_mode.apply(p, x, t, c))
        extra_note += f"; the tangent's jvp runs {forward_mode.module.attention} attention"
    networks, phases = module.build(config, unet_fn, features_fn, scheduler_config, latent_shape, **extra)
    nets = {n.name: n for n in networks}
    length, width = spec.context_length, spec.context_dim
    f32 = jnp.float32
    one_context = jax.ShapeDtypeStruct((1, length, width), f32)
    params = jax.eval_shape(
        lambda student, teacher, c: module.initial_params(config, student, teacher, features_fn, latent_shape, c),
        unet.params,
        unet.params,
        one_context,
    )
    masks = {k: state_lib.mask(params[k], n.trainable) for k, n in nets.items()}
    txs = {k: n.tx for k, n in nets.items()}
    ema = tuple(k for k, n in nets.items() if n.ema_decay > 0)
    abstract_state = jax.eval_shape(lambda p: state_lib.create(p, txs, masks, seed=int(config.seed), ema=ema), params)
    trees = [(jax.tree_util.tree_structure(model.params), model.logical_axes) for model in models]

    def axes_of(tree):
        """The UNet's logical axes for every UNet-shaped subtree (student, fake score, target), else replicated."""
        for structure, logical_axes in trees:
            if jax.tree_util.tree_structure(tree) == structure:
                return logical_axes
        if isinstance(tree, dict):
            return {k: axes_of(v) for k, v in tree.items()}
        return jax.tree_util.tree_map(lambda _: PartitionSpec(), tree)

    axes = {k: axes_of(v) for k, v in params.items()}
    state_sh = state_lib.shardings(abstract_state, axes, m, sharding.DEFAULT_RULES)
    state = state_lib.abstract(abstract_state, state_sh)
    replicated = NamedSharding(m, PartitionSpec())
    frozen, frozen_sh = {}, {}
    if name != "rectified_flow":  # reflow and InstaFlow train on stored pairs: their step has no teacher
        teacher_sh = sharding.param_shardings(unet.params, unet.logical_axes, m)
        frozen_sh = {"teacher": teacher_sh, "uncond": replicated}
        frozen = {
            "teacher": state_lib.abstract(unet.params, teacher_sh),
            "uncond": jax.ShapeDtypeStruct((1, length, width), f32, sharding=replicated),
        }

    # The batch of the method's batch function (`batch_function` / `pair_batches` / run.train's).
    b = args.batch
    n = b + forget_rows(config, b)
    rows = math.gcd(b, n)
    batch_sh = NamedSharding(m, sharding.logical_to_mesh_spec(PartitionSpec("batch"), (rows,), m))

    def latents(k):
        return jax.ShapeDtypeStruct((k, *latent_shape), f32, sharding=batch_sh)

    def contexts(k):
        return jax.ShapeDtypeStruct((k, length, width), f32, sharding=batch_sh)

    if name == "rectified_flow":
        batch = {"z0": latents(b), "z1": latents(b), "context": contexts(b)}
    elif name in ("lcm", "scm"):
        batch = {"x0": latents(b), "context": contexts(b)}
        if name == "scm" and module.uses_dmd(config):
            batch.update(gen_context=contexts(b), gen_teacher_context=contexts(b))
    elif name == "sid":
        weights = jax.ShapeDtypeStruct((n,), f32, sharding=batch_sh)
        batch = {"fake_context": contexts(n), "fake_weight": weights, "gen_context": contexts(n)}
        batch.update(gen_teacher_context=contexts(n), gen_weight=weights)
    else:  # dmd2
        batch = {"context": contexts(n), "gen_context": contexts(n), "gen_teacher_context": contexts(n)}
        if module.uses_gan(config):
            batch["real"] = latents(n)

    options = step_lib.Options(remat="loss" if args.remat == "loss" else "none")
    fn = step_lib.jit(step_lib.build(nets, phases, masks, options), state_sh, batch_sh, frozen_sh)
    t0 = time.perf_counter()
    traced = fn.trace(state, batch, frozen)
    trace_s = time.perf_counter() - t0
    jaxpr = traced.jaxpr
    step_flops = jaxpr_flops(getattr(jaxpr, "jaxpr", jaxpr))

    def count(tree):
        return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))

    described = []
    for k, net in nets.items():
        extra = ", EMA" if net.ema_decay > 0 else ""
        described.append(f"{k} {count(params[k]) / 1e6:.1f}M{extra}")
    phase_list = ", ".join(p.name + (f" x{p.repeat}" if p.repeat > 1 else "") for p in phases)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items())
    notes = [
        f"platform {platform}, attention {args.attention}; method {args.method} ({DISTILL_METHODS[args.method][1]}"
        + (f" {' '.join(args.set)}" if args.set else "")
        + ")",
        f"networks: {', '.join(described)}; phases: {phase_list}; frozen: "
        + ("teacher UNet + uncond" if frozen else "none (pairs)")
        + extra_note,
        f"batch: {shapes}",
    ]
    return Program(fn, (state, batch, frozen), step_flops, unet.num_params(), dict(m.shape), notes, traced, trace_s)


def sample_program(spec: ModelSpec, devices, mesh: dict, args) -> Program:
    """The pipeline's compiled sampling program: `--steps` guided UNet calls in one fori_loop, then the VAE decode."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxdiff import platforms, sharding
    from jaxdiff.models import splash
    from jaxdiff.models.model import create
    from jaxdiff.models.registry import architecture_for
    from jaxdiff.sampling import make_scheduler
    from jaxdiff.sampling.pipeline import Pipeline

    m = make_mesh(mesh, devices)
    platform, dtype = platforms.of(m), getattr(jnp, DTYPES[args.dtype])
    models = {}
    for name, config in (("unet", spec.unet), ("vae", dict(spec.vae, _class_name="AutoencoderKL"))):
        config = dict(config)
        config.setdefault("_class_name", "UNet2DConditionModel")
        models[name] = create(
            architecture_for(config), config, abstract=True, dtype=dtype, attention=args.attention, platform=platform
        )
    models["unet"] = models["unet"].with_module(scan_layers=args.scan_layers)
    pipe = Pipeline(Path(spec.name), models["unet"], models["vae"], [], [], spec.scheduler)
    sched = make_scheduler(args.scheduler, spec.scheduler)
    plan = sched.plan(args.steps)
    replicated = NamedSharding(m, PartitionSpec())
    rows = NamedSharding(m, sharding.logical_to_mesh_spec(PartitionSpec("batch"), (args.batch,), m))
    cfg_rows = NamedSharding(m, sharding.logical_to_mesh_spec(PartitionSpec("batch"), (2 * args.batch,), m))

    def abstract(x, where):
        dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
        return jax.ShapeDtypeStruct(jnp.shape(x), dtype, sharding=where)

    weights = jnp.dtype(DTYPES[args.weights])

    def params_of(model):
        shardings = sharding.param_shardings(model.params, model.logical_axes, m)

        def held(p, where):
            dtype = weights if jnp.issubdtype(p.dtype, jnp.floating) else p.dtype
            return jax.ShapeDtypeStruct(p.shape, dtype, sharding=where)

        return jax.tree_util.tree_map(held, model.params, shardings)

    b, size = args.batch, args.res // spec.vae_factor
    context = jax.ShapeDtypeStruct((2 * b, spec.context_length, spec.context_dim), jnp.float32, sharding=cfg_rows)
    added = None
    if spec.pooled_dim is not None:
        added = {
            "text_embeds": jax.ShapeDtypeStruct((2 * b, spec.pooled_dim), jnp.float32, sharding=cfg_rows),
            "time_ids": jax.ShapeDtypeStruct((2 * b, 6), jnp.float32, sharding=cfg_rows),
        }
    channels = int(spec.unet.get("in_channels", 4))
    latents = jax.ShapeDtypeStruct((b, size, size, channels), jnp.float32, sharding=rows)
    call_args = (
        params_of(models["unet"]),
        params_of(models["vae"]),
        jax.tree_util.tree_map(lambda x: abstract(x, replicated), plan),
        context,
        added,
        latents,
        jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
        abstract(jax.random.PRNGKey(0), replicated),
    )
    statics = dict(sched=sched, use_cfg=True, progress=False, schedule=None, kind=None, guess_mode=False, end=None)
    statics.update(output="images", attention_edit=None, text_correction=None)
    names = ("unet_params", "vae_params", "plan", "context", "added", "latents", "guidance", "key")

    def sample(*call):  # by name: a static argument added to Pipeline._sample fails here, it cannot shift these
        return pipe._sample(**statics, **dict(zip(names, call, strict=True)))

    fn = jax.jit(splash.traced_over(m, sample))
    unet_args = [
        jax.ShapeDtypeStruct((2 * b, size, size, channels), jnp.float32),
        jax.ShapeDtypeStruct((2 * b,), jnp.float32),
        context,
    ]
    if added is not None:
        unet_args.append(added)
    unet_flops = matmul_flops(models["unet"].apply, models["unet"].params, *unet_args)
    decode_flops = matmul_flops(models["vae"].decode, models["vae"].params, latents)
    notes = [
        f"platform {platform}, attention {args.attention}, {args.steps} {args.scheduler} steps with CFG (2x{b} rows "
        f"per UNet call): {_flop(unet_flops)} per call, VAE decode {_flop(decode_flops)}; {_scan_note(args, spec)}"
    ]
    num_params = models["unet"].num_params() + models["vae"].num_params()
    return Program(fn, call_args, args.steps * unet_flops + decode_flops, num_params, dict(m.shape), notes)


def compile_program(program: Program, lower_only: bool = False, opt_level: str = "default") -> dict:
    """Lower and compile; XLA's memory and cost analyses per device and the wall time of each stage, and a hash of
    the lowered program (StableHLO text without source locations: equal hashes, equal programs). lower_only: stop
    after lowering (the hash and lower_s only). opt_level: XLA's optimisation level for the compile ("default":
    the backend's own, what a training run gets; "O0" compiles 3-6x faster, see OPT_LEVEL_HELP)."""
    t0 = time.perf_counter()
    lowered = program.traced.lower() if program.traced is not None else program.fn.lower(*program.args)
    t1 = time.perf_counter() + program.trace_s
    digest = hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]
    if lower_only:
        return {"lower_s": t1 - t0, "program_sha256": digest}
    # The hash on stderr too: tools/tpu_plans.py keeps it for a compile that then fails (--revalidate needs it).
    print(
        f"lowered in {t1 - t0:.1f} s (program sha256 {digest}); compiling with XLA:TPU ...", file=sys.stderr, flush=True
    )
    import jax

    before = jax.config.jax_optimization_level
    jax.config.update("jax_optimization_level", "UNKNOWN" if opt_level == "default" else opt_level)
    try:
        compiled = lowered.compile()
    finally:
        jax.config.update("jax_optimization_level", before)
    t2 = time.perf_counter()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    out = {
        "program_sha256": digest,
        "opt_level": opt_level,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "flops_per_device": float(cost.get("flops", 0.0)),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
    }
    for field in ("argument", "output", "alias", "temp"):
        out[f"{field}_bytes"] = int(getattr(memory, f"{field}_size_in_bytes", 0) or 0)
    out["code_bytes"] = int(getattr(memory, "generated_code_size_in_bytes", 0) or 0)
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    out["peak_bytes"] += out["code_bytes"]
    return out


def analyse(args, spec: ModelSpec, kind: str, chip: Chip, devices, per_chip: int, program: Program, result: dict):
    """Add capacity, roofline time and MFU to `result` (per device; a device is 1/per_chip of a chip)."""
    n = len(devices)
    hbm = chip.hbm_gib * GIB / per_chip
    peak = chip.bf16_tflops * 1e12 / per_chip
    bandwidth = chip.hbm_gbps * 1e9 / per_chip
    model_flops = program.model_flops / n
    if args.task in ("train", "distill"):
        # XLA counts a loop's body once (SPMD's windowed einsums, accumulation scans): take the larger count.
        compute_s = max(result["flops_per_device"], model_flops) / peak
        memory_s = result["bytes_accessed_per_device"] / bandwidth
    else:  # XLA counts the loop body once: the model FLOPs of every step instead
        compute_s, memory_s = model_flops / peak, 0.0
    step_s = max(compute_s, memory_s)
    result.update(
        topology=args.topology,
        platform=devices[0].platform,
        chip=kind,
        devices=n,
        devices_per_chip=per_chip,
        model=spec.name,
        task=args.task,
        method=args.method if args.task == "distill" else None,
        mesh=program.mesh,
        batch=args.batch,
        res=args.res,
        dtype=DTYPES[args.dtype],
        weights=DTYPES[args.weights],
        remat=args.remat if args.task in ("train", "distill") else None,
        params=program.num_params,
        hbm_capacity_bytes=int(hbm),
        fits=result["peak_bytes"] <= hbm,
        model_flops_per_device=model_flops,
        roofline_compute_s=compute_s,
        roofline_memory_s=memory_s,
        roofline_step_s=step_s,
        mfu=model_flops / (step_s * peak) if step_s > 0 else None,
        images_per_s=args.batch / step_s if step_s > 0 else None,
        notes=program.notes,
    )
    return result


def _bytes(x: float) -> str:
    return f"{x / GIB:8.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:8.2f} MiB"


def _flop(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e11 else f"{x / 1e9:.2f} GFLOP"


def _time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def report(r: dict) -> str:
    gib = _bytes
    devices = f"{r['devices']} device{'s' if r['devices'] > 1 else ''}"
    task = f"distill {r['method']}" if r["task"] == "distill" else r["task"]
    what = f"{task} {r['model']} ({r['params'] / 1e6:.1f}M UNet params) on {r['topology']} ({devices})"
    mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "1 device"
    lines = [
        f"{what}, mesh {mesh}, global batch {r['batch']}, {r['res']}px, {r['dtype']}"
        + (f", {r['weights']} weights" if r.get("weights", "float32") != "float32" else "")
        + (f", remat {r['remat']}" if r["remat"] and r["remat"] != "none" else "")
        + (f", XLA {r['opt_level']}" if r.get("opt_level", "default") != "default" else ""),
        *[f"  {note}" for note in r["notes"]],
        f"  compile: lower {r['lower_s']:.1f} s, XLA:TPU {r['compile_s']:.1f} s",
        "  HBM per device:",
        f"    arguments    {gib(r['argument_bytes'])}",
        f"    outputs      {gib(r['output_bytes'])}  (donated aliases {gib(r['alias_bytes']).strip()})",
        f"    temporaries  {gib(r['temp_bytes'])}",
        f"    code         {gib(r['code_bytes'])}",
        f"    peak         {gib(r['peak_bytes'])}  of {gib(r['hbm_capacity_bytes']).strip()} "
        f"({100 * r['peak_bytes'] / r['hbm_capacity_bytes']:.0f} %): {'fits' if r['fits'] else 'DOES NOT FIT'}",
    ]
    if r["task"] in ("train", "distill"):
        how = "3x the forward's" if r["task"] == "train" else "the whole step's, every UNet call forward and backward:"
        lines += [
            f"  FLOPs per step and device: {_flop(r['flops_per_device'])} (XLA), "
            f"model {_flop(r['model_flops_per_device'])} ({how} matmuls and convolutions)",
            f"  roofline per step: compute {_time(r['roofline_compute_s'])}, HBM traffic "
            f"{_time(r['roofline_memory_s'])} -> {_time(r['roofline_step_s'])}, "
            f"{r['images_per_s']:.1f} images/s, implied MFU {100 * r['mfu']:.0f} %",
        ]
    else:
        lines += [
            f"  FLOPs per batch and device: {_flop(r['model_flops_per_device'])} (model FLOPs; XLA counts the loop "
            f"body once: {_flop(r['flops_per_device'])})",
            f"  roofline: {_time(r['roofline_step_s'])} per batch of {r['batch']}, {r['images_per_s']:.2f} images/s",
        ]
    return "\n".join(lines)


def run(args) -> dict:
    """Build, compile and analyse one program; the result dict (also what --json writes)."""
    spec = model_spec(args.model)
    args.res = args.res or spec.native_res
    factor = spec.vae_factor * 2 ** (len(spec.unet.get("block_out_channels", (0,) * 4)) - 1)
    if args.res % factor:
        raise SystemExit(f"--res {args.res}: must be a multiple of {factor} for {spec.name}")
    kind, chip, devices, per_chip = topology(args.topology)
    if args.devices:
        devices = devices[: args.devices]
    mesh = parse_mesh(args.mesh or ("data=-1" if args.task == "sample" else "fsdp=-1"))
    if args.task != "sample" and DTYPES[args.weights] != "float32":
        raise SystemExit(f"--weights {args.weights}: only sampling holds its params in another dtype than float32")
    if args.task == "distill" and not args.method:
        raise SystemExit(f"--task distill needs --method ({', '.join(DISTILL_METHODS)})")
    build = {"train": train_program, "sample": sample_program, "distill": distill_program}[args.task]
    program = build(spec, devices, mesh, args)
    result = compile_program(program, lower_only=args.lower_only, opt_level=args.opt_level)
    if args.lower_only:
        return result
    return analyse(args, spec, kind, chip, devices, per_chip, program, result)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:2x2", help="TPU topology, e.g. v5e:4x4, v5p:4x4x4, v6e:16x16")
    p.add_argument("--model", default="tiny", help=f"{' | '.join(MODELS)} | a pipeline or UNet folder")
    p.add_argument("--task", choices=("train", "sample", "distill"), default="train")
    p.add_argument("--method", choices=tuple(DISTILL_METHODS), help="distill: the distillation method")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="distill: a config override, e.g. --set dmd2.fake_updates=5 (repeatable)",
    )
    p.add_argument(
        "--mesh",
        help="e.g. fsdp=16 or data=2,fsdp=8 (default: fsdp over all devices for train and distill, data for sample)",
    )
    p.add_argument(
        "--devices", type=int, help="use only the topology's first N devices (e.g. 1 for a per-chip baseline)"
    )
    p.add_argument("--batch", type=int, default=8, help="global batch (images per step)")
    p.add_argument("--res", type=int, help="image resolution in pixels (default: the model's native size)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="compute dtype")
    p.add_argument(
        "--weights",
        choices=tuple(DTYPES),
        default="fp32",
        help="sample: the dtype the params are held in (bf16: half the weights' HBM, as an inference deployment "
        "loads them; jaxdiff generate --weights-dtype); train and distill keep float32 master params",
    )
    p.add_argument(
        "--remat", choices=("none", "loss", "blocks"), default="none", help="train, distill: rematerialisation"
    )
    p.add_argument("--accum", type=int, default=1, help="train: gradient accumulation micro-batches")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="train: EMA of the params")
    p.add_argument("--attention", default="auto", help="attention implementation (auto: per the target platform)")
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each stack of identical transformer blocks as one lax.scan (model.scan_layers; SDXL's 10-deep "
        "stacks: one copy in the program, a much shorter compile; no effect on SD1.5/2.1, whose stacks are 1 deep)",
    )
    p.add_argument("--steps", type=int, default=50, help="sample: denoising steps")
    p.add_argument("--scheduler", default="ddim", help="sample: scheduler")
    p.add_argument("--opt-level", choices=OPT_LEVELS, default="default", help=OPT_LEVEL_HELP)
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument(
        "--lower-only",
        action="store_true",
        help="stop after lowering: print the program's hash (tools/tpu_plans.py --revalidate compares it)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.lower_only:
        print(f"program sha256 {result['program_sha256']} (lowered in {result['lower_s']:.1f} s)", flush=True)
    else:
        print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
