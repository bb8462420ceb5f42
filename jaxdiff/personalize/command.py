"""`jaxdiff personalize`: the argument parser and the command (no JAX import until it runs)."""

from __future__ import annotations

import os


def add_parser(sub) -> None:
    p = sub.add_parser(
        "personalize",
        help="teach a model a new token from a folder of images (textual inversion, DreamBooth-LoRA, Custom Diffusion)",
        description="Teach a new token from a folder of same-size images (IMAGE.txt beside an image is its caption, "
        "naming the token): --config configs/personalize/METHOD.py[:VARIANT] (textual_inversion, dreambooth_lora, "
        "custom_diffusion, prospect, attencraft, dreamcreature: DIR/parts.json + parts_masks.npz give each image's "
        "part codes and masks, written for shapes by tools/dreamcreature_eval.py data; "
        "variants shapes, runlocal) then --config.KEY=VALUE overrides. Writes OUT/model (load_pipeline(OUT/model); "
        "`jaxdiff generate --model OUT/model 'a red <v>'`), OUT/learned_embeds.safetensors, OUT/lora "
        "(DreamBooth-LoRA), "
        "OUT/samples.png, OUT/report.md and OUT/report.json. Rerunning the same command resumes from OUT/train.",
    )
    p.add_argument("--config", required=True, help="configs/personalize/<method>.py, optionally :VARIANT")
    p.add_argument("--images", required=True, help="folder of instance images (png/jpg), all of one size")
    p.add_argument(
        "--token",
        required=True,
        help="the new placeholder token, e.g. '<v>' (must not be in the vocabulary); attencraft takes two: '<a>,<b>'",
    )
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a run of the same config)")
    p.add_argument("--model", default=None, help="'shapes' (default) or a diffusers / jaxdiff pipeline folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    from jaxdiff.cli import _config_overrides

    _config_overrides(p)  # --config.KEY=VALUE, as `jaxdiff erase`


def run(args) -> int:
    from jaxdiff.config import apply_overrides, load_config
    from jaxdiff.generate import enable_compilation_cache
    from jaxdiff.personalize.run import personalize, summary

    config = apply_overrides(load_config(args.config), args.overrides)
    config.images = os.path.abspath(args.images)
    config.token = args.token
    if args.model:
        config.model = args.model
    enable_compilation_cache()
    report = personalize(config, args.out, progress=not args.no_progress)
    print(summary(report))
    print(f"wrote {args.out}/model, learned_embeds.safetensors, samples.png, report.md, report.json")
    return 0
