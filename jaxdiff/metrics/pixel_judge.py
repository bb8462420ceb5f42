"""A non-learned judge of shapes images: segments objects by colour, names shape/colour/size/position from geometry."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage, spatial

from jaxdiff.data import shapes as S

# Per-image verdict codes; every code but "ok" makes the image invalid.
REASONS = (
    "ok",
    "background",  # the border is not one plain neutral colour (noise, a coloured frame or tint, a gradient)
    "empty",  # no object
    "too_many",  # more objects than asked (or than 2)
    "too_few",  # fewer objects than asked
    "fragments",  # debris: pieces too small to be an object next to the object(s)
    "unknown_shape",  # a blob that is none of the shapes (half shapes, smears, merged objects)
    "mixed_colour",  # one object made of two palette colours
    "unknown_colour",  # an object colour far from every palette colour
)
FEATURES = ("fill", "log_aspect", "solidity", "compactness", "h3", "h4", "h5", "h6")

# Thresholds, in ΔE (CIE76) or in units of the image area; see `calibrate` for the shape statistics.
BG_DELTA_E = 12.0  # a pixel this far from the background colour may belong to an object next to it
OBJECT_DELTA_E = 30.0  # a pixel this far is object: objects grow from these (faint smudges never start one)
BORDER_DELTA_E = 20.0  # border pixels this near the background colour count as plain background
BG_MAX_CHROMA = 15.0  # backgrounds are neutral (white, grey, black): Lab chroma at most this
SMUDGE_CONTRAST = 0.45  # fraction of the weakest object-vs-background contrast below which a blob is a smudge
GROW = 2  # pixels an object grows from its strong pixels into the weak ones
BG_UNIFORM = 0.6  # at least this fraction of the border must be background
SPECK_AREA = 1.5 / 1024  # smaller blobs are ignored (stray pixels)
MIN_OBJECT_AREA = 0.4 * 35 / 1024  # smaller blobs are fragments (~0.4 x the smallest real object, a small star)
COLOUR_MAX_DELTA_E = 30.0  # farther from every palette colour: unknown colour
MIXED_FRACTION = 0.25  # core pixels nearer a second palette colour than this fraction: mixed colour
SHAPE_MAX_DISTANCE = 6.0  # RMS z-score to the nearest shape beyond which a blob is none of them
SPLIT_ASPECT = 1.4  # a blob across the midline this much wider than tall is two touching objects
# Shape statistics (mean, std per FEATURES) from `calibrate()` on the renderer's train split (seed 0).
SHAPE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "circle": (
        (0.7862, -0.0001, 0.9278, 0.9829, 0.0032, 0.0031, 0.0025, 0.0032),
        (0.0087, 0.0121, 0.0162, 0.0072, 0.0018, 0.0026, 0.0015, 0.0026),
    ),
    "square": (
        (0.9996, 0.0006, 0.9983, 0.9425, 0.0018, 0.134, 0.0017, 0.0036),
        (0.0009, 0.014, 0.0027, 0.0057, 0.0013, 0.0023, 0.001, 0.0029),
    ),
    "triangle": (
        (0.5566, -0.0047, 0.8938, 0.8053, 0.2647, 0.0135, 0.0388, 0.0921),
        (0.0155, 0.0153, 0.019, 0.0066, 0.0031, 0.0031, 0.0023, 0.0033),
    ),
    "cross": (
        (0.5545, 0.0002, 0.7255, 0.8066, 0.014, 0.3199, 0.0102, 0.0121),
        (0.0062, 0.0146, 0.0321, 0.0088, 0.0114, 0.0165, 0.0061, 0.01),
    ),
    "star": (
        (0.5142, 0.0429, 0.6819, 0.8303, 0.0054, 0.0064, 0.2443, 0.0062),
        (0.0226, 0.0263, 0.0267, 0.0083, 0.0029, 0.0038, 0.0131, 0.0041),
    ),
    "hexagon": (
        (0.7731, 0.1101, 0.9169, 0.9722, 0.0039, 0.0039, 0.0022, 0.05),
        (0.0099, 0.017, 0.0133, 0.0089, 0.0028, 0.0024, 0.0013, 0.0036),
    ),
}
STD_FLOOR = np.array([0.03, 0.04, 0.03, 0.02, 0.03, 0.03, 0.03, 0.03])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 255] [..., 3] -> CIELAB (D65) [..., 3]."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


@functools.cache
def _fill_per_extent(shape: str) -> float:
    """Area of `shape` divided by the square of its size class's extent (triangle and star drawn larger)."""
    n = 128
    obj = S.ShapeObject(shape, "red", "large", "center")
    return float(S.coverage(obj, n).sum() / (S.EXTENT[("center", "large")] * n) ** 2)


def _border(images: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels [N, 4(W-1), 3]."""
    return np.concatenate(
        [images[:, 0, :-1], images[:, :-1, -1], images[:, -1, ::-1][:, :-1], images[:, ::-1, 0][:, :-1]], axis=1
    )


def _radial_harmonics(alpha: np.ndarray, cy: float, cx: float, extent: float, angles: int = 64) -> np.ndarray:
    """|Fourier coefficient| k = 3..6 of the boundary radius r(θ) / mean r, seen from the centroid.

    The boundary along each ray is where the bilinearly interpolated coverage first drops below 1/2: a square
    has a strong 4th harmonic, a triangle a 3rd, a star a 5th, a hexagon a weak 6th, a disc none.
    """
    step = 0.25
    radii = np.arange(0.0, extent + 2.0, step)
    theta = 2 * np.pi * np.arange(angles) / angles
    ys = cy - 0.5 + np.sin(theta)[:, None] * radii[None]  # pixel centres sit at integer + 0.5
    xs = cx - 0.5 + np.cos(theta)[:, None] * radii[None]
    a = ndimage.map_coordinates(alpha, [ys.ravel(), xs.ravel()], order=1, mode="constant").reshape(ys.shape)
    inside = np.cumprod(a >= 0.5, axis=1).astype(bool)
    j = inside.sum(1)  # first sample outside
    j = np.clip(j, 1, len(radii) - 1)
    rows = np.arange(angles)
    a0, a1 = a[rows, j - 1], a[rows, j]
    r = radii[j - 1] + step * np.clip((a0 - 0.5) / np.maximum(a0 - a1, 1e-6), 0, 1)
    spectrum = np.abs(np.fft.rfft(r)) / max(r.sum(), 1e-6) * 2
    return spectrum[3:7]


def blob_features(alpha: np.ndarray) -> tuple[np.ndarray, dict]:
    """Geometry of one object from its coverage alpha [H, W] in [0, 1]: (FEATURES vector, extras).

    extras: area (pixels), cx, cy (pixels), width, height (pixels).
    """
    area = float(alpha.sum())
    ys, xs = np.indices(alpha.shape)
    cx = float((alpha * (xs + 0.5)).sum() / area)
    cy = float((alpha * (ys + 0.5)).sum() / area)
    width, height = float(alpha.max(0).sum()), float(alpha.max(1).sum())
    # Polar second moment, each pixel a unit square: a disc has area² / (2π J) = 1, elongated or spiky shapes less.
    j = float((alpha * ((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 + 1 / 6)).sum())
    mask = alpha >= 0.5
    py, px = np.nonzero(mask)
    if len(px) >= 3 and np.ptp(px) > 0 and np.ptp(py) > 0:
        corners = np.concatenate([np.stack([px + dx, py + dy], 1) for dx in (0, 1) for dy in (0, 1)])
        solidity = float(mask.sum() / spatial.ConvexHull(corners).volume)
    else:
        solidity = 0.0
    harmonics = _radial_harmonics(alpha, cy, cx, max(width, height))
    feats = np.array(
        [
            area / max(width * height, 1e-6),
            np.log(max(width, 1e-6) / max(height, 1e-6)),
            solidity,
            area**2 / (2 * np.pi * max(j, 1e-6)),
            *harmonics,
        ]
    )
    return feats, {"area": area, "cx": cx, "cy": cy, "width": width, "height": height}


def classify_shape(feats: np.ndarray, shapes: Sequence[str] = S.ALL_SHAPES) -> tuple[int, float]:
    """(index into ALL_SHAPES or -1 for none of them, RMS z-score to the nearest shape in `shapes`)."""
    best, best_d = -1, np.inf
    for name in shapes:
        mean, std = SHAPE_STATS[name]
        z = (feats - np.asarray(mean)) / np.maximum(np.asarray(std), STD_FLOOR)
        d = float(np.sqrt(np.mean(z * z)))
        if d < best_d:
            best, best_d = S.ALL_SHAPES.index(name), d
    return (best if best_d <= SHAPE_MAX_DISTANCE else -1), best_d


def _palette(colours: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([S.ALL_COLOURS.index(c) for c in colours])
    return ids, srgb_to_lab(np.array([S.RGB[c] for c in colours], np.float64))


def _components(strong: np.ndarray, weak: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, int]:
    """Objects of each image: 8-connected components of strong [N, H, W] grown by GROW pixels into weak [N, H, W],
    labelled 1.. across the batch; [N, H, W] int. Where split [N], wide blobs across the midline are cut there."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    labels, count = ndimage.label(strong, structure=structure)
    # Two objects that touch across the midline (left and right slots) are cut apart there.
    w = strong.shape[2]
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        _, ys, xs = sl
        width, height = xs.stop - xs.start, ys.stop - ys.start
        if split[sl[0].start] and xs.start < w // 2 < xs.stop and width > SPLIT_ASPECT * height:
            part = labels[sl]
            right = part == k
            right[:, :, : max(w // 2 - xs.start, 0)] = False
            count += 1
            part[right] = count
    for _ in range(GROW):
        grown = ndimage.grey_dilation(labels, footprint=structure)
        labels = np.where((labels == 0) & weak, grown, labels)
    return labels, count


def segment(images: np.ndarray, split: bool | np.ndarray = True) -> tuple[list[list[dict]], np.ndarray, np.ndarray]:
    """Objects of images [N, H, W, 3] (uint8, or float in [0, 1]) against their plain background.

    `split` (per image or for all): a blob across the midline much wider than tall is two touching objects, one in
    each slot (judge passes False where one object is asked).

    Returns (per image a list of blobs {"alpha": coverage [H, W], "fg": RGB, "core": Lab [P, 3] of its inner
    pixels, "cx": centroid x in pixels, "small": too small to be an object} sorted left to right;
    the background colours in Lab [N, 3]; border_ok bool [N]: the border is plain).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"the pixel judge reads images [N, H, W, 3], got {images.shape}")
    if images.dtype != np.uint8:
        images = np.clip(np.rint(np.asarray(images, np.float64) * 255.0), 0, 255)
    images = images.astype(np.float64)
    n, h, w, _ = images.shape
    pixel_area = 1.0 / (h * w)
    border = _border(images)
    bg = np.median(border, axis=1)  # [N, 3]
    lab = srgb_to_lab(images)
    bg_lab = srgb_to_lab(bg)
    dist = np.linalg.norm(lab - bg_lab[:, None, None], axis=-1)  # [N, H, W]
    border_dist = np.linalg.norm(srgb_to_lab(border) - bg_lab[:, None], axis=-1)
    border_ok = ((border_dist < BORDER_DELTA_E).mean(1) >= BG_UNIFORM) & (np.hypot(*bg_lab[:, 1:].T) <= BG_MAX_CHROMA)
    labels, _ = _components(dist > OBJECT_DELTA_E, dist > BG_DELTA_E, np.broadcast_to(split, (n,)))
    blobs: list[list[dict]] = [[] for _ in range(n)]
    xs = np.arange(w) + 0.5
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        i = sl[0].start
        member = labels[i] == k
        if member.sum() * pixel_area < SPECK_AREA:
            continue
        pix, d = images[i][member], dist[i][member]
        inner = ndimage.binary_erosion(member)[member]  # the colour from pixels off the edge (anti-aliasing, halos)
        core = inner if inner.sum() >= 4 else d >= 0.6 * d.max()
        fg = np.median(pix[core], axis=0)
        v = fg - bg[i]
        # Coverage: where the pixel lies on the line from the background to the object colour (as rendered).
        alpha = np.zeros((h, w))
        alpha[member] = np.clip((pix - bg[i]) @ v / max(v @ v, 1e-6), 0.0, 1.0)
        area = alpha.sum() * pixel_area
        if area < SPECK_AREA:
            continue
        cx = float((alpha.sum(0) * xs).sum() / alpha.sum())
        blobs[i].append(
            {"alpha": alpha, "fg": fg, "core": lab[i][member][core], "cx": cx, "small": area < MIN_OBJECT_AREA}
        )
    for b in blobs:
        b.sort(key=lambda o: o["cx"])
    return blobs, bg_lab, border_ok


def judge(
    images: np.ndarray,
    expected_objects: int | Sequence[int] | np.ndarray | None = None,
    shapes: Sequence[str] = S.ALL_SHAPES,
    colours: Sequence[str] = S.ALL_COLOURS,
) -> dict[str, np.ndarray]:
    """Judge images [N, H, W, 3] (uint8, or float in [0, 1]) of the shapes world.

    `expected_objects`: the number asked for, per image or for all (None: 1 or 2 are fine). `shapes`/`colours`:
    the candidates (default: the training and the held-out vocabularies). Returns arrays:
      valid bool [N], reason str [N] (one of REASONS), num_objects int [N] (objects found),
      shape, colour, size, position int [N, 2]: ids into ALL_SHAPES, ALL_COLOURS, SIZES, POSITIONS per slot
      (slot 0: the single object or the left one, slot 1: the right one, as `scene_labels`), -1 where none,
      shape_distance float [N, 2] (RMS z-score to the named shape; large = atypical),
      smudges int [N] (blobs nearer the background colour than any palette colour, not counted as objects).
    """
    n, h, w = np.shape(images)[:3]
    expected = np.broadcast_to(np.asarray(-1 if expected_objects is None else expected_objects), (n,))
    blobs, bg_lab, border_ok = segment(images, split=expected != 1)
    palette_ids, palette_lab = _palette(colours)
    out = {
        "valid": np.zeros(n, bool),
        "reason": np.full(n, "ok", dtype=f"<U{max(map(len, REASONS))}"),
        "num_objects": np.zeros(n, np.int32),
        **{k: np.full((n, S.MAX_OBJECTS), -1, np.int32) for k in ("shape", "colour", "size", "position")},
        "shape_distance": np.full((n, S.MAX_OBJECTS), np.nan),
        "smudges": np.zeros(n, np.int32),
    }
    for i, objects in enumerate(blobs):
        # A blob with less than SMUDGE_CONTRAST of the weakest palette colour's contrast is a smudge: no object.
        weakest = np.linalg.norm(palette_lab - bg_lab[i], axis=-1).min()
        kept = [o for o in objects if np.linalg.norm(srgb_to_lab(o["fg"]) - bg_lab[i]) >= SMUDGE_CONTRAST * weakest]
        out["smudges"][i] = len(objects) - len(kept)
        fragments = any(o["small"] for o in kept)
        objects = [o for o in kept if not o["small"]]
        for obj in objects:
            obj["de"] = np.linalg.norm(palette_lab - srgb_to_lab(obj["fg"]), axis=-1)
        found = len(objects)
        out["num_objects"][i] = found
        reason = None
        if not border_ok[i]:
            reason = "background"
        elif found == 0:
            reason = "empty"
        elif found > (expected[i] if expected[i] > 0 else S.MAX_OBJECTS):
            reason = "too_many"
        elif expected[i] > 0 and found < expected[i]:
            reason = "too_few"
        elif fragments:
            reason = "fragments"
        unknown_shape = unknown_colour = mixed = False
        for slot, obj in enumerate(objects[: S.MAX_OBJECTS]):
            feats, geo = blob_features(obj["alpha"])
            shape, sdist = classify_shape(feats, shapes)
            de = obj["de"]
            nearest = np.argmin(np.linalg.norm(obj["core"][:, None] - palette_lab[None], axis=-1), axis=1)
            unknown_shape |= shape < 0
            unknown_colour |= bool(de.min() > COLOUR_MAX_DELTA_E)
            mixed |= 1.0 - np.bincount(nearest, minlength=len(palette_ids)).max() / len(nearest) > MIXED_FRACTION
            x = geo["cx"] / w
            pos = "left" if x < 0.375 else "right" if x > 0.625 else "center"
            if shape >= 0:
                extent = np.sqrt(geo["area"] / (h * w) / _fill_per_extent(S.ALL_SHAPES[shape]))
            else:
                extent = max(geo["width"], geo["height"]) / w
            # Size classes per slot kind: centred objects 0.66 / 0.42 of the side, left/right ones 0.42 / 0.30.
            cut = np.sqrt(0.66 * 0.42) if pos == "center" else np.sqrt(0.42 * 0.30)
            out["shape"][i, slot] = shape
            out["colour"][i, slot] = palette_ids[np.argmin(de)]
            out["size"][i, slot] = S.SIZES.index("large" if extent > cut else "small")
            out["position"][i, slot] = S.POSITIONS.index(pos)
            out["shape_distance"][i, slot] = sdist
        if reason is None:
            reason = (
                "unknown_shape"
                if unknown_shape
                else "mixed_colour"
                if mixed
                else "unknown_colour"
                if unknown_colour
                else None
            )
        out["reason"][i] = reason or "ok"
        out["valid"][i] = reason is None
    return out


# head name -> (verdict key, slot), the probe's heads (jaxdiff.metrics.probe.HEADS) without importing JAX.
HEADS = {
    "num_objects": ("num_objects", None),
    "shape0": ("shape", 0),
    "colour0": ("colour", 0),
    "size0": ("size", 0),
    "position0": ("position", 0),
    "shape1": ("shape", 1),
    "colour1": ("colour", 1),
    "size1": ("size", 1),
}


def heads(verdicts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-head predictions in the probe's form (num_objects as count - 1); -2 (never right) for invalid images."""
    valid = np.asarray(verdicts["valid"])
    out = {}
    for name, (key, slot) in HEADS.items():
        v = np.asarray(verdicts[key])
        v = v - 1 if slot is None else v[:, slot]
        out[name] = np.where(valid, v, -2).astype(np.int32)
    return out


def targets(labels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-head class ids from batched `scene_labels` arrays; -1 where a head does not apply (as the probe's)."""
    n = np.asarray(labels["num_objects"])
    out = {"num_objects": (n - 1).astype(np.int32)}
    for name, (key, slot) in HEADS.items():
        if slot is not None:
            ids = np.asarray(labels[key])[:, slot]
            out[name] = np.where(n == 1, ids, -1).astype(np.int32) if name == "position0" else ids.astype(np.int32)
    return out


def accuracy(verdicts: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Accuracy per head over the images where it applies (as `probe.accuracy`; an invalid image is wrong on
    every head), "all": every applicable head right, and "valid": the fraction of valid images."""
    pred, tgt = heads(verdicts), targets(labels)
    out, all_ok = {}, np.ones(len(tgt["num_objects"]), bool)
    for name, t in tgt.items():
        applies = t >= 0
        ok = pred[name] == t
        if applies.any():
            out[name] = float(ok[applies].mean())
        all_ok &= ok | ~applies
    out["all"] = float(all_ok.mean())
    out["valid"] = float(np.asarray(verdicts["valid"]).mean())
    return out


def render_split(n: int, split: str, held_out: bool = False, num_objects: int | None = None):
    """n renders of the shapes world for calibration ("train") or reporting ("test"), disjoint by seed.

    Returns (images uint8 [n, 32, 32, 3], batched labels, scenes); `held_out` draws from ALL_SHAPES/ALL_COLOURS.
    """
    rng = np.random.default_rng([{"train": 7001, "test": 7002}[split], int(held_out), num_objects or 0])
    kw = {"shapes": S.ALL_SHAPES, "colours": S.ALL_COLOURS} if held_out else {}
    scenes = [S.sample_scene(rng, num_objects=num_objects, **kw) for _ in range(n)]
    labels = [S.scene_labels(s) for s in scenes]
    batched = {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}
    return np.stack([S.render(s) for s in scenes]), batched, scenes


def calibrate(n: int = 3000) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Shape statistics (mean, std of FEATURES per shape) from n renders of the TRAIN split with every shape."""
    images, labels, _ = render_split(n, "train", held_out=True)
    blobs, _, _ = segment(images)
    blobs = [[o for o in b if not o["small"]] for b in blobs]
    feats: dict[str, list[np.ndarray]] = {s: [] for s in S.ALL_SHAPES}
    for i, objects in enumerate(blobs):
        if len(objects) == int(labels["num_objects"][i]):
            for slot, obj in enumerate(objects):
                feats[S.ALL_SHAPES[labels["shape"][i, slot]]].append(blob_features(obj["alpha"])[0])
    return {
        s: (tuple(np.round(np.mean(f, 0), 4).tolist()), tuple(np.round(np.std(f, 0), 4).tolist()))
        for s, f in feats.items()
    }
