"""`jaxdiff protect`: the argument parser and the command (no JAX import until it runs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

MODES = ("sds-", "sds+", "sdst-", "sdst+", "advdm", "photoguard", "mist")  # jaxdiff.protect.pgd.MODES, JAX-free


def add_parser(sub) -> None:
    p = sub.add_parser(
        "protect",
        help="add Diff-Protect perturbations to a folder of images (SDS(-/+), SDST, AdvDM, PhotoGuard, Mist)",
        description="Protect images against diffusion-based mimicry (Diff-Protect, Xue et al. ICLR 2024): projected "
        "gradient steps within an L-infinity budget on the model's VAE encoder. Writes one PNG per input image "
        "(same file name, .png) into OUT and OUT/protect.json (settings, timing). All images must have one size.",
    )
    p.add_argument("--images", required=True, help="folder of images (png/jpg/webp/bmp), all of one size")
    p.add_argument("--out", required=True, help="output folder for the protected PNGs")
    p.add_argument("--mode", default="sds-", choices=MODES, help="objective (default: sds-, the paper's SDS(-))")
    p.add_argument("--eps", type=float, default=16.0, help="L-inf budget in 1/255 units (default 16)")
    p.add_argument("--alpha", type=float, default=1.0, help="step size in 1/255 units (default 1)")
    p.add_argument("--steps", type=int, default=100, help="PGD steps (default 100)")
    p.add_argument("--prompt", default="", help="text conditioning of the UNet (default: the empty prompt)")
    p.add_argument("--target", default=None, help="target image for sdst-/sdst+/photoguard/mist (default: checker)")
    p.add_argument("--model", default="shapes", help="'shapes' (default) or an SD 1.x/2.x pipeline folder")
    p.add_argument("--batch", type=int, default=8, help="images per compiled batch (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from jaxdiff.errors import UserError
    from jaxdiff.generate import enable_compilation_cache
    from jaxdiff.images import read_image, save_png
    from jaxdiff.personalize.data import image_files, load_images
    from jaxdiff.protect.pgd import ProtectConfig, protect_images
    from jaxdiff.sampling.pipeline import load_pipeline

    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    cfg = ProtectConfig(mode=args.mode, eps=args.eps / 255.0, alpha=args.alpha / 255.0, steps=args.steps)
    files = image_files(args.images)
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        clash = sorted({s for s in stems if stems.count(s) > 1})
        raise UserError(f"--images: several files would be written as the same PNG: {', '.join(clash)}")
    images, _ = load_images(args.images)  # one-line errors: no images, unreadable or mixed sizes
    target = None if args.target is None else read_image(args.target)
    out = Path(args.out)
    if out.resolve() == Path(args.images).resolve():
        raise UserError("--out must differ from --images (the originals would be overwritten)")
    enable_compilation_cache()
    pipe = load_pipeline(args.model)
    start = time.perf_counter()
    n, b = len(files), min(args.batch, len(files))
    for lo in tqdm(range(0, n, b), desc=f"protect {args.mode}", unit="batch", disable=args.no_progress):
        chunk = images[lo : lo + b]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), axis=0)])  # one compile
        protected = protect_images(pipe, padded, args.prompt, cfg, args.seed, target, first_index=lo)
        for f, im in zip(files[lo : lo + b], protected[: len(chunk)]):
            save_png(out / (f.stem + ".png"), im)
    seconds = time.perf_counter() - start
    report = {
        "images": n,
        "mode": args.mode,
        "eps_255": args.eps,
        "alpha_255": args.alpha,
        "steps": args.steps,
        "prompt": args.prompt,
        "model": str(args.model),
        "seed": args.seed,
        "seconds": round(seconds, 3),
    }
    from jaxdiff.fileio import atomic_write_text

    atomic_write_text(out / "protect.json", json.dumps(report, indent=2) + "\n")
    print(f"protected {n} images ({args.mode}, eps {args.eps:g}/255, {args.steps} steps) in {seconds:.1f} s -> {out}")
    return 0
