"""`jaxdiff controlnet-train`: a ControlNet trained beside a frozen pipeline on the runner; writes a loadable net.

    train(config, out) -> report dict

Output folder:
  controlnet/              the trained ControlNet (jaxdiff checkpoint: config.json + params.safetensors):
                           `load_pipeline(MODEL, controlnet=OUT/controlnet)`, `jaxdiff generate --controlnet`
  example_condition.png    the condition image of one held-out scene, for a first `jaxdiff generate`
  report.json, report.md   model, condition, steps, last loss, trained parameters, time, how to load and measure it
  config.json              the run's config (a rerun must match it, but for train.steps / log_every /
                           checkpoint_every)
  train/                   the runner's orbax checkpoints (a killed run resumes), metrics.jsonl, TensorBoard

Every input is checked before the first write; rerunning the same command continues from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from jaxdiff import fileio
from jaxdiff.control import data, loss, net
from jaxdiff.errors import UserError

CONTROLNET_DIR, EXAMPLE_CONDITION = "controlnet", "example_condition.png"
# Keys a rerun may change: the run continues (more steps, other logging) instead of being refused.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every")


def validate(config: mlc.ConfigDict) -> None:
    """One-line UserErrors for values that cannot run (unknown keys are refused by the override parser)."""
    if config.condition not in data.CONDITIONS:
        raise UserError(f"config.condition={config.condition!r}: choose {' or '.join(data.CONDITIONS)}")
    if int(config.train.steps) <= 0 or int(config.train.batch_size) <= 0:
        raise UserError("config.train.steps and config.train.batch_size must be positive")
    if not 0.0 <= float(config.caption_dropout) < 1.0:
        raise UserError(f"config.caption_dropout={config.caption_dropout}: must be in [0, 1)")
    if int(config.data.num_objects) not in (0, 1, 2):
        raise UserError(f"config.data.num_objects={config.data.num_objects}: 1, 2, or 0 for either")
    if float(config.edge_width) <= 0:
        raise UserError(f"config.edge_width={config.edge_width}: must be positive")


def _check_out(out: Path, config: mlc.ConfigDict) -> None:
    """OUT must be new, empty, or hold a run of this config (which then continues; see RESUMABLE_CHANGES)."""
    from jaxdiff.train.runner import changed_keys

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        what = "exists and is not a controlnet-train output folder"
        raise FileExistsError(f"--out {out} {what}; use another --out") from None
    changed = [
        c for c in changed_keys(saved, json.loads(config.to_json_best_effort())) if not c.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        raise UserError(f"--out {out} holds a run of another config ({'; '.join(changed)}); use another --out")


def _mesh(config: mlc.ConfigDict):
    from jaxdiff import sharding
    from jaxdiff.train.config import mesh_shape

    shape = {k: int(v) for k, v in config.mesh.to_dict().items()}
    devices = jax.devices()
    if -1 not in shape.values():
        devices = devices[: int(np.prod(list(shape.values())))]
    return sharding.make_mesh(mesh_shape(shape, len(devices)), devices)


def _encoder(pipe, caption_dropout: float):
    """encode(frozen, batch, rng) -> (latents, context): the pipeline's VAE (a posterior sample, as the UNet's own
    training) and text encoder, caption dropout to the empty prompt (`jaxdiff.train.frozen.encoder`)."""
    from jaxdiff.sampling import text
    from jaxdiff.train import frozen as frozen_lib

    empty = text.tokenize(pipe.tokenizers[0], [""])[0]
    models = frozen_lib.FrozenModels(pipe.vae, pipe.text_encoders[0], {}, empty)
    objective = mlc.ConfigDict(dict(image_key="image", caption_key="input_ids", caption_dropout=caption_dropout))
    return frozen_lib.encoder(models, objective)


def train(config: mlc.ConfigDict, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train the configured ControlNet in OUT/train (resuming), then write OUT/controlnet and the report."""
    from jaxdiff.convert import checkpoint
    from jaxdiff.erase import finetune
    from jaxdiff.images import save_png
    from jaxdiff.sampling.pipeline import load_pipeline
    from jaxdiff.train import step as step_lib

    out = Path(out)
    validate(config)
    _check_out(out, config)
    pipe = load_pipeline(config.model)
    if pipe.is_sdxl:
        raise UserError("jaxdiff controlnet-train supports SD 1.x/2.x pipelines (one text encoder); this one is SDXL")
    start = net.from_unet(
        pipe.unet, pipe.vae_scale_factor, config.controlnet.conditioning_embedding_out_channels, int(config.seed)
    )
    size, t = pipe.default_size, config.train
    examples = data.Examples(
        pipe.tokenizers[0],
        size,
        int(t.batch_size),
        str(config.condition),
        seed=int(config.data.seed),
        num_objects=int(config.data.num_objects),
        edge_width=float(config.edge_width),
    )
    mesh = _mesh(config)
    out.mkdir(parents=True, exist_ok=True)  # every input checked: the first write
    fileio.atomic_write_text(out / "config.json", config.to_json_best_effort(indent=2) + "\n")

    cfg = loss.denoising_config(pipe.scheduler_config, float(config.snr_gamma))
    loss_fn = loss.make_loss(start, pipe.unet, _encoder(pipe, float(config.caption_dropout)), cfg)
    lr = finetune.schedule(t)
    network = step_lib.Network("controlnet", finetune.optimizer(t, lr), lr, clip_norm=float(t.max_grad_norm))
    frozen = {"unet": pipe.unet.params, "vae": pipe.vae.params, "text_encoder": pipe.text_encoders[0].params}
    t0 = time.perf_counter()
    state, info = finetune.run(
        [network],
        [step_lib.Phase("controlnet", "controlnet", loss_fn)],
        {"controlnet": start.params},
        frozen,
        examples,
        t,
        str(out / "train"),
        seed=int(config.seed),
        mesh=mesh,
        model=pipe.unet,
        progress=progress,
        label="ControlNet step",
        images_per_step=int(t.batch_size),
    )
    seconds = time.perf_counter() - t0
    trained = dataclasses.replace(start, params=jax.device_get(state.params["controlnet"]))
    checkpoint.save_checkpoint(out / CONTROLNET_DIR, trained, overwrite=True)

    rng = np.random.default_rng([int(config.data.seed), data.HELDOUT_STREAM])
    (scene,) = data.draw_scenes(rng, 1, int(config.data.num_objects))
    save_png(out / EXAMPLE_CONDITION, data.condition_image(scene, config.condition, size, float(config.edge_width)))
    from jaxdiff.data import shapes as S

    report = {
        "model": str(config.model),
        "condition": str(config.condition),
        "controlnet": str(out / CONTROLNET_DIR),
        "conditioning_embedding_out_channels": list(start.config["conditioning_embedding_out_channels"]),
        "trainable_params": int(trained.num_params()),
        "batch_size": int(t.batch_size),
        "steps": info["steps"],
        "resumed_from": info["resumed_from"],
        "loss_last": info["last"].get("loss"),
        "seconds": seconds,
        "compile_s": info["compile_s"],
        "load": f"load_pipeline({str(config.model)!r}, controlnet={str(out / CONTROLNET_DIR)!r})",
        "generate": f"jaxdiff generate --model {config.model} --controlnet {out / CONTROLNET_DIR} --control-image "
        f"{out / EXAMPLE_CONDITION} {json.dumps(S.caption(scene, rng, 'heldout'))}",
    }
    fileio.atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    fileio.atomic_write_text(out / "report.md", markdown(report))
    return report


def markdown(r: dict) -> str:
    loss_text = "n/a" if r["loss_last"] is None else f"{r['loss_last']:.4f}"
    lines = [
        f"# ControlNet ({r['condition']}) on `{r['model']}`",
        "",
        f"{r['steps']} steps of batch {r['batch_size']} ({r['seconds']:.1f} s wall-clock, compile {r['compile_s']:.1f} "
        f"s; resumed from step {r['resumed_from']}), {r['trainable_params']:,} trained parameters "
        f"(conditioning embedding {tuple(r['conditioning_embedding_out_channels'])}), last logged loss {loss_text}. "
        "The UNet, VAE and text encoder were frozen.",
        "",
        "```python",
        "from jaxdiff.sampling.pipeline import load_pipeline",
        f"pipe = {r['load']}",
        "images = pipe(['a red circle'], control_image=[condition])  # condition: [H, W, 3] in [0, 1]",
        "```",
        "",
        f"    {r['generate']}",
        "",
        "How often the object lands in the condition's mask: tools/controlnet_eval.py (docs/controlnet_shapes.md).",
    ]
    return "\n".join(lines) + "\n"


def summary(report: dict) -> str:
    loss_text = "n/a" if report["loss_last"] is None else f"{report['loss_last']:.4f}"
    return (
        f"controlnet-train: {report['condition']} ControlNet for {report['model']}, {report['steps']} steps "
        f"({report['seconds']:.1f} s, {report['trainable_params']:,} trained parameters, last loss {loss_text})"
    )
