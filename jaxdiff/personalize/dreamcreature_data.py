"""The shapes world as DreamCreature data: two-object renders whose parts are the left object, the right object and
the background, with exact part masks and sub-concept codes, either supervised (the (shape, colour) pair of each
object, the background colour) or unsupervised (k-means of the shapes probe's features of each object alone, and
of the border colour: the official pipeline's k-means of DINO features, with the probe in DINO's place)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdiff.personalize.dreamcreature import MASKS_FILE, PARTS_FILE, format_codes


def shapes_code(shape: str, colour: str) -> int:
    """The shapes world's sub-concept code of an object: shape index x 4 + colour index (12 codes)."""
    from jaxdiff.data import shapes as S

    return S.SHAPES.index(shape) * len(S.COLOURS) + S.COLOURS.index(colour)


def shapes_meta() -> dict:
    from jaxdiff.data import shapes as S

    objects = [f"{c} {s}" for s in S.SHAPES for c in S.COLOURS]
    k = len(objects)
    return {
        "parts": ["left object", "right object", "background"],
        "num_codes": k,
        "code_names": [objects, objects, [f"{b} background" for b in S.BACKGROUNDS]],
    }


def held_out_pairs(frac: float = 0.3, seed: int = 0) -> list[tuple[int, int]]:
    """The (left code, right code) combinations held out of training: round(frac · 144) of them, fixed by seed."""
    k = shapes_meta()["num_codes"]
    pairs = [(a, b) for a in range(k) for b in range(k)]
    order = np.random.default_rng([seed, 41]).permutation(len(pairs))
    return sorted(pairs[i] for i in order[: round(frac * len(pairs))])


def shapes_scene(left: int, right: int, rng: np.random.Generator, background: str | None = None):
    """A two-object scene with the objects of codes left / right (random sizes, jitter and background)."""
    from jaxdiff.data import shapes as S

    objs = []
    for code, pos in ((left, "left"), (right, "right")):
        shape, colour = S.SHAPES[code // len(S.COLOURS)], S.COLOURS[code % len(S.COLOURS)]
        dx, dy = rng.uniform(-0.03, 0.03, 2)
        objs.append(S.ShapeObject(shape, colour, str(rng.choice(S.SIZES)), pos, float(dx), float(dy)))
    bg = str(rng.choice(S.BACKGROUNDS)) if background is None else background
    return S.Scene(tuple(objs), bg)


def scene_masks(scene, size: int = 32) -> np.ndarray:
    """[3, size, size] float32: left object, right object and background coverage (summing to 1)."""
    from jaxdiff.data import shapes as S

    left, right = (S.coverage(o, size) for o in scene.objects)
    right = np.minimum(right, 1.0 - left)
    return np.stack([left, right, np.clip(1.0 - left - right, 0.0, 1.0)]).astype(np.float32)


def border_colour(images: np.ndarray) -> np.ndarray:
    """Median colour [N, 3] of each image's one-pixel border (the background), images [N, H, W, 3]."""
    images = np.asarray(images, np.float32)
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    return np.median(border, axis=1)


def one_half(images: np.ndarray, side: str) -> np.ndarray:
    """Images [N, H, W, 3] with the other half (columns) painted in each image's border colour: one part left."""
    out = np.array(images, np.float32, copy=True)
    w = out.shape[2] // 2
    out[:, :, slice(w, None) if side == "left" else slice(0, w)] = border_colour(images)[:, None, None, :]
    return out


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of x [N, F] (k-means++ seeding, squared Euclidean); (labels [N], centres [k, F])."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng([seed, 47])
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    centres = np.asarray(centres)
    labels = np.full(len(x), -1)
    for _ in range(iters):
        new = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if np.any(labels == j):
                centres[j] = x[labels == j].mean(0)
    return labels, centres


def kmeans_codes(images: np.ndarray, probe, sizes: Sequence[int], seed: int = 0) -> np.ndarray:
    """Unsupervised codes [N, 3]: per object side, k-means (sizes[0], sizes[1] clusters) of the probe features of
    the image with only that half kept; background: k-means (sizes[2]) of the border colour."""
    feats = [probe(one_half(images, side))[1] for side in ("left", "right")] + [border_colour(images)]
    return np.stack([kmeans(f, n, seed + m)[0] for m, (f, n) in enumerate(zip(feats, sizes))], axis=1)


def write_part_renders(
    folder: str | os.PathLike,
    n: int,
    held_out: Sequence[tuple[int, int]],
    seed: int = 0,
    codes: str = "supervised",
    probe=None,
    clusters: int = 36,
) -> dict:
    """n two-object shapes renders (PNG) of (left, right) combinations not in `held_out`, with parts.json (codes
    "0:left 1:right 2:background") and parts_masks.npz (exact renderer masks); returns the parts.json dict.

    codes "supervised": the (shape, colour) code of each object and the background colour; "kmeans": clusters of
    `probe` features (default: the shipped probe) as `kmeans_codes`, `clusters` per object side (over-clustering,
    as the official K = 256: at 12 clusters, size and background split the labels) and 3 for the background;
    parts.json then also holds "labels" (the supervised codes) and code_names "majority label (share)"."""
    from jaxdiff.data import shapes as S
    from jaxdiff.images import save_png

    if codes not in ("supervised", "kmeans"):
        raise ValueError(f"codes={codes!r}: supervised or kmeans")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = shapes_meta()
    k = meta["num_codes"]
    banned = {tuple(p) for p in held_out}
    allowed = [(a, b) for a in range(k) for b in range(k) if (a, b) not in banned]
    rng = np.random.default_rng([seed, 43])
    labels, names, masks, images = [], [], [], []
    for i in range(n):
        left, right = allowed[int(rng.integers(len(allowed)))]
        scene = shapes_scene(left, right, rng)
        name = f"{i:04d}.png"
        images.append(S.render(scene))
        save_png(folder / name, images[-1])
        labels.append([left, right, S.BACKGROUNDS.index(scene.background)])
        names.append(name)
        masks.append(scene_masks(scene))
    labels = np.asarray(labels)
    meta.update(held_out=[list(p) for p in sorted(banned)], code_source=codes)
    if codes == "kmeans":
        if probe is None:
            from jaxdiff.metrics.probe import load_probe

            probe = load_probe()
        sizes = [clusters, clusters, len(S.BACKGROUNDS)]
        found = kmeans_codes(np.stack(images).astype(np.float32) / 255.0, probe, sizes, seed)
        meta["labels"] = {name: format_codes(row, k) for name, row in zip(names, labels)}
        k = meta["num_codes"] = max(sizes)
        meta["code_names"] = [
            [_majority(labels[found[:, m] == j, m], meta["code_names"][m]) for j in range(sizes[m])] for m in range(3)
        ]
        labels = found
    meta["codes"] = {name: format_codes(row, k) for name, row in zip(names, labels)}
    (folder / PARTS_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(folder / MASKS_FILE, files=np.asarray(names), masks=np.stack(masks).astype(np.float16))
    return meta


def _majority(labels: np.ndarray, names: Sequence[str]) -> str:
    if not len(labels):
        return "empty cluster"
    counts = np.bincount(labels, minlength=len(names))
    return f"{names[int(counts.argmax())]} ({counts.max() / len(labels):.0%})"


def cluster_of_label(parts: dict) -> list[np.ndarray]:
    """For k-means parts.json: per part, label code -> the cluster holding most images of that label (the code to
    prompt for it); identity maps for supervised codes."""
    from jaxdiff.personalize.dreamcreature import parse_codes

    m, k = len(parts["parts"]), int(parts["num_codes"])
    if "labels" not in parts:
        return [np.arange(k + 1) for _ in range(m)]
    files = sorted(parts["codes"])
    found = np.stack([parse_codes(parts["codes"][f], m, k) for f in files])
    truth = np.stack([parse_codes(parts["labels"][f], m, k) for f in files])
    out = []
    for p in range(m):
        table = np.zeros((k + 1, k + 1), np.int64)
        np.add.at(table, (truth[:, p], found[:, p]), 1)
        out.append(table.argmax(1))
    return out
