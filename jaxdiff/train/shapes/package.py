"""Stage package (and --stage snapshot): the shapes pipeline folder — a jaxdiff checkpoint laid out like a diffusers
StableDiffusionPipeline with tokenizer, scheduler and model_index.json — in <assets>/shapes, the image tower in
<assets>/shapes_clip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxdiff.convert import checkpoint
from jaxdiff.models import registry
from jaxdiff.models.model import create
from jaxdiff.train.shapes import unet
from jaxdiff.train.shapes.clip import load_text_encoder
from jaxdiff.train.shapes.common import Run, ship
from jaxdiff.train.shapes.decoder import final_vae_path
from jaxdiff.train.shapes.models import MODEL_INDEX, SCHEDULER_CONFIG, unet_config


def write_pipeline(run: Run, dst: Path, use_ema: bool = True) -> dict:
    """The pipeline folder from the trained components and the UNet's latest checkpoint, written atomically."""
    encoder, _ = load_text_encoder(run)
    vae = checkpoint.load_component(final_vae_path(run))
    params, unet_step = unet.trained(run, use_ema)
    cfg = unet_config(encoder.config["hidden_size"], run.tiny)
    model = create(registry.architecture_for(cfg), cfg, abstract=True)
    model.params = jax.tree_util.tree_map(jnp.asarray, params)
    with checkpoint.atomic_directory(dst, overwrite=True) as tmp:
        checkpoint.save_checkpoint(tmp, {"unet": model, "vae": vae, "text_encoder": encoder}, overwrite=True)
        shutil.copytree(run.dir("clip") / "tokenizer", tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    params = {n: m.num_params() for n, m in (("unet", model), ("vae", vae), ("text_encoder", encoder))}
    return {
        "path": str(dst),
        "params": params,
        "unet_step": unet_step,
        "bytes": sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()),
    }


def stage(run: Run) -> dict:
    assets = Path(run.opts.assets)
    info = write_pipeline(run, assets / "shapes")
    ship(run.dir("clip") / "head", assets / "shapes_clip")
    return info
