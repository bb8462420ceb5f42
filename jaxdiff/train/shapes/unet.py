"""Stage unet: the UNet2DConditionModel trained by `jaxdiff train`'s own path (`jaxdiff.train.loop.train` with
configs/train/shapes.py): images and caption ids encoded in the step by this run's frozen VAE and text encoder,
epsilon prediction with SD's betas, 10% caption dropout, AdamW + warm-up + cosine, EMA, min-SNR weighting."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np

import jaxdiff
from jaxdiff.config import load_config
from jaxdiff.convert import checkpoint
from jaxdiff.train.shapes import fit
from jaxdiff.train.shapes.common import Run, atomic_write_text, read_metrics
from jaxdiff.train.shapes.models import unet_config

# The trainer config of this stage; it lives beside the package in the source tree (an editable install).
CONFIG = Path(jaxdiff.__file__).resolve().parent.parent / "configs" / "train" / "shapes.py"


def train_config(run: Run, steps: int):
    """configs/train/shapes.py with this run's text encoder, VAE and tokenizer, its data, batch and step count."""
    config = load_config(str(CONFIG))
    hidden = checkpoint.read_json(run.dir("clip") / "text_encoder" / "config.json")["hidden_size"]
    config.seed = run.opts.seed + 3
    config.total_steps = steps
    config.model.unet = {k: v for k, v in unet_config(hidden, run.tiny).items() if not k.startswith("_")}
    config.model.pipeline = ""
    config.model.pretrained_vae = str(run.dir("vae") / "vae")  # its encoder; the decoder stage leaves it as is
    config.model.pretrained_text_encoder = str(run.dir("clip") / "text_encoder")
    config.model.tokenizer = str(run.dir("clip") / "tokenizer")
    config.objective.snr_gamma = run.hp("unet", "min_snr")
    config.objective.caption_dropout = run.hp("unet", "drop")
    config.data.seed = run.opts.seed
    config.data.global_batch_size = run.hp("unet", "batch")
    config.data.options.update(
        num_records=run.opts.num_examples or (2048 if run.smoke else 0), generate=run.generates_data
    )
    config.optimizer.learning_rate = run.hp("unet", "lr")
    config.optimizer.warmup_steps = min(run.hp("unet", "warmup"), steps // 2)
    config.train.ema_decay = run.hp("unet", "ema")
    config.checkpoint.every_steps = run.opts.save_every
    config.log.every_steps = min(25, steps)
    config.log.tensorboard = False
    return config


def measure_s_per_step(run: Run) -> float:
    """Seconds per step of the trainer on this machine (after compiling), from a throwaway 12-step run."""
    from jaxdiff.train import loop

    config = train_config(run, 12)
    config.log.every_steps, config.log.progress = 4, False
    workdir = run.dir("unet") / "measure"
    shutil.rmtree(workdir, ignore_errors=True)
    loop.train(config, str(workdir))
    rates = [r["steps_per_s"] for r in read_metrics(workdir)[1:] if "steps_per_s" in r]  # past the first steps
    shutil.rmtree(workdir, ignore_errors=True)
    return 1.0 / float(np.mean(rates))


def planned_steps(run: Run) -> int:
    """The number of steps, fixed on the first start (unet/plan.json): smoke, --unet-steps, fitted to
    --unet-minutes by a measured s/step, else the config's."""
    plan_path = run.dir("unet") / "plan.json"
    if plan_path.is_file():
        return json.loads(plan_path.read_text())["steps"]
    per_step = None
    if run.smoke:
        steps = run.hp("unet", "smoke_steps")
    elif run.opts.unet_steps:
        steps = run.opts.unet_steps
    elif run.opts.unet_minutes:
        per_step = measure_s_per_step(run)
        steps = max(run.hp("unet", "min_steps"), int(run.opts.unet_minutes * 60 / per_step))
    else:
        steps = load_config(str(CONFIG)).total_steps
    print(
        f"[unet] batch {run.hp('unet', 'batch')}, "
        f"{'' if per_step is None else f'{per_step:.3f} s/step measured, '}{steps} steps",
        flush=True,
    )
    run.log({"stage": "unet", "event": "plan", "steps": steps, "measured_s_per_step": per_step})
    atomic_write_text(plan_path, json.dumps({"steps": steps}) + "\n")
    return steps


def stage(run: Run) -> dict:
    from jaxdiff.api import init_model
    from jaxdiff.train import loop

    config = train_config(run, planned_steps(run))
    t0 = time.time()
    summary = loop.train(config, str(run.train_dir("unet")))
    return {
        "steps": summary["step"],
        "batch": config.data.global_batch_size,
        **fit.summarize(run, "unet", summary),
        "params": init_model({"_class_name": "UNet2DConditionModel", **config.model.unet.to_dict()}).num_params(),
        "workdir": str(run.train_dir("unet")),
        "seconds": round(time.time() - t0, 1),
    }


def trained(run: Run, use_ema: bool = True) -> tuple[dict, int]:
    """(UNet params, step) from the trainer's latest checkpoint: the EMA params unless `use_ema` is False."""
    from jaxdiff.train import loop

    plan_path = run.dir("unet") / "plan.json"
    if not plan_path.is_file() or not (run.train_dir("unet") / "checkpoints").is_dir():
        raise FileNotFoundError(f"no UNet checkpoint in {run.train_dir('unet')}: run the unet stage first")
    config = train_config(run, json.loads(plan_path.read_text())["steps"])
    state, _, meta = loop.restore(config, str(run.train_dir("unet")), devices=jax.devices()[:1])
    params = state.ema_params("unet") if use_ema else state.params["unet"]
    return jax.device_get(params), int(meta["step"])
