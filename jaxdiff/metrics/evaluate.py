"""`jaxdiff evaluate`: a metric of generated images against real ones (folders, statistics files or a model's samples).

    jaxdiff evaluate fd-probe --real REAL_DIR|stats.npz --fake FAKE_DIR          # shapes: Fréchet on probe features
    jaxdiff evaluate fd-probe --real REAL_DIR --model shapes --prompts prompts.txt --num-images 4
    jaxdiff evaluate fid --inception pt_inception-2015-12-05-6726825d.pth --mode clean-fid --real R --fake F

Each run prints and writes (--out, atomically) one JSON record: metric, value, its 95 % bootstrap interval, the
number of real and generated images, the feature network and where the images came from. `--save-stats` writes the
real set's statistics as a pytorch-fid `.npz` (`mu`, `sigma`), readable back by `--real`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxdiff import fileio
from jaxdiff.errors import UserError
from jaxdiff.metrics import frechet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_images(folder: str | Path) -> np.ndarray:
    """Every image of a folder (sorted by name) as uint8 [N, H, W, 3]; one clear error for mixed sizes."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    sizes = sorted({im.shape[:2] for im in images})
    if len(sizes) > 1:
        raise UserError(f"{folder} mixes image sizes {sizes}: resize them to one size first")
    return np.stack(images)


def read_prompts(path: str | Path) -> list[str]:
    from jaxdiff.data.prompts import read_prompts as read

    prompts = read(path)
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def generate(model: str, prompts: list[str], num_images: int, seed: int, steps: int | None, guidance: float | None):
    """`num_images` samples per prompt from a pipeline (seeds seed, seed + 1, ...), uint8 [N, H, W, 3]."""
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(model)
    out = []
    for k in range(num_images):
        images = pipe(prompts, steps=steps or 25, guidance=7.5 if guidance is None else guidance, seed=seed + k)
        out.append(np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ feature networks


def probe_features(images: np.ndarray, args=None) -> np.ndarray:
    """The shapes probe's penultimate features [N, D] (float64): the stand-in for Inception on `shapes`."""
    from jaxdiff.metrics.probe import load_probe

    _, features = load_probe()(images)
    return np.asarray(features, np.float64)


def inception_features(images: np.ndarray, args) -> np.ndarray:
    """pool3 features [N, 2048] of the FID Inception (weights from --inception, preprocessing --mode)."""
    from jaxdiff.metrics import fid

    if not args.inception:
        raise UserError(
            "fid needs the FID Inception weights: --inception pt_inception-2015-12-05-6726825d.pth (pytorch-fid's "
            "file, read with torch.load(weights_only=True)) or a converted jaxdiff folder"
        )
    if "inception" not in _CACHE:
        _CACHE["inception"] = fid.load_inception(args.inception).params
    features = fid.features(images, args.mode, params=_CACHE["inception"], batch_size=args.batch_size)
    return np.asarray(features, np.float64)


_CACHE: dict = {}
FEATURES: dict[str, tuple[str, Callable]] = {
    "fd-probe": ("shapes probe (jaxdiff/assets/shapes_probe)", probe_features),
    "fid": ("FID Inception-v3 pool3 (pytorch-fid)", inception_features),
}


# ------------------------------------------------------------------------------------------------ statistics


def load_statistics(path: str | Path, dim: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, n or None) from a pytorch-fid-style `.npz`, checked against the features' dimension."""
    from jaxdiff.metrics import fid

    mu, sigma, n = fid.load_statistics(path)
    if mu.shape[0] != dim:
        raise UserError(f"{path} holds statistics of dimension {mu.shape[0]}, the features have {dim}")
    return mu, sigma, n


def save_statistics(path: str | Path, features: np.ndarray) -> None:
    from jaxdiff.metrics import fid

    with fileio.atomic_file(path) as f:
        fid.save_statistics(f, *frechet.feature_statistics(features), n=len(features))


def _check_count(features: np.ndarray, what: str) -> None:
    if len(features) < 2:
        raise UserError(f"{what}: {len(features)} image(s); a covariance needs at least 2 (a stable one, >> D)")


def frechet_with_interval(real, fake, boots: int = 200, seed: int = 0) -> tuple[float, tuple[float, float] | None]:
    """FD of fake features against real (features [N, D] or (mu, sigma)), and a 95 % percentile bootstrap interval
    over resampling the images of each set that is given as features."""
    rng = np.random.default_rng(seed)

    def stats(x, idx=None):
        if isinstance(x, tuple):
            return x
        return frechet.feature_statistics(x if idx is None else x[idx])

    value = frechet.frechet_distance_few(*stats(real), *stats(fake))
    if boots <= 0:
        return value, None
    samples = []
    for _ in range(boots):
        r = None if isinstance(real, tuple) else rng.integers(0, len(real), len(real))
        f = rng.integers(0, len(fake), len(fake))
        samples.append(frechet.frechet_distance_few(*stats(real, r), *stats(fake, f)))
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return value, (float(lo), float(hi))


# -------------------------------------------------------------------------------------------------- command


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="a metric of generated images against real ones (JSON record with n and a 95%% interval)",
        description=__doc__.split("\n\n")[0] + " Metrics: " + ", ".join(FEATURES) + ".",
    )
    p.add_argument(
        "metric", choices=sorted(FEATURES), help="fd-probe: Fréchet distance on the shapes probe's features; fid"
    )
    p.add_argument("--inception", help="fid: the FID Inception weights (pytorch-fid's .pth, or a jaxdiff folder)")
    p.add_argument("--mode", default="pytorch-fid", help="fid preprocessing: pytorch-fid, clean-fid, torch-fidelity")
    p.add_argument("--batch-size", type=int, default=50, help="fid: images per compiled Inception call")
    p.add_argument("--real", required=True, help="a folder of real images, or a statistics .npz (mu, sigma)")
    p.add_argument("--fake", help="a folder of generated images")
    p.add_argument("--model", help="instead of --fake: sample a pipeline ('shapes', a jaxdiff or diffusers folder)")
    p.add_argument("--prompts", help="with --model: a text file, one prompt per line")
    p.add_argument("--num-images", type=int, default=1, help="with --model: images per prompt")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 95%% interval (0: none)")
    p.add_argument("--save-stats", help="write the real set's statistics (.npz, pytorch-fid layout) here")
    p.add_argument("--out", help="write the JSON record here (atomic)")
    p.set_defaults(func=run)


def run(args) -> int:
    if bool(args.fake) == bool(args.model):
        raise UserError("give exactly one of --fake DIR and --model PATH (with --prompts FILE)")
    if args.model and not args.prompts:
        raise UserError("--model needs --prompts FILE (one prompt per line)")
    network, features_of = FEATURES[args.metric]
    t0 = time.perf_counter()
    if args.fake:
        fake_images, source = read_images(args.fake), str(args.fake)
    else:
        prompts = read_prompts(args.prompts)
        fake_images = generate(args.model, prompts, args.num_images, args.seed, args.steps, args.guidance)
        source = f"{args.model} ({len(prompts)} prompts x {args.num_images}, seed {args.seed})"
    fake = features_of(fake_images, args)
    _check_count(fake, "generated images")
    if Path(args.real).suffix == ".npz":
        mu, sigma, n_real = load_statistics(args.real, fake.shape[1])
        real = (mu, sigma)
    else:
        real = features_of(read_images(args.real), args)
        _check_count(real, f"real images in {args.real}")
        n_real = len(real)
        if args.save_stats:
            save_statistics(args.save_stats, real)
    value, interval = frechet_with_interval(real, fake, args.bootstrap, args.seed)
    record = {
        "metric": args.metric,
        "value": value,
        "interval95": interval,
        "bootstrap": args.bootstrap,
        "n_real": n_real,
        "n_fake": len(fake),
        "feature_dim": int(fake.shape[1]),
        "network": network,
        "mode": args.mode if args.metric == "fid" else None,
        "real": str(args.real),
        "fake": source,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    text = json.dumps(record, indent=2)
    if args.out:
        fileio.atomic_write_text(args.out, text + "\n")
    print(text)
    return 0
