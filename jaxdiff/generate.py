"""`jaxdiff generate`: prompts -> PNG images, a PNG grid and a JSON record, through the compiled pipeline."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from jaxdiff.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="text-to-image: PNGs, a grid and a JSON record",
        description="Generate images for each prompt with the embedded `shapes` model (default), a converted "
        "jaxdiff checkpoint or a diffusers pipeline folder.",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--model", default="shapes", help="'shapes', a jaxdiff checkpoint or a diffusers pipeline folder")
    p.add_argument("--negative", action="append", help="negative prompt (once for all prompts, or once per prompt)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, else 25)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument(
        "--scheduler", default=None, help="ddim, pndm, euler, dpm++2m, ddpm, flow_euler, lcm (default: ddim)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument(
        "--weights-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype the weights are held in (bfloat16: half the memory, for models that do not fit otherwise)",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="training-free feature cache: faster:50ls | faster:everyK | deepcache:N[:branch=B] | tgate:G "
        "(default: none; see docs/acceleration.md)",
    )
    p.add_argument(
        "--image",
        default=None,
        help="img2img (SDEdit): start from this image (PNG/JPEG; its size sets the output size)",
    )
    p.add_argument("--mask", default=None, help="inpainting: a mask image the size of --image, white = repaint")
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --image: how much to change it, in (0, 1] (default 0.8, or 1.0 with --mask)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=None,
        help="a ControlNet folder (diffusers or jaxdiff); repeat for several, each with its --control-image",
    )
    p.add_argument("--control-image", action="append", default=None, help="a control image per --controlnet")
    p.add_argument(
        "--controlnet-scale", type=float, action="append", default=None, help="per --controlnet (default 1.0)"
    )
    p.add_argument(
        "--control-window",
        default=None,
        metavar="START:END",
        help="fractions of the steps where the ControlNets act (default 0:1)",
    )
    p.add_argument(
        "--buckets",
        default=None,
        help="compile these sizes up front, HEIGHTxWIDTH,... (e.g. 512x512,768x512): later runs load them from the "
        "persistent compilation cache; a size not among them is compiled once, with a note",
    )
    p.add_argument("--out", default="out", help="output folder (default: out/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "prompt"


def model_defaults(path: Path) -> dict:
    """Sampling defaults a model folder recommends (`sampling_defaults.json`), e.g. the shapes model's guidance."""
    f = path / "sampling_defaults.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache (default ~/.cache/jaxdiff/jax_cache) so a second run skips compiling."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        default = os.path.join(os.path.expanduser("~"), ".cache", "jaxdiff", "jax_cache")
        jax.config.update("jax_compilation_cache_dir", os.environ.get("JAXDIFF_CACHE_DIR", default))


def _check_against(pipe, scheduler: str, steps: int, height: int | None, width: int | None):
    """The flags the loaded model constrains, as one-line errors: the sampler would raise them as internal ones."""
    from jaxdiff.sampling import make_scheduler

    # The UNet halves the latents once per extra block: the size must divide by that and by the VAE's factor.
    factor = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.get("block_out_channels", (0,) * 4)) - 1)
    for flag, size in (("--height", height), ("--width", width)):
        if size is not None and (size <= 0 or size % factor):
            raise UserError(f"{flag} must be a positive multiple of {factor} for this model, got {size}")
    try:
        plan = make_scheduler(scheduler, pipe.scheduler_config).plan(steps)
    except ValueError as e:  # the model's scheduler config or --steps (e.g. more than its training timesteps)
        raise UserError(f"--scheduler {scheduler} with --steps {steps}: {e}") from None
    return plan


def run(args) -> int:
    import jax.numpy as jnp

    from jaxdiff.fileio import atomic_write_text
    from jaxdiff.images import make_grid, save_png
    from jaxdiff.sampling import pipeline as pipeline_lib
    from jaxdiff.sampling.schedulers import DIFFUSERS_CLASSES, SCHEDULERS

    path = pipeline_lib.resolve(args.model)  # unknown model: one-line error before anything is loaded
    defaults = {"steps": 25, "guidance": 7.5, "scheduler": "ddim", **model_defaults(path)}
    steps = args.steps if args.steps is not None else defaults["steps"]
    guidance = args.guidance if args.guidance is not None else defaults["guidance"]
    scheduler = args.scheduler or defaults["scheduler"]
    if steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    if args.num_images <= 0:
        raise UserError(f"--num-images must be positive, got {args.num_images}")
    negatives = args.negative or None
    if negatives and len(negatives) not in (1, len(args.prompts)):
        raise UserError(f"give one --negative for all prompts or one per prompt ({len(args.prompts)})")
    if DIFFUSERS_CLASSES.get(scheduler, scheduler) not in SCHEDULERS:
        raise UserError(f"--scheduler {scheduler!r} is unknown; choose from {', '.join(SCHEDULERS)}")

    if args.image is None and (args.mask is not None or args.strength is not None):
        raise UserError("--mask and --strength need --image")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {args.strength}")
    image = mask = None
    if args.image is not None:
        from jaxdiff.images import read_image

        image = read_image(args.image)
        mask = None if args.mask is None else read_image(args.mask, mode="L")
        if mask is not None and mask.shape != image.shape[:2]:
            raise UserError(
                f"--mask is {mask.shape[0]}x{mask.shape[1]} but --image is {image.shape[0]}x{image.shape[1]}"
            )

    control = _control_inputs(args)
    buckets = None
    if args.buckets:
        if args.image is not None:
            raise UserError("--buckets compiles text-to-image sizes; with --image the image sets the size")
        buckets = pipeline_lib.parse_buckets(args.buckets)

    enable_compilation_cache()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    weights_dtype = {"float32": None, "bfloat16": jnp.bfloat16}[args.weights_dtype]
    pipe = pipeline_lib.load_pipeline(path, dtype=dtype, controlnet=args.controlnet, weights_dtype=weights_dtype)
    plan = _check_against(pipe, scheduler, steps, args.height, args.width)
    if args.cache:
        import numpy as np

        from jaxdiff.sampling import cache as cache_lib

        cache_lib.parse(args.cache, np.asarray(plan.timesteps), pipe.unet.module.num_skips)  # one-line errors first
    if buckets:
        for height, width in buckets:
            _check_against(pipe, scheduler, steps, height, width)
        compiled = pipe.compile_buckets(
            buckets,
            batch=len(args.prompts),
            progress_bar=not args.quiet,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            cache=args.cache,
            progress=not args.quiet,
        )
        print("compiled " + ", ".join(f"{b['height']}x{b['width']} in {b['seconds']:.1f} s" for b in compiled))
    prompts = [p for p in args.prompts for _ in range(args.num_images)]
    if negatives:
        negatives = [
            n
            for n in (negatives * len(args.prompts) if len(negatives) == 1 else negatives)
            for _ in range(args.num_images)
        ]
    start = time.perf_counter()
    images = []
    # One batch per image index so each image's noise depends only on (seed + index), not on the batch.
    for k in range(args.num_images):
        batch = prompts[k :: args.num_images]
        neg = negatives[k :: args.num_images] if negatives else None
        images.append(
            pipe(
                batch,
                neg,
                steps=steps,
                guidance=guidance,
                scheduler=scheduler,
                seed=args.seed + k,
                height=args.height,
                width=args.width,
                progress=not args.quiet,
                cache=args.cache,
                image=image,
                mask=mask,
                strength=args.strength,
                **control,
            )
        )
    seconds = time.perf_counter() - start
    ordered = [images[k][i] for i in range(len(args.prompts)) for k in range(args.num_images)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for n, image in enumerate(ordered):
        i, k = divmod(n, args.num_images)
        name = f"{n:03d}-{_slug(args.prompts[i])}.png"
        save_png(out / name, image)
        records.append(
            {
                "file": name,
                "prompt": args.prompts[i],
                "seed": args.seed + k,
                "negative_prompt": negatives[n] if negatives else None,
            }
        )
    save_png(out / "grid.png", make_grid(ordered, columns=args.num_images if args.num_images > 1 else None))
    judges = _judge_shapes(ordered, [r["prompt"] for r in records], records)
    record = {
        "model": str(args.model),
        "model_path": str(path),
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "seed": args.seed,
        "dtype": args.dtype,
        "weights_dtype": args.weights_dtype,
        "cache": args.cache,
        "image": args.image,
        "mask": args.mask,
        "strength": args.strength,
        "controlnet": args.controlnet,
        "control_image": args.control_image,
        "height": int(ordered[0].shape[0]),
        "width": int(ordered[0].shape[1]),
        "seconds": round(seconds, 3),
        "images": records,
    }
    if judges:
        record["judges"] = judges
    atomic_write_text(out / "generate.json", json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(ordered)} images, grid.png and generate.json to {out}/ ({seconds:.1f} s)")
    return 0


def _control_inputs(args) -> dict:
    """The pipeline's ControlNet keyword arguments from the flags (one-line errors for counts and windows)."""
    nets, images = args.controlnet or [], args.control_image or []
    if not nets:
        if images or args.controlnet_scale or args.control_window:
            raise UserError("--control-image, --controlnet-scale and --control-window need --controlnet")
        return {}
    if len(images) != len(nets):
        raise UserError(f"give one --control-image per --controlnet ({len(nets)}), got {len(images)}")
    scales = args.controlnet_scale or [1.0] * len(nets)
    if len(scales) not in (1, len(nets)):
        raise UserError(f"give one --controlnet-scale for all or one per --controlnet ({len(nets)})")
    start, end = 0.0, 1.0
    if args.control_window:
        try:
            start, end = (float(v) for v in args.control_window.split(":"))
        except ValueError:
            raise UserError(f"--control-window must be START:END, e.g. 0:0.6, got {args.control_window!r}") from None
    from jaxdiff.images import read_image

    return {
        "control_image": [read_image(f) for f in images],
        "controlnet_scale": scales * len(nets) if len(scales) == 1 else scales,
        "control_start": start,
        "control_end": end,
    }


def _judge_shapes(images, prompts: list[str], records: list[dict]) -> dict | None:
    """On shapes-world images, both judges' verdicts per image (added to its record) and their rates; else None."""
    import numpy as np

    from jaxdiff.metrics import shapes_verdicts

    batch = np.clip(np.round(np.stack([np.asarray(im) for im in images]) * 255.0), 0, 255).astype(np.uint8)
    if not shapes_verdicts.applies(batch, prompts):
        return None
    verdicts, summary = shapes_verdicts.verdicts(batch, prompts)
    for record, verdict in zip(records, verdicts):
        record["judges"] = verdict
    return summary
