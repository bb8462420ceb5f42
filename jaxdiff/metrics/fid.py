"""FID as pytorch-fid, clean-fid or torch-fidelity compute it: sharded Inception features, float64 statistics."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import platforms
from jaxdiff.errors import UserError
from jaxdiff.metrics.frechet import frechet_distance
from jaxdiff.metrics.resize import resize
from jaxdiff.models import inception
from jaxdiff.models.inception import DIMS, FID_CONFIG, INPUT_SIZE
from jaxdiff.models.model import Model, create
from jaxdiff.models.registry import architecture_for


@dataclasses.dataclass(frozen=True)
class Mode:
    """How one reference turns uint8 images into the network's 299x299 input."""

    resize: str  # a jaxdiff.metrics.resize method
    unit_range: bool  # divide by 255 before the resize and map [0, 1] to [-1, 1] by 2x - 1; else (x - 128) / 128
    clip: bool  # clip the resized values to [0, 255] (clean-fid, after PIL's bicubic overshoot)


MODES = {
    # ToTensor (x / 255), F.interpolate bilinear align_corners=False, then 2x - 1 (pytorch_fid.inception.InceptionV3)
    "pytorch-fid": Mode("bilinear", unit_range=True, clip=False),
    # PIL bicubic per channel on float ('F' mode), clip to [0, 255], then (x - 128) / 128 (cleanfid "clean" mode)
    "clean-fid": Mode("pil_bicubic", unit_range=False, clip=True),
    # TF1 resize_bilinear (asymmetric, no half pixel) on float uint8 values, then (x - 128) / 128 (torch-fidelity)
    "torch-fidelity": Mode("bilinear_tf1", unit_range=False, clip=False),
}
DATA_AXES = ("data", "fsdp")  # the mesh axes a batch is split over (jaxdiff.sharding's "batch" rule)


def _mode(mode: str) -> Mode:
    if mode not in MODES:
        raise UserError(f"unknown FID preprocessing mode {mode!r} (known: {', '.join(MODES)})")
    return MODES[mode]


def preprocess(images, mode: str = "pytorch-fid", size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
    """uint8 NHWC images -> float32 [B, 299, 299, 3] network input, as `mode`'s reference does it (jittable).

    pytorch-fid: (2 * resize(x / 255) - 1); clean-fid and torch-fidelity: (resize(x) - 128) / 128, clean-fid clipping
    the resized values to [0, 255] first. The operations and their order are the references' (float32 throughout).
    """
    m = _mode(mode)
    x = images.astype(jnp.float32)
    if m.unit_range:
        x = x / 255.0  # a division, as ToTensor's: x * (1 / 255) rounds differently
    x = resize(x, size, m.resize)
    if m.clip:
        x = jnp.clip(x, 0.0, 255.0)
    return 2.0 * x - 1.0 if m.unit_range else (x - 128.0) / 128.0


def load_inception(path: str | os.PathLike, platform: str | None = None) -> Model:
    """The FID Inception from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's copy, or any
    .pth/.bin/.safetensors in that layout: read through torch.load(weights_only=True)), or from a folder holding a
    jaxdiff checkpoint / config.json + weights. Loading is strict (one error naming every key that does not fit)."""
    from jaxdiff.convert import checkpoint, layout

    path = Path(path)
    if path.is_dir():
        return checkpoint.load_component(path, platform=platform)
    if not path.is_file():
        raise FileNotFoundError(
            f"no Inception weights at {path}: FID needs pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            "(a local file; jaxdiff downloads nothing)"
        )
    model = create(architecture_for(FID_CONFIG), FID_CONFIG, abstract=True, platform=platform)
    params = layout.load_state_dict(model, checkpoint.read_state_dict(path), where=str(path))
    return dataclasses.replace(model, params=jax.tree.map(jnp.asarray, params))


# ---------------------------------------------------------------- batches in, features out


def _to_uint8(x, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        # float images in [0, 1] are quantised as a PNG of them would be (jaxdiff.images.to_uint8): the references
        # all measure uint8 files.
        return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and x.size and (x.min() < 0 or x.max() > 255):
        raise UserError(f"{where}: integer images must lie in [0, 255], found [{x.min()}, {x.max()}]")
    return x.astype(np.uint8)


def _rebatch(images, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 [b <= batch_size, H, W, 3] batches from an array [N, H, W, 3] or an iterable of images / batches."""
    if hasattr(images, "shape") and getattr(images, "ndim", 0) == 4:
        chunks: Iterable = (images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
    else:
        chunks = images
    buffer, held, first = [], 0, None
    for i, chunk in enumerate(chunks):
        chunk = _to_uint8(chunk, f"item {i}")
        chunk = chunk[None] if chunk.ndim == 3 else chunk
        if chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise UserError(f"item {i}: expected RGB images [H, W, 3] or batches [B, H, W, 3], got shape {chunk.shape}")
        first = first or chunk.shape[1:]
        if chunk.shape[1:] != first:
            raise UserError(
                f"images of mixed sizes ({first[0]}x{first[1]} and {chunk.shape[1]}x{chunk.shape[2]} at item {i}): "
                "give images of one size (each size is a separate compiled program)"
            )
        buffer.append(chunk)
        held += len(chunk)
        while held >= batch_size:
            joined = np.concatenate(buffer)
            yield joined[:batch_size]
            buffer, held = [joined[batch_size:]], held - batch_size
    if held:
        yield np.concatenate(buffer)


@functools.lru_cache(maxsize=32)
def _extractor(module, mode: str, output: str, mesh: Mesh | None):
    """The compiled preprocess + Inception program for one mode and output, batch-sharded over `mesh`'s data axes."""

    def run(params, images):
        return module.apply({"params": params}, preprocess(images, mode))[output]

    if mesh is None:
        return jax.jit(run)
    batch = NamedSharding(mesh, _batch_spec(mesh))
    return jax.jit(run, in_shardings=(NamedSharding(mesh, PartitionSpec()), batch), out_shardings=batch)


def _data_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in DATA_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def _batch_spec(mesh: Mesh) -> PartitionSpec:
    return PartitionSpec(_data_axes(mesh) or None)


def _resolve(params, mesh: Mesh | None) -> tuple[object, object]:
    """(module, params placed for the run) from a Model or a bare param tree of the FID Inception."""
    if params is None:
        raise UserError(
            "FID needs the Inception weights: params=jaxdiff.metrics.fid.load_inception("
            "'pt_inception-2015-12-05-6726825d.pth') (pytorch-fid's file, given locally)"
        )
    if isinstance(params, Model):
        module, params = params.module, params.params
    else:
        module = inception.build(FID_CONFIG, platform=None if mesh is None else platforms.of(mesh))
    if mesh is None:
        return module, jax.device_put(params)
    return module, replicate(params, mesh)


def replicate(tree, mesh: Mesh):
    """Every leaf replicated over `mesh`. Each process places its own copy: on a multi-process mesh a plain
    `device_put` would first all-gather every leaf across processes to check that they agree (23.9 M Inception
    parameters through the CPU collectives)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(place, tree)


def iter_features(
    images,
    mode: str = "pytorch-fid",
    params=None,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 50,
    output: str = "pool3",
) -> Iterator[np.ndarray]:
    """float32 features [b, D] per batch (`output`: pool3, logits, logits_unbiased, block0..2) of `images`: an array
    [N, H, W, 3] or an iterable of images or batches, uint8 or float in [0, 1] (quantised as a PNG would be).

    Each batch is padded to a fixed size (a multiple of the mesh's data-axis size) so one program serves all, and
    the next batch is dispatched before the last one's features are read back. Multi-process meshes: each process
    passes its own images, and every process must yield the same number of batches.
    """
    _mode(mode)
    module, params = _resolve(params, mesh)
    run = _extractor(module, mode, output, mesh)
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in _data_axes(mesh)]))
    global_batch = -(-batch_size // shards) * shards
    processes = jax.process_count() if mesh is not None else 1
    local_batch = global_batch // processes
    pending = None
    for batch in _rebatch(images, local_batch):
        valid = np.zeros(local_batch, bool)
        valid[: len(batch)] = True
        padded = np.zeros((local_batch, *batch.shape[1:]), np.uint8)
        padded[: len(batch)] = batch
        if mesh is None:
            x = jnp.asarray(padded)
        else:
            x = jax.make_array_from_process_local_data(NamedSharding(mesh, _batch_spec(mesh)), padded)
        result = (run(params, x), valid)
        if pending is not None:
            yield _gather(*pending, processes)
        pending = result
    if pending is not None:
        yield _gather(*pending, processes)


def _gather(features, valid, processes: int) -> np.ndarray:
    if processes > 1:
        from jax.experimental import multihost_utils

        features = multihost_utils.process_allgather(features, tiled=True)
        valid = multihost_utils.process_allgather(valid, tiled=False).reshape(-1)
    return np.asarray(features, np.float32)[valid]


def features(images, mode: str = "pytorch-fid", params=None, **kwargs) -> np.ndarray:
    """All features [N, D] float32 (see `iter_features`): for KID, IS (output="logits_unbiased"), precision/recall."""
    return np.concatenate(list(iter_features(images, mode, params, **kwargs)))


# ---------------------------------------------------------------- statistics


class Moments:
    """Mean and covariance accumulated batch by batch in float64 (Chan et al.'s pairwise update: no loss of precision
    from subtracting large sums, and any split into batches gives the same result up to rounding)."""

    def __init__(self, dim: int):
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, x) -> None:
        x = np.asarray(x, np.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(axis=0)
        xc = x - mb
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + xc.T @ xc + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(mu [D], sigma [D, D] unbiased as np.cov, n)."""
        if self.n < 2:
            raise UserError(f"a covariance needs at least 2 images, got {self.n}")
        return self.mean, self.m2 / (self.n - 1), self.n


def statistics(
    images,
    mode: str = "pytorch-fid",
    params=None,
    mesh: Mesh | None = None,
    batch_size: int = 50,
    *,
    dims: int = 2048,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the Inception features of `images`, as `mode`'s reference computes them (float64).

    `params`: the FID Inception (`load_inception(...)`, a Model, or its param tree). `dims`: pytorch-fid's
    `--dims` (2048 = pool3; 64, 192, 768 = its lower blocks). Streaming: memory is one batch plus the D x D sums.
    """
    if dims not in DIMS:
        raise UserError(f"dims must be one of {', '.join(map(str, DIMS))} (pytorch-fid's choices), got {dims}")
    moments = Moments(dims)
    batches = iter_features(images, mode, params, mesh=mesh, batch_size=batch_size, output=DIMS[dims])
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"FID features ({mode})", unit="batch")
    for f in batches:
        moments.add(f)
    return moments.result()


def save_statistics(path: str | os.PathLike, mu, sigma, n: int | None = None) -> None:
    """A pytorch-fid / clean-fid compatible `.npz` (`mu`, `sigma`; `n` too, which they ignore)."""
    extra = {} if n is None else {"n": np.int64(n)}
    np.savez_compressed(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, n or None) from a pytorch-fid / clean-fid / jaxdiff statistics `.npz`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no statistics file at {path}")
    try:
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise UserError(f"{path}: not an FID statistics file (needs arrays 'mu' and 'sigma', has {f.files})")
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            n = int(f["n"]) if "n" in f else None
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: not a readable .npz ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together (want [D] and [D, D])")
    return mu, sigma, n


def fid(stats_a, stats_b) -> float:
    """FID between two statistics: each a (mu, sigma) or (mu, sigma, n) tuple or a path to a statistics `.npz`.
    pytorch-fid's numerics (scipy sqrtm; eps 1e-6 on a singular product; the imaginary-part check)."""

    def read(s):
        return load_statistics(s)[:2] if isinstance(s, (str, os.PathLike)) else tuple(s)[:2]

    (mu1, sigma1), (mu2, sigma2) = read(stats_a), read(stats_b)
    if np.shape(mu1) != np.shape(mu2):
        raise UserError(f"statistics of different dimensions: {np.shape(mu1)[0]} and {np.shape(mu2)[0]} features")
    return frechet_distance(mu1, sigma1, mu2, sigma2)
