"""`jaxdiff controlnet-train`: the argument parser and the command (no JAX import until it runs)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "controlnet-train",
        help="train a ControlNet beside a frozen pipeline (shapes: exact object masks or edges)",
        description="Train a ControlNet, initialised from the pipeline's frozen UNet (VAE and text encoder frozen "
        "too), on shapes-world renders, captions and the renderer's exact condition images: --config "
        "configs/controlnet/shapes_mask.py[:VARIANT] (variants smoke, edges) then --config.KEY=VALUE overrides. "
        "Writes OUT/controlnet (load_pipeline(MODEL, controlnet=OUT/controlnet); `jaxdiff generate --controlnet "
        "OUT/controlnet --control-image PNG`), OUT/example_condition.png, OUT/report.md and OUT/report.json. "
        "Rerunning the same command continues from OUT/train (a larger --config.train.steps trains on).",
    )
    p.add_argument("--config", required=True, help="configs/controlnet/<name>.py, optionally :VARIANT")
    p.add_argument("--out", required=True, help="output folder (continued if it holds a run of the same config)")
    p.add_argument("--model", default=None, help="'shapes' (default) or a diffusers / jaxdiff pipeline folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    from jaxdiff.cli import _config_overrides

    _config_overrides(p)  # --config.KEY=VALUE, as `jaxdiff personalize`


def run(args) -> int:
    from jaxdiff.config import apply_overrides, load_config
    from jaxdiff.control.run import summary, train
    from jaxdiff.generate import enable_compilation_cache

    config = apply_overrides(load_config(args.config), args.overrides)
    if args.model:
        config.model = args.model
    enable_compilation_cache()
    report = train(config, args.out, progress=not args.no_progress)
    print(summary(report))
    print(f"wrote {args.out}/controlnet, example_condition.png, report.md, report.json")
    return 0
