"""`jaxdiff distill`: teacher pairs, the student trained on the runner, OUT/model, a grid and an NFE-vs-quality report.

    distill(config, out) -> report dict

Output folder:
  config.json       the run's config (a rerun with the same config resumes; another config is refused)
  pairs/            the pair store (unless config.pairs.folder names a shared one; `jaxdiff.distill.pairs`); none
                    for the data-free "sid" and "dmd2" (`jaxdiff.distill.sid`, `jaxdiff.distill.dmd2`)
  train/            the runner's orbax checkpoints (a killed run resumes), metrics.jsonl, TensorBoard
  model/            the student as a pipeline (FlowMatchEulerDiscreteScheduler, sampling_defaults: its steps, no
                    CFG): `load_pipeline(OUT/model)(prompts, steps=1, guidance=1)` and `jaxdiff generate`
  before_after.png  rows: teacher (reference steps), teacher at few steps, the student at few steps; same seeds
  report.json, report.md   per sampler: UNet evaluations per image, probe FD to renders of the prompts' scenes
                    (95 % bootstrap interval), probe shape/colour accuracy, pixel-judge valid rate (Wilson interval)
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from jaxdiff import fileio
from jaxdiff.distill import grow
from jaxdiff.distill import pairs as pairs_lib
from jaxdiff.distill import rectified_flow as rf
from jaxdiff.distill import teacher as teacher_lib
from jaxdiff.errors import UserError

METHODS = ("reflow", "instaflow", "sid", "lcm", "dmd2", "scm")
GROWABLE = ("reflow", "instaflow")  # methods whose student may be larger than the teacher (jaxdiff.distill.grow)
GRID = 8


def _saved(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _start(out: Path, config: mlc.ConfigDict) -> None:
    mine = json.loads(config.to_json_best_effort())
    if out.exists() and any(out.iterdir()) and _saved(out) != mine:
        raise FileExistsError(f"{out} holds something else or a run with another config; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out / "config.json", config.to_json_best_effort(indent=2) + "\n")


def _prompts(config: mlc.ConfigDict) -> list[str]:
    from jaxdiff.data import prompts as prompts_lib

    d = config.data
    if d.file:
        lines = prompts_lib.read_prompts(d.file)
        return lines[: int(d.num_prompts)] if int(d.num_prompts) else lines
    return prompts_lib.shapes_captions(d.shapes, int(d.num_prompts))


def _student_init(config, pipe):
    """(the student's initial UNet params, the init pipeline or None): the teacher's, or the UNet of a pipeline folder
    (e.g. a reflow OUT/model) of the same architecture."""
    if config.init == "teacher":
        return pipe.unet.params, None
    from jaxdiff.sampling.pipeline import load_pipeline

    other = load_pipeline(config.init)
    keys = sorted(
        k for k in set(other.unet.config) | set(pipe.unet.config) if other.unet.config.get(k) != pipe.unet.config.get(k)
    )
    # A grown student (`student.transformer_layers`, jaxdiff.distill.grow) may continue as a rectified-flow student.
    if keys and not (config.method in GROWABLE and set(keys) <= set(grow.GROWN_KEYS)):
        raise UserError(f"config.init={config.init}: its UNet differs from the teacher's ({', '.join(keys)})")
    return other.unet.params, other


def student_unet(config, pipe, init_params, init_pipe):
    """The student's UNet Model, params = its initial ones: the init's architecture (the teacher's unless the init is
    a grown student), deepened to `student.transformer_layers` blocks per transformer when the config sets it
    (reflow and InstaFlow only; refused before anything is written otherwise)."""
    base = init_pipe.unet if init_pipe is not None else pipe.unet
    base = dataclasses.replace(base, params=init_params)
    layers = int(config.get("student", {}).get("transformer_layers", 0) or 0)
    if not layers:
        return base
    if config.method not in GROWABLE:
        raise UserError(f"student.transformer_layers applies to {' and '.join(GROWABLE)}, not {config.method}")
    return grow.deepen(base, layers, seed=int(config.seed))


def _check_dmd2_generator(config, init_pipe) -> None:
    """dmd2.generator must match the init: "flow" a flow-velocity student's folder (an InstaFlow OUT/model),
    "diffusion" the teacher or a diffusion model's; DMD's regression needs a pairs block. Checked before anything
    is written."""
    kind = str(config.dmd2.get("generator", "diffusion"))
    init_is_flow = init_pipe is not None and init_pipe.default_scheduler() == "flow_euler"
    if kind == "flow" and not init_is_flow:
        raise UserError(
            f"dmd2.generator=flow needs config.init = a flow-velocity student's folder (e.g. an InstaFlow run's "
            f"OUT/model), got {config.init}"
        )
    if kind != "flow" and init_is_flow:
        raise UserError(f"config.init={config.init} is a flow-velocity model: set dmd2.generator=flow")
    from jaxdiff.distill import dmd2

    if "pairs" not in config and dmd2.uses_pairs(config):
        regression = float(config.dmd2.get("regression_weight", 0.0)) > 0
        why = "dmd2.regression_weight > 0" if regression else "dmd2.gan_real=pairs"
        raise UserError(f"{why} needs teacher pairs: use configs/distill/dmd2.py:dmd")


def pair_source(config, pipe, init_pipe):
    """The pipeline whose ODE makes the (noise, latent) pairs. pairs.source="teacher": the teacher's. "init":
    the model the student starts from, InstaFlow's distillation stage, which regresses the 2-rectified flow's own
    coupling (straighter than the teacher's, so one step can learn it) rather than the teacher's; with init
    "teacher" the two are the same model. The solver must suit the model: rf_euler or flow_euler for a
    flow-velocity one."""
    source = str(config.pairs.get("source", "teacher"))
    if source not in ("teacher", "init"):
        raise UserError(f"pairs.source must be 'teacher' or 'init', got {source!r}")
    chosen = init_pipe if source == "init" and init_pipe is not None else pipe
    is_flow = chosen.default_scheduler() == "flow_euler"
    scheduler = str(config.pairs.scheduler)
    flow_solver = scheduler in (pairs_lib.RF_EULER, "flow_euler")
    if scheduler not in pairs_lib.ADAPTIVE and is_flow != flow_solver:  # adaptive solvers take either kind
        kind = "a flow-velocity model: use pairs.scheduler=rf_euler" if is_flow else "not a flow-velocity model"
        raise UserError(f"pairs.scheduler={config.pairs.scheduler} cannot solve the ODE of {chosen.path}, {kind}")
    return chosen


def make_pairs(config, pipe, folder: Path, prompts: list[str], contexts, uncond, progress: bool):
    """Fill the pair store to config.pairs.num_pairs; returns the loaded pairs and the store's key."""
    p = config.pairs
    c = pipe.unet.config
    shape = (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),)
    settings = pairs_lib.solver_settings(p)  # {} for fixed-step schedulers; rtol/atol for "tsit5" / "dopri5"
    key = {
        "teacher": str(pipe.path),
        "teacher_unet_sha256": teacher_lib.params_digest(pipe.unet.params),
        "scheduler": p.scheduler,
        "scheduler_config": json.dumps(pipe.scheduler_config, sort_keys=True),
        "steps": int(p.steps),
        "guidance": float(p.guidance),
        "negative_prompt": "",
        "seed": int(p.seed),
        "latent_shape": list(shape),
        **settings,
    }
    store = pairs_lib.PairStore.open(folder, key, int(p.shard_size), prompts)
    solver = pairs_lib.make_solver(pipe, p.scheduler, int(p.steps), float(p.guidance), **settings)
    make = pairs_lib.teacher_shard_fn(pipe, solver, contexts, uncond, int(p.seed), int(p.shard_size), shape)
    t0 = time.perf_counter()
    written = store.fill(int(p.num_pairs), make, progress=progress)
    pairs = store.load(int(p.num_pairs))
    seconds = time.perf_counter() - t0
    return pairs, {"written_shards": written, "seconds": seconds, **key, **pairs_lib.solver_summary(pairs)}


def train(config, pipe, init_params, pairs: dict, contexts: np.ndarray, workdir: str, progress: bool):
    """The student on the runner (one network "unet", one phase); returns (params, info)."""
    from jaxdiff import sharding
    from jaxdiff.erase import finetune

    t = config.train
    unet = pipe.unet
    networks, phases = rf.build(config, lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx))
    n, b, seed = len(pairs["z0"]), int(t.batch_size), int(config.seed)

    def batch_fn(step: int) -> dict:
        idx = np.random.default_rng([seed, 7, step]).integers(0, n, size=b)
        return {"z0": pairs["z0"][idx], "z1": pairs["z1"][idx], "context": contexts[pairs["prompt_index"][idx]]}

    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    state, info = finetune.run(
        networks,
        phases,
        rf.initial_params(config, init_params, pipe.unet.params),
        {},
        batch_fn,
        t,
        workdir,
        seed=seed,
        mesh=mesh,
        model=unet,
        progress=progress,
        label="distillation step",
    )
    params = state.params["unet"]
    if float(t.ema_decay) > 0:  # all leaves train: the EMA tree is the whole UNet
        from jaxdiff.train import state as state_lib

        params = state_lib.merge(state.ema["unet"], params)
    return params, info


def save_student(pipe, params, out: Path, steps: int, scheduler: dict | None = None) -> None:
    """OUT/model: the teacher's folder with the student's UNet and its scheduler (default FlowMatchEuler)."""
    from jaxdiff.convert import checkpoint
    from jaxdiff.sampling.pipeline import SCHEDULER_NAMES

    tmp = out / ".model.staging"
    models = {
        "unet": dataclasses.replace(pipe.unet, params=params),
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoders[0],
    }
    checkpoint.save_pipeline(pipe.path, tmp, models, overwrite=True)
    sched = dict(rf.FLOW_SCHEDULER, _diffusers_version="0.42.0") if scheduler is None else dict(scheduler)
    fileio.atomic_write_text(tmp / "scheduler" / "scheduler_config.json", json.dumps(sched, indent=2) + "\n")
    index_path = tmp / "model_index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["scheduler"] = ["diffusers", sched["_class_name"]]
        fileio.atomic_write_text(index_path, json.dumps(index, indent=2) + "\n")
    defaults = {"steps": int(steps), "guidance": 1.0, "scheduler": SCHEDULER_NAMES[sched["_class_name"]]}
    fileio.atomic_write_text(tmp / "sampling_defaults.json", json.dumps(defaults) + "\n")
    fileio.replace_directory(tmp, out / "model")


def pair_batches(pairs: dict, contexts, batch_size: int, seed: int):
    """step -> {"x0": the teacher latents of `batch_size` random pairs, "context": their prompts' encodings}, a pure
    function of the step (resumable); LCM and sCM train on it."""
    n = len(pairs["z1"])

    def batch_fn(step: int) -> dict:
        idx = np.random.default_rng([seed, 7, step]).integers(0, n, size=batch_size)
        return {"x0": pairs["z1"][idx], "context": contexts[pairs["prompt_index"][idx]]}

    return batch_fn


def train_beside_teacher(networks, phases, params: dict, pipe, uncond, batch_fn, config, workdir: str, progress, label):
    """`finetune.run` on one device with `frozen` = {"teacher": the teacher UNet's params, "uncond": the "" prompt's
    encoding}, the config's train block and seed: the runner call of the methods with a frozen teacher."""
    import jax.numpy as jnp

    from jaxdiff import sharding
    from jaxdiff.erase import finetune

    return finetune.run(
        networks,
        phases,
        params,
        {"teacher": pipe.unet.params, "uncond": jnp.asarray(uncond)},
        batch_fn,
        config.train,
        workdir,
        seed=int(config.seed),
        mesh=sharding.make_mesh({"data": 1}, jax.devices()[:1]),
        model=pipe.unet,
        progress=progress,
        label=label,
    )


def timed(train_fn, *args) -> tuple:
    """(params, info, seconds) of `train_fn(*args)`, the seconds counted until the params are ready."""
    t0 = time.perf_counter()
    params, info = train_fn(*args)
    jax.block_until_ready(params)
    return params, info, time.perf_counter() - t0


def write_report(
    config,
    pipe,
    params,
    out: Path,
    info: dict,
    seconds: float,
    settings: dict,
    sample_student=None,
    student_label: str = "Euler",
) -> dict:
    """OUT/report.json and report.md: method, teacher, init, the method's `settings` block(s), the training figures
    and `evaluate.evaluate`'s rows (and OUT/before_after.png); returns the report."""
    from jaxdiff.distill import evaluate

    report = {
        "method": config.method,
        "teacher": str(config.teacher),
        "init": str(config.init),
        **settings,
        "train": {
            "seconds": seconds,
            **{k: info[k] for k in ("steps", "resumed_from", "skipped")},
            "last": info.get("last", {}),
        },
    }
    report.update(evaluate.evaluate(config, pipe, params, out / "before_after.png", sample_student, student_label))
    fileio.atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    fileio.atomic_write_text(out / "report.md", evaluate.markdown(report))
    return report


def distill(config: mlc.ConfigDict, out, *, progress: bool = True) -> dict:
    """Run the configured method; write pairs/, train/, model/, before_after.png, report.json, report.md."""
    from jaxdiff.sampling.pipeline import load_pipeline

    if config.method not in METHODS:
        raise UserError(f"unknown distillation method {config.method!r} (known: {', '.join(METHODS)})")
    out = Path(out)
    pipe = load_pipeline(config.teacher)
    teacher_lib.from_pipeline(pipe)  # refuses SDXL
    if teacher_lib.Teacher(None, pipe.scheduler_config).prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UserError(f"the teacher {config.teacher} is not a diffusion (ε / v / x0) model")
    init, init_pipe = _student_init(config, pipe)
    student = student_unet(config, pipe, init, init_pipe)
    if config.method == "dmd2":
        _check_dmd2_generator(config, init_pipe)
    pair_pipe = pair_source(config, pipe, init_pipe) if "pairs" in config else pipe
    prompts = _prompts(config)
    _start(out, config)
    contexts = np.asarray(pipe.encode_prompts(prompts)[0])
    uncond = np.asarray(pipe.encode_prompts([""])[0])
    if config.method == "sid":  # data-free: no pairs (jaxdiff/distill/sid.py)
        from jaxdiff.distill import sid

        return sid.distill(config, pipe, init, prompts, contexts, uncond, out, progress=progress)
    folder = Path(config.pairs.folder) if "pairs" in config and config.pairs.folder else out / "pairs"
    if config.method == "dmd2":  # data-free on prompts (+ real images for its GAN head): jaxdiff/distill/dmd2.py
        from jaxdiff.distill import dmd2

        pairs = None  # DMD's regression term and a GAN head on the teacher's latents: teacher pairs
        if dmd2.uses_pairs(config):
            pairs = make_pairs(config, pair_pipe, folder, prompts, contexts, uncond, progress)[0]
        return dmd2.distill(config, pipe, init, prompts, contexts, uncond, out, progress=progress, pairs=pairs)
    pairs, pair_info = make_pairs(config, pair_pipe, folder, prompts, contexts, uncond, progress)
    if config.method == "lcm":  # consistency distillation on the pairs' latents (jaxdiff/distill/lcm.py)
        from jaxdiff.distill import lcm

        return lcm.distill(config, pipe, init, pairs, contexts, uncond, out, progress=progress)
    if config.method == "scm":  # continuous-time consistency on the pairs' latents (jaxdiff/distill/scm.py)
        from jaxdiff.distill import scm

        return scm.distill(config, pipe, init, pairs, contexts, uncond, out, progress=progress)
    student_pipe = dataclasses.replace(pipe, unet=student, _compiled={})  # the teacher's VAE and text encoder
    params, info, seconds = timed(
        train, config, student_pipe, student.params, pairs, contexts, str(out / "train"), progress
    )
    save_student(student_pipe, params, out, int(config.eval.student_steps[0]))
    pair_report = {k: pair_info[k] for k in ("scheduler", "steps", "guidance", "seed", "written_shards", "seconds")}
    pair_report |= {"source": str(config.pairs.source), "model": pair_info["teacher"]}  # whose ODE made them
    pair_report |= {"num_pairs": int(config.pairs.num_pairs), "folder": str(folder)}
    adaptive = ("rtol", "atol", "nfe_mean", "nfe_min", "nfe_max", "num_steps_mean")  # tsit5 / dopri5 pairs only
    pair_report |= {k: pair_info[k] for k in adaptive if k in pair_info}
    settings = {"pairs": pair_report}
    if student.config != pipe.unet.config:
        settings["student"] = {"unet_params": student.num_params(), "teacher_unet_params": pipe.unet.num_params()}
        settings["student"]["transformer_layers_per_block"] = grow.transformer_layers(student.config)

    def sample_student(_teacher, params_, prompts, latents, steps):
        return rf.sample(student_pipe, params_, prompts, latents, steps)

    return write_report(config, pipe, params, out, info, seconds, settings, sample_student)
