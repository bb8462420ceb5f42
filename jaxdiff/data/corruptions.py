"""Corrupted shapes images (half shapes, blends, noise, empty canvases, ...) that a judge must call invalid."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from jaxdiff.data import shapes as S

Image = np.ndarray  # uint8 [32, 32, 3]
SIZE = 32


def render_objects(*objects: S.ShapeObject, background: str = "white") -> Image:
    """A render of any number of objects (the renderer draws them in order) on a plain background."""
    return S.render(S.Scene(tuple(objects), background))


def _composite(background, layers: list[tuple[np.ndarray, tuple]]) -> Image:
    """Draws (coverage [H, W], RGB) layers over a background colour (name or RGB) as the renderer does."""
    bg = S.RGB[background] if isinstance(background, str) else background
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[...] = bg
    for a, rgb in layers:
        a = a[..., None]
        img = img * (1 - a) + np.asarray(rgb, np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _object(rng, position=None, size=None, shapes=S.SHAPES, colours=S.COLOURS, **kw) -> S.ShapeObject:
    return S.ShapeObject(
        str(rng.choice(shapes)),
        str(rng.choice(colours)),
        size or str(rng.choice(S.SIZES)),
        position or str(rng.choice(S.POSITIONS)),
        **{"dx": float(rng.uniform(-0.03, 0.03)), "dy": float(rng.uniform(-0.03, 0.03)), **kw},
    )


def _centre_px(obj: S.ShapeObject) -> tuple[float, float]:
    cx, cy, _ = S.object_box(obj)
    return cx * SIZE, cy * SIZE


def _half_plane(obj: S.ShapeObject, rng, width: float = 0.0) -> np.ndarray:
    """A mask [H, W] in 0/1 that keeps one side of a line through the object's centre (and, with `width`,
    removes a stripe that wide around it); the line is vertical, horizontal or diagonal."""
    cx, cy = _centre_px(obj)
    ys, xs = np.indices((SIZE, SIZE)) + 0.5
    # The top part of a triangle cut across is a smaller triangle (a valid image): triangles are cut otherwise.
    angles = [0.0, 45.0, 135.0] if obj.shape == "triangle" and not width else [0.0, 90.0, 45.0, 135.0]
    angle = float(rng.choice(angles)) + float(rng.uniform(-8, 8))
    t = np.deg2rad(angle)
    d = (xs - cx) * np.cos(t) + (ys - cy) * np.sin(t) + float(rng.uniform(-1.5, 1.5))
    if width:
        return (np.abs(d) > width / 2).astype(np.float32)
    return (d > 0 if rng.random() < 0.5 else d < 0).astype(np.float32)


def empty(rng) -> tuple[Image, int]:
    """A plain canvas, sometimes with faint noise: no object."""
    img = np.full((SIZE, SIZE, 3), S.RGB[str(rng.choice(S.BACKGROUNDS))], np.float32)
    if rng.random() < 0.5:
        img += rng.normal(0, rng.uniform(1, 8), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), 1


def noise(rng) -> tuple[Image, int]:
    """A whole image of noise: uniform, Gaussian around a background, or smooth (blocky) colour noise."""
    kind = rng.integers(3)
    if kind == 0:
        return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), 1
    if kind == 1:
        bg = np.asarray(S.RGB[str(rng.choice(S.BACKGROUNDS))], np.float32)
        img = bg + rng.normal(0, rng.uniform(30, 90), (SIZE, SIZE, 3))
    else:
        cells = int(rng.choice([2, 4, 8]))
        img = np.kron(rng.uniform(0, 255, (cells, cells, 3)), np.ones((SIZE // cells, SIZE // cells, 1)))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), 1


def noise_blob(rng) -> tuple[Image, int]:
    """A real render (or an empty canvas) with a square patch of uniform noise pasted somewhere."""
    n = int(rng.choice([1, 2]))
    if rng.random() < 0.7:
        img = S.render(S.sample_scene(rng, num_objects=n))
    else:
        img = np.full((SIZE, SIZE, 3), S.RGB[str(rng.choice(S.BACKGROUNDS))], np.uint8)
    h, w = rng.integers(6, 15, 2)
    y, x = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
    img[y : y + h, x : x + w] = rng.integers(0, 256, (h, w, 3))
    return img, n


def half_shape(rng) -> tuple[Image, int]:
    """One object of which only one side of a line through its centre is drawn."""
    obj = _object(rng)
    bg = str(rng.choice(S.BACKGROUNDS))
    return _composite(bg, [(S.coverage(obj) * _half_plane(obj, rng), S.RGB[obj.colour])]), 1


def cut(rng) -> tuple[Image, int]:
    """A large object cut in two by a background-coloured stripe 2-5 pixels wide through its centre."""
    obj = _object(rng, size="large")
    bg = str(rng.choice(S.BACKGROUNDS))
    mask = _half_plane(obj, rng, width=float(rng.uniform(2, 5)))
    return _composite(bg, [(S.coverage(obj) * mask, S.RGB[obj.colour])]), 1


def debris(rng) -> tuple[Image, int]:
    """A real render with 2-5 specks (1-2 pixels square) of object colours away from the objects."""
    scene = S.sample_scene(rng)
    img = S.render(scene)
    covered = np.max([S.coverage(o) for o in scene.objects], axis=0) > 0
    free = np.argwhere(~ndimage.binary_dilation(covered, iterations=3)[:-1, :-1])  # 2+ pixels from every object
    for _ in range(int(rng.integers(2, 6))):
        y, x = free[rng.integers(len(free))]
        s = int(rng.integers(1, 3))
        colour = scene.objects[0].colour if rng.random() < 0.5 else str(rng.choice(S.COLOURS))
        img[y : y + s, x : x + s] = S.RGB[colour]
    return img, len(scene.objects)


def three_objects(rng) -> tuple[Image, int]:
    """Three or four small objects, one per quadrant, as if one or two had been asked for."""
    quadrants = [(p, dy) for p in ("left", "right") for dy in (-0.25, 0.25)]
    k = int(rng.choice([3, 4]))
    picks = rng.permutation(4)[:k]
    objects = [_object(rng, position=quadrants[i][0], size="small", dy=quadrants[i][1]) for i in picks]
    return render_objects(*objects, background=str(rng.choice(S.BACKGROUNDS))), int(rng.choice([1, 2]))


def blend(rng) -> tuple[Image, int]:
    """Two different real renders mixed 30-70 %: ghost objects, muddy colours."""
    a = S.sample_scene(rng)
    b = S.sample_scene(rng)
    while b.objects == a.objects:
        b = S.sample_scene(rng)
    t = rng.uniform(0.3, 0.7)
    img = t * S.render(a).astype(np.float32) + (1 - t) * S.render(b).astype(np.float32)
    return np.rint(img).astype(np.uint8), len(a.objects)


def mixed_colour(rng) -> tuple[Image, int]:
    """An object (of one or two) in two palette colours, split along a line through its centre."""
    scene = S.sample_scene(rng)
    i = int(rng.integers(len(scene.objects)))
    layers = []
    for j, obj in enumerate(scene.objects):
        a = S.coverage(obj)
        if j != i:
            layers.append((a, S.RGB[obj.colour]))
            continue
        other = str(rng.choice([c for c in S.COLOURS if c != obj.colour]))
        mask = _half_plane(obj, rng)
        layers += [(a * mask, S.RGB[obj.colour]), (a * (1 - mask), S.RGB[other])]
    return _composite(scene.background, layers), len(scene.objects)


def off_palette_colour(rng, background: str, min_delta_e: float = 35.0) -> tuple[int, int, int]:
    """A random RGB colour at least `min_delta_e` (CIE76) from every palette colour (held-out ones too) and
    from the background: browns, olives, pinks, teals, ..."""
    from jaxdiff.metrics.pixel_judge import srgb_to_lab

    palette = srgb_to_lab(np.array([S.RGB[c] for c in S.ALL_COLOURS], np.float64))
    bg = srgb_to_lab(np.array(S.RGB[background], np.float64))
    while True:
        rgb = rng.integers(0, 256, 3)
        lab = srgb_to_lab(rgb.astype(np.float64))
        if np.linalg.norm(palette - lab, axis=-1).min() >= min_delta_e and np.linalg.norm(bg - lab) >= 40:
            return tuple(int(v) for v in rgb)


def unknown_colour(rng) -> tuple[Image, int]:
    """A real scene with one object drawn in a colour far from every palette colour."""
    scene = S.sample_scene(rng)
    i = int(rng.integers(len(scene.objects)))
    odd = off_palette_colour(rng, scene.background)
    layers = [(S.coverage(o), odd if j == i else S.RGB[o.colour]) for j, o in enumerate(scene.objects)]
    return _composite(scene.background, layers), len(scene.objects)


def background(rng) -> tuple[Image, int]:
    """Real objects on a background that is not plain and neutral: a coloured frame, a tint, a gradient."""
    scene = S.sample_scene(rng)
    layers = [(S.coverage(o), S.RGB[o.colour]) for o in scene.objects]
    kind = rng.integers(3)
    if kind == 0:
        img = _composite(scene.background, layers)
        w = int(rng.integers(1, 4))
        frame = S.RGB[str(rng.choice(S.COLOURS))]
        img[:w], img[-w:], img[:, :w], img[:, -w:] = (frame,) * 4
        return img, len(scene.objects)
    if kind == 1:
        tint = np.asarray(S.RGB[scene.background], np.float32)
        tint = np.clip(tint + rng.choice([-1, 1], 3) * rng.uniform(40, 110, 3), 0, 255)
        return _composite(tuple(tint), layers), len(scene.objects)
    lo, hi = np.asarray(S.RGB["black"], np.float32), np.asarray(S.RGB[str(rng.choice(S.COLOURS))], np.float32)
    t = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]
    ramp = lo + (hi - lo) * (t if rng.random() < 0.5 else t.transpose(1, 0, 2))
    img = np.broadcast_to(ramp, (SIZE, SIZE, 3)).astype(np.float32)
    for a, rgb in layers:
        img = img * (1 - a[..., None]) + np.asarray(rgb, np.float32) * a[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), len(scene.objects)


# family -> generator(rng) -> (uint8 image [32, 32, 3], objects a prompt would have asked for)
FAMILIES: dict[str, Callable] = {
    "empty": empty,
    "noise": noise,
    "noise_blob": noise_blob,
    "half_shape": half_shape,
    "cut": cut,
    "debris": debris,
    "three_objects": three_objects,
    "blend": blend,
    "mixed_colour": mixed_colour,
    "unknown_colour": unknown_colour,
    "background": background,
}


def sample(family: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n corrupted images of one family, deterministic in (family, seed): (uint8 [n, 32, 32, 3], asked [n])."""
    rng = np.random.default_rng([seed, list(FAMILIES).index(family), 90210])
    out = [FAMILIES[family](rng) for _ in range(n)]
    return np.stack([im for im, _ in out]), np.array([k for _, k in out], np.int32)


def real(n: int, seed: int, num_objects: int | None = None, **kw) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n real renders (valid), deterministic in seed: (uint8 [n, 32, 32, 3], batched `scene_labels`)."""
    rng = np.random.default_rng([seed, num_objects or 0, 4242])
    scenes = [S.sample_scene(rng, num_objects=num_objects, **kw) for _ in range(n)]
    labels = [S.scene_labels(s) for s in scenes]
    return np.stack([S.render(s) for s in scenes]), {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}


def fixed_cases() -> dict[str, tuple[Image, int, str | None]]:
    """One hand-made example per kind of defect: name -> (image, objects asked for, the pixel judge's reason)."""
    red_square = S.ShapeObject("square", "red", "large", "center")
    blue_circle = S.ShapeObject("circle", "blue", "large", "center")
    rng = np.random.default_rng(0)
    cases = {}
    cases["empty canvas"] = (render_objects(background="grey"), 1, "empty")
    cases["uniform noise"] = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 1, "background")
    noisy = render_objects(background="white")
    noisy[10:22, 10:22] = rng.integers(0, 256, (12, 12, 3))
    cases["noise blob"] = (noisy, 1, None)  # invalid, whichever reason comes first
    half = render_objects(blue_circle)
    half[:, 16:] = S.RGB["white"]
    cases["left half of a circle"] = (half, 1, "unknown_shape")
    half = render_objects(red_square, background="black")
    half[16:] = S.RGB["black"]
    cases["top half of a square"] = (half, 1, "unknown_shape")
    half = render_objects(S.ShapeObject("triangle", "green", "large", "center"), background="grey")
    half[:, :16] = S.RGB["grey"]
    cases["right half of a triangle"] = (half, 1, "unknown_shape")
    cut_square = render_objects(red_square)
    cut_square[:, 14:18] = S.RGB["white"]
    cases["square cut in two"] = (cut_square, 1, "too_many")
    specks = render_objects(blue_circle)
    for y, x in ((2, 3), (27, 28), (3, 26)):
        specks[y : y + 2, x : x + 2] = S.RGB["blue"]
    cases["circle and debris"] = (specks, 1, "fragments")
    small = [S.ShapeObject(s, c, "small", p) for s, c, p in zip(S.SHAPES, S.COLOURS, S.POSITIONS)]
    corners = [
        S.ShapeObject("circle", c, "small", p, dy=dy) for c, p, dy in zip(S.COLOURS, S.POSITIONS[1:], (-0.3, 0.3))
    ]
    three = np.max([render_objects(o, background="black") for o in (*corners, small[2])], axis=0)
    cases["three objects when one is asked"] = (three, 1, "too_many")
    cases["two objects when one is asked"] = (render_objects(small[1], small[2]), 1, "too_many")
    cases["one object when two are asked"] = (render_objects(small[1]), 2, "too_few")
    mixed = render_objects(red_square)
    mixed[:, 16:] = render_objects(S.ShapeObject("square", "blue", "large", "center"))[:, 16:]
    cases["a square half red, half blue"] = (mixed, 1, "mixed_colour")
    brown = render_objects(S.ShapeObject("circle", "red", "large", "center"), background="white")
    brown[(brown == S.RGB["red"]).all(-1)] = (120, 80, 40)
    cases["a brown circle"] = (brown, 1, "unknown_colour")
    framed = render_objects(blue_circle)
    framed[:2], framed[-2:], framed[:, :2], framed[:, -2:] = (S.RGB["green"],) * 4
    cases["a frame"] = (framed, 1, "background")
    return cases
