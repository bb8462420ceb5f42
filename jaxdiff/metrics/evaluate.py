"""`jaxdiff evaluate`: a metric of generated images (folders, statistics files or a model's samples) as one JSON record.

    jaxdiff evaluate fid --inception pt_inception-2015-12-05-6726825d.pth --mode clean-fid --real R --fake F
    jaxdiff evaluate kid|prdc --inception W.pth --real R --fake F     # --features probe on `shapes`
    jaxdiff evaluate is --inception W.pth --fake F
    jaxdiff evaluate clip-score --clip CLIP_FOLDER|shapes --fake F --prompts P.txt    # one prompt per image
    jaxdiff evaluate cmmd --clip CLIP_FOLDER|shapes --real R --fake F
    jaxdiff evaluate fd-probe --real R --model shapes --prompts prompts.txt --num-images 4
    jaxdiff evaluate copyscope --base shapes --components a=OUT_A/model b=OUT_B/model --reference R --prompts P.txt

Each run prints and writes (--out, atomically) one JSON record: metric, value, its 95 % interval (a percentile
bootstrap over the images; KID and IS give the std over their subsets/splits, as the references do), how many real
and generated images it rests on, the feature network, its preprocessing mode and where the images came from.
Feature extraction is one compiled program per batch shape, split over every local device. `--save-stats` writes
the real set's statistics as a pytorch-fid `.npz` (`mu`, `sigma`), readable back by `--real` (FID only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from jaxdiff import fileio
from jaxdiff.errors import UserError
from jaxdiff.metrics import frechet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------------- images


@dataclasses.dataclass
class ImageFolder:
    """The images of a folder (sorted by name), read lazily batch by batch: 50k images need one batch of memory."""

    folder: Path
    files: list[Path]

    @classmethod
    def open(cls, folder: str | Path) -> ImageFolder:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return cls(folder, files)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 [b, H, W, 3] batches; one clear error at the first image whose size differs from the first's."""
        from PIL import Image

        size = None
        for start in range(0, len(self.files), batch_size):
            batch = []
            for path in self.files[start : start + batch_size]:
                try:
                    image = np.asarray(Image.open(path).convert("RGB"))
                except OSError as e:
                    raise UserError(f"{path}: not a readable image ({e})") from None
                size = size or image.shape[:2]
                if image.shape[:2] != size:
                    raise UserError(
                        f"{self.folder} mixes image sizes ({size} and {image.shape[:2]} at {path.name}): "
                        "resize them to one size first"
                    )
                batch.append(image)
            yield np.stack(batch)


def read_images(folder: str | Path) -> np.ndarray:
    """Every image of a folder (sorted by name) as uint8 [N, H, W, 3]; one clear error for mixed sizes."""
    return np.concatenate(list(ImageFolder.open(folder).batches(256)))


def read_prompts(path: str | Path) -> list[str]:
    from jaxdiff.data.prompts import read_prompts as read

    prompts = read(path)
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def generate(model: str, prompts: list[str], num_images: int, seed: int, steps: int | None, guidance: float | None):
    """`num_images` samples per prompt from a pipeline (seeds seed, seed + 1, ...), uint8 [N, H, W, 3], ordered
    seed-major: image i shows prompts[i % len(prompts)]."""
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(model)
    out = []
    for k in range(num_images):
        images = pipe(prompts, steps=steps or 25, guidance=7.5 if guidance is None else guidance, seed=seed + k)
        out.append(np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def _as_batches(images, batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(images, ImageFolder):
        yield from images.batches(batch_size)
    else:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]


# ------------------------------------------------------------------------------------------ feature networks


def _mesh():
    """All local devices on one data axis (None for a single device): feature batches are split over them."""
    import jax

    devices = jax.devices()
    if len(devices) == 1:
        return None
    from jaxdiff.sharding import make_mesh

    return make_mesh({"data": len(devices)}, devices)


def probe_features(images, args=None) -> np.ndarray:
    """The shapes probe's penultimate features [N, D] (float64): the stand-in for Inception on `shapes`."""
    from jaxdiff.metrics.probe import load_probe

    probe = _cached("probe", load_probe)
    return np.concatenate([np.asarray(probe(b)[1], np.float64) for b in _as_batches(images, 500)])


def _inception_params(args):
    from jaxdiff.metrics import fid

    if not getattr(args, "inception", None):
        raise UserError(
            f"{args.metric} needs the FID Inception weights: --inception pt_inception-2015-12-05-6726825d.pth "
            "(pytorch-fid's file, read with torch.load(weights_only=True)) or a converted jaxdiff folder"
        )
    return _cached(("inception", str(args.inception)), lambda: fid.load_inception(args.inception).params)


def _inception_output(images, args, output: str) -> np.ndarray:
    from jaxdiff.metrics import fid

    params = _inception_params(args)
    mesh = _mesh()
    chunks = fid.iter_features(
        _as_batches(images, args.batch_size), args.mode, params, mesh=mesh, batch_size=args.batch_size, output=output
    )
    return np.concatenate([np.asarray(c, np.float64) for c in _progress(chunks, images, args, f"Inception {output}")])


def inception_features(images, args) -> np.ndarray:
    """pool3 features [N, 2048] of the FID Inception (weights from --inception, preprocessing --mode)."""
    return _inception_output(images, args, "pool3")


def inception_logits(images, args) -> np.ndarray:
    """The Inception's 1008 logits without the fc bias (torch-fidelity's and StyleGAN's IS input)."""
    return _inception_output(images, args, "logits_unbiased")


def clip_image_features(images, args) -> np.ndarray:
    """L2-normalised CLIP image embeddings [N, P]: a transformers CLIPModel folder (--clip), or the shapes CLIP."""
    if args.clip == "shapes":
        clip = _cached("shapes-clip", _load_shapes_clip)
        out = np.concatenate([clip.image_embeds(b) for b in _as_batches(images, 256)])
    else:
        from jaxdiff.metrics import clip_preprocess, clip_score
        from jaxdiff.models import clip_vision

        model = _clip_model(args)
        config = None
        if args.metric == "cmmd":  # CMMD's io_util: center-crop the largest square first, then resize
            config = clip_preprocess.CLIPImageConfig.for_image_size(clip_vision.image_size(model), crop_first=True)
        out = clip_score.image_embeddings(
            model,
            (im for b in _as_batches(images, args.batch_size) for im in b),
            batch_size=args.batch_size,
            config=config,
            mesh=_mesh(),
        )
    out = np.asarray(out, np.float64)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def clip_text_features(prompts: list[str], args) -> np.ndarray:
    if args.clip == "shapes":
        return np.asarray(_cached("shapes-clip", _load_shapes_clip).text_embeds(prompts), np.float64)
    from jaxdiff.metrics import clip_score
    from jaxdiff.sampling.text import load_tokenizer

    model = _clip_model(args)
    tokenizer = _cached(("clip-tokenizer", args.clip), lambda: load_tokenizer(_clip_tokenizer_folder(args.clip)))
    ids, mask = clip_score.text_inputs(tokenizer, prompts, clip_score.text_length(model))
    return np.asarray(clip_score.text_embeddings(model, ids, mask, batch_size=args.batch_size), np.float64)


def _load_shapes_clip():
    from jaxdiff.metrics.shapes_clip import load_shapes_clip

    return load_shapes_clip()


def _clip_model(args):
    if not getattr(args, "clip", None):
        raise UserError(
            f"{args.metric} needs a CLIP model: --clip FOLDER (a transformers CLIPModel folder, e.g. "
            "openai/clip-vit-large-patch14 saved locally, or a converted jaxdiff folder) or --clip shapes"
        )
    from jaxdiff.api import load_model

    def load():
        try:
            model = load_model(args.clip)
        except FileNotFoundError as e:
            raise UserError(f"--clip {args.clip}: {e}") from None
        if model.architecture.name != "CLIPModel":
            raise UserError(f"--clip {args.clip} holds a {model.architecture.name}, not a CLIPModel (both towers)")
        return model

    return _cached(("clip", args.clip), load)


def _clip_tokenizer_folder(path: str) -> Path:
    folder = Path(path)
    return folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder


_CACHE: dict = {}


def _cached(key, load: Callable):
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


def _progress(chunks, images, args, what: str):
    if not getattr(args, "progress", False):
        return chunks
    from tqdm import tqdm

    return tqdm(chunks, desc=what, unit="batch", total=-(-len(images) // args.batch_size))


FEATURES: dict[str, tuple[str, Callable]] = {
    "inception": ("FID Inception-v3 pool3 (pytorch-fid)", inception_features),
    "probe": ("shapes probe (jaxdiff/assets/shapes_probe)", probe_features),
    "clip": ("CLIP image embeddings, L2-normalised", clip_image_features),
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


def _check_count(features: np.ndarray, what: str, at_least: int = 2, why: str = "a covariance") -> None:
    if len(features) < at_least:
        raise UserError(f"{what}: {len(features)} image(s); {why} needs at least {at_least}")


def bootstrap_interval(
    statistic: Callable, sets: list, boots: int, seed: int, centred: bool = False
) -> tuple[float, float] | dict | None:
    """95 % interval of statistic(*sets) over resampling each array in `sets` (rows, with replacement); a set given as
    statistics (a tuple) is held fixed. Percentile interval, or with `centred` the bootstrap spread placed around
    the value, (θ̂ − (median − q2.5), θ̂ + (q97.5 − median)), clipped at 0: for a statistic that resampling biases,
    as the Fréchet distance (rows drawn with replacement repeat images, which raises FD far more than sampling
    noise does: 200 probe features, FD 59, resampled 100-160), whose percentile interval would not even contain
    the value. It then says how much the value moves with the sample, not how biased FD itself is at this n."""
    if boots <= 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(boots):
        drawn = [s if isinstance(s, tuple) else s[rng.integers(0, len(s), len(s))] for s in sets]
        values.append(statistic(*drawn))
    if isinstance(values[0], dict):  # one interval per named value
        return {k: _percentiles([v[k] for v in values]) for k in values[0]}
    lo, hi = _percentiles(values)
    if centred:
        value, median = statistic(*sets), float(np.median(values))
        lo, hi = max(0.0, value - (median - lo)), value + (hi - median)
    return lo, hi


def _percentiles(values) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(values, np.float64), [2.5, 97.5])
    return float(lo), float(hi)


def _fd(real, fake) -> float:
    stats = [x if isinstance(x, tuple) else frechet.feature_statistics(x) for x in (real, fake)]
    return frechet.frechet_distance_few(*stats[0], *stats[1])


def frechet_with_interval(real, fake, boots: int = 200, seed: int = 0) -> tuple[float, tuple[float, float] | None]:
    """FD of fake features against real (features [N, D] or (mu, sigma)), and a 95 % percentile bootstrap interval
    over resampling the images of each set that is given as features (centred on the value: see
    `bootstrap_interval`)."""
    return _fd(real, fake), bootstrap_interval(_fd, [real, fake], boots, seed, centred=True)


# --------------------------------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class Metric:
    """What a metric reads (`features`: the default network; `choices`: the ones it accepts) and what it needs."""

    help: str
    features: str
    choices: tuple[str, ...]
    needs_real: bool = True
    statistics_ok: bool = False  # --real may be a statistics .npz
    needs_prompts: bool = False  # one prompt per generated image


METRICS = {
    "fid": Metric(
        "Fréchet distance of Inception pool3 features (or --features probe)",
        "inception",
        ("inception", "probe"),
        statistics_ok=True,
    ),
    "fd-probe": Metric(
        "Fréchet distance on the shapes probe's features (fid --features probe)",
        "probe",
        ("probe",),
        statistics_ok=True,
    ),
    "kid": Metric(
        "Kernel Inception Distance (torch-fidelity's subsets), mean and std", "inception", ("inception", "probe")
    ),
    "prdc": Metric("precision, recall, density, coverage of k-NN manifolds", "inception", ("inception", "probe")),
    "is": Metric(
        "Inception Score over splits of the Inception's logits, mean and std",
        "inception",
        ("inception",),
        needs_real=False,
    ),
    "clip-score": Metric(
        "torchmetrics' CLIP score of each image against its prompt",
        "clip",
        ("clip",),
        needs_real=False,
        needs_prompts=True,
    ),
    "cmmd": Metric("CMMD: RBF MMD of CLIP image embeddings (google-research/cmmd)", "clip", ("clip",)),
}


def _fid_like(real, fake, args) -> dict:
    value, interval = frechet_with_interval(real, fake, args.bootstrap, args.seed)
    return {"value": value, "interval95": interval}


def _kid(real, fake, args) -> dict:
    from jaxdiff.metrics import kid

    size = min(args.kid_subset_size, len(real), len(fake))
    result = kid.kid(real, fake, subsets=args.kid_subsets, subset_size=size)
    return {"value": result.mean, "std": result.std, "kid_subsets": args.kid_subsets, "kid_subset_size": size}


def _prdc(real, fake, args) -> dict:
    from jaxdiff.metrics import prdc

    fn = lambda r, f: prdc.prdc(r, f, nearest_k=args.nearest_k)  # noqa: E731
    return {
        "value": fn(real, fake),
        "interval95": bootstrap_interval(fn, [real, fake], args.bootstrap, args.seed),
        "nearest_k": args.nearest_k,
    }


def _is(logits, args) -> dict:
    from jaxdiff.metrics import inception_score

    result = inception_score.inception_score(logits, splits=args.splits)
    return {"value": result.mean, "std": result.std, "splits": args.splits}


def _cmmd(real, fake, args) -> dict:
    from jaxdiff.metrics import cmmd

    return {
        "value": cmmd.cmmd(real, fake),
        "interval95": bootstrap_interval(cmmd.cmmd, [real, fake], args.bootstrap, args.seed),
    }


def _clip_score(image_embeds, text_embeds, args) -> dict:
    from jaxdiff.metrics import clip_score

    per_pair = clip_score.clip_scores(image_embeds, text_embeds)
    interval = bootstrap_interval(lambda s: max(float(np.mean(s)), 0.0), [per_pair], args.bootstrap, args.seed)
    return {"value": max(float(np.mean(per_pair)), 0.0), "interval95": interval}


# -------------------------------------------------------------------------------------------------- command


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="a metric of generated images (FID, KID, IS, PRDC, CLIP score, CMMD, CopyScope) as a JSON record",
        description=__doc__.split("\n\n")[0],
    )
    metrics = p.add_subparsers(dest="metric", metavar="METRIC", required=True)
    for name, metric in METRICS.items():
        m = metrics.add_parser(name, help=metric.help, description=metric.help + ". " + _FOOTER)
        _add_arguments(m, name, metric)
        m.set_defaults(func=run)
    from jaxdiff.metrics import copyscope

    summary = copyscope.__doc__.split("\n")[0]
    c = metrics.add_parser(
        "copyscope",
        help=summary,
        description=copyscope.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    copyscope.add_arguments(c)
    c.set_defaults(func=copyscope.run)


_FOOTER = "Prints one JSON record (and writes it with --out); bad input is one line and exit 2."


def _add_arguments(p, name: str, metric: Metric) -> None:
    if len(metric.choices) > 1:
        p.add_argument(
            "--features",
            choices=metric.choices,
            default=metric.features,
            help=f"feature network (default {metric.features}; probe: the shapes probe)",
        )
    if "inception" in metric.choices:
        p.add_argument("--inception", help="the FID Inception weights (pytorch-fid's .pth, or a jaxdiff folder)")
        p.add_argument("--mode", default="pytorch-fid", help="preprocessing: pytorch-fid, clean-fid, torch-fidelity")
    if "clip" in metric.choices:
        p.add_argument("--clip", help="a transformers CLIPModel folder (or converted jaxdiff folder), or 'shapes'")
    p.add_argument("--batch-size", type=int, default=50, help="images per compiled feature call")
    if metric.needs_real:
        real_help = "a folder of real images" + (", or a statistics .npz (mu, sigma)" if metric.statistics_ok else "")
        p.add_argument("--real", required=True, help=real_help)
    p.add_argument("--fake", help="a folder of generated images")
    p.add_argument("--model", help="instead of --fake: sample a pipeline ('shapes', a jaxdiff or diffusers folder)")
    prompts_help = "a text file, one prompt per line: with --model the prompts to sample"
    if metric.needs_prompts:
        prompts_help += "; with --fake one prompt per image (in file-name order) or a single prompt for all"
    p.add_argument("--prompts", help=prompts_help)
    p.add_argument("--num-images", type=int, default=1, help="with --model: images per prompt")
    p.add_argument("--steps", type=int, default=None, help="with --model: sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="with --model: guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="first sampling seed; also seeds the bootstrap")
    if name in ("kid", "is"):
        if name == "kid":
            p.add_argument("--kid-subsets", type=int, default=100, help="subsets (torch-fidelity: 100)")
            p.add_argument(
                "--kid-subset-size",
                type=int,
                default=1000,
                help="rows per subset (torch-fidelity: 1000; capped at the smaller set)",
            )
        else:
            p.add_argument("--splits", type=int, default=10, help="splits (torch-fidelity: 10)")
    else:
        p.add_argument(
            "--bootstrap",
            type=int,
            default=None,
            help="bootstrap resamples for the 95%% interval (0: none; default 200, 20 for >512-D features)",
        )
    if name == "prdc":
        p.add_argument("--nearest-k", type=int, default=5, help="k of the k-NN radii (reference: 5)")
    if metric.statistics_ok:
        p.add_argument("--save-stats", help="write the real set's statistics (.npz, pytorch-fid layout) here")
    p.add_argument("--out", help="write the JSON record here (atomic)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _fake_images(args):
    if bool(args.fake) == bool(args.model):
        raise UserError("give exactly one of --fake DIR and --model PATH (with --prompts FILE)")
    if args.model:
        if not args.prompts:
            raise UserError("--model needs --prompts FILE (one prompt per line)")
        prompts = read_prompts(args.prompts)
        images = generate(args.model, prompts, args.num_images, args.seed, args.steps, args.guidance)
        return (
            images,
            f"{args.model} ({len(prompts)} prompts x {args.num_images}, seed {args.seed})",
            prompts * (args.num_images),
        )
    images = ImageFolder.open(args.fake)
    prompts = None
    if args.prompts:
        prompts = read_prompts(args.prompts)
        if len(prompts) == 1:
            prompts = prompts * len(images)
        elif len(prompts) != len(images):
            raise UserError(
                f"{args.prompts} holds {len(prompts)} prompts for {len(images)} images in {args.fake}: "
                "give one prompt per image (file-name order) or a single prompt"
            )
    return images, str(args.fake), prompts


def run(args) -> int:
    metric = METRICS[args.metric]
    network = getattr(args, "features", metric.features)
    if network != "inception":
        args.mode = None
    if metric.needs_prompts and not (args.prompts or args.model):
        raise UserError(f"{args.metric} needs --prompts FILE: the prompt of each image")
    t0 = time.perf_counter()
    fake_images, source, prompts = _fake_images(args)
    description, features_of = FEATURES[network]
    record: dict = {"metric": args.metric}
    n_real = None
    if args.metric == "is":
        logits = inception_logits(fake_images, args)
        _check_count(logits, "generated images", args.splits, f"{args.splits} splits")
        record.update(_is(logits, args))
        description = "FID Inception-v3 logits without bias (torch-fidelity)"
        dim = logits.shape[1]
    elif args.metric == "clip-score":
        image = features_of(fake_images, args)
        _set_bootstrap(args, 0)
        record.update(_clip_score(image, clip_text_features(prompts, args), args))
        dim = image.shape[1]
    else:
        fake = features_of(fake_images, args)
        dim = fake.shape[1]
        _set_bootstrap(args, dim)
        _check_count(fake, "generated images")
        if metric.statistics_ok and Path(args.real).suffix == ".npz":
            mu, sigma, n_real = load_statistics(args.real, dim)
            real = (mu, sigma)
        else:
            if Path(args.real).suffix == ".npz":
                raise UserError(f"{args.metric} needs real images (a folder), not statistics ({args.real})")
            real = features_of(ImageFolder.open(args.real), args)
            _check_count(real, f"real images in {args.real}")
            n_real = len(real)
            if getattr(args, "save_stats", None):
                save_statistics(args.save_stats, real)
        compute = {"fid": _fid_like, "fd-probe": _fid_like, "kid": _kid, "prdc": _prdc, "cmmd": _cmmd}[args.metric]
        record.update(compute(real, fake, args))
    record.update(
        {
            "n_real": n_real,
            "n_fake": len(fake_images),
            "feature_dim": int(dim),
            "network": description if network != "clip" else f"{description} ({args.clip})",
            "mode": args.mode,
            "real": getattr(args, "real", None),
            "fake": source,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    if "bootstrap" in args and args.bootstrap is not None:
        record["bootstrap"] = args.bootstrap
    text = json.dumps(record, indent=2)
    if args.out:
        fileio.atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def _set_bootstrap(args, dim: int) -> None:
    """The default resample count: 200, or 20 where each resample costs a large matrix square root."""
    if "bootstrap" in args and args.bootstrap is None:
        args.bootstrap = 200 if dim <= 512 else 20
