"""The procedural `shapes` world: vocabulary, anti-aliased numpy renderer, captions and a caption parser."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right")
BACKGROUNDS = ("white", "grey", "black")
MAX_OBJECTS = 2
# Concepts the shipped models never saw in training (targets of personalization and late-concept erasure). They
# extend the vocabularies at the end, so the ids above are unchanged; nothing draws or names them unless asked.
HELD_OUT_SHAPES = ("cross", "star", "hexagon")
HELD_OUT_COLOURS = ("purple", "orange")
ALL_SHAPES = SHAPES + HELD_OUT_SHAPES
ALL_COLOURS = COLOURS + HELD_OUT_COLOURS

# Saturated object colours; backgrounds are neutral (never an object colour).
RGB = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 85, 225),
    "yellow": (240, 205, 30),
    "purple": (150, 45, 190),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "grey": (165, 165, 165),
    "black": (22, 22, 22),
}
WHITE, BLACK = (255, 255, 255), (0, 0, 0)  # the condition images' object and background (render_mask)
# Object centre x (unit coordinates) per position; y is always the middle.
POSITION_X = {"center": 0.5, "left": 0.25, "right": 0.75}
# Extent (side / diameter / triangle base and height) as a fraction of the image side: a centred
# object owns the whole image, a left/right object owns its half.
# Triangles are drawn a little larger: at equal extent they cover half a square's area.
TRIANGLE_SCALE = 1.12
SHAPE_SCALE = {"triangle": TRIANGLE_SCALE, "star": 1.12}
# Star: five points, apex up, inner radius / outer radius (a regular pentagram's 0.382 is too thin at 32 px).
STAR_INNER = 0.5
EXTENT = {("center", "large"): 0.66, ("center", "small"): 0.42, ("side", "large"): 0.42, ("side", "small"): 0.30}

# Phrasings used in training captions (the word itself first) and phrasings reserved for held-out captions.
TRAIN_PHRASES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "three-sided shape"),
    "red": ("red", "crimson"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "small": ("small", "little"),
    "large": ("large", "big"),
    "center": ("in the center", "in the middle"),
    "left": ("on the left",),
    "right": ("on the right",),
}
HELDOUT_PHRASES: dict[str, tuple[str, ...]] = {
    "circle": ("round disc", "circle shape"),
    "square": ("square block", "square shape"),
    "triangle": ("triangle shape", "three-sided figure"),
    "center": ("at the center",),
    "left": ("on the left side", "to the left"),
    "right": ("on the right side", "to the right"),
}
# Phrasings of the held-out concepts, the word first; in no table above, so the tokenizer's vocabulary (built
# from those tables) and every existing caption stay as they were.
HELD_OUT_CONCEPT_PHRASES: dict[str, tuple[str, ...]] = {
    "cross": ("cross", "plus sign"),
    "star": ("star", "five-pointed star"),
    "hexagon": ("hexagon", "six-sided shape"),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
}
# concept -> every phrasing of it (train and held-out), the word itself first.
SYNONYMS: dict[str, tuple[str, ...]] = {
    k: v + tuple(p for p in HELDOUT_PHRASES.get(k, ()) if p not in v) for k, v in TRAIN_PHRASES.items()
}
# Probability of the plain word (vs. one of its other phrasings) when captioning.
_P_WORD = {**dict.fromkeys(SHAPES, 0.5), **dict.fromkeys(COLOURS, 0.85), "small": 0.7, "large": 0.7}

# Fields: {shape} {colour} {size} {position} {bg}; for two objects {shape1} ... {size2}, {left}, {right}, {bg}.
TRAIN_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "a {colour} {shape}",
        "a {size} {colour} {shape}",
        "a {colour} {shape} on a {bg} background",
        "a {size} {colour} {shape} on a {bg} background",
        "{colour} {shape}, {bg} background",
        "a {colour} {shape} {position}",
        "a picture of a {colour} {shape} {position}",
        "a {size} {colour} {shape} {position} on a {bg} background",
    ),
    2: (
        "a {colour1} {shape1} {left} and a {colour2} {shape2} {right}",
        "a {colour1} {shape1} and a {colour2} {shape2}",
        "a {colour2} {shape2} {right} and a {colour1} {shape1} {left}",
        "a {size1} {colour1} {shape1} {left} and a {size2} {colour2} {shape2} {right}",
        "a picture of a {colour1} {shape1} and a {colour2} {shape2} on a {bg} background",
    ),
}
HELDOUT_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "an image showing a {shape} that is {colour}",
        "{colour} colored {shape}",
        "one {colour} {shape}, nothing else",
        "a {shape} in {colour} against a {bg} backdrop",
        "there is a {size} {colour} {shape} {position}",
        "a {colour} {shape} placed {position}",
    ),
    2: (
        "an image showing a {shape1} that is {colour1} {left} and a {shape2} that is {colour2} {right}",
        "{colour1} colored {shape1} {left}, {colour2} colored {shape2} {right}",
        "on the left there is a {colour1} {shape1} and on the right a {colour2} {shape2}",
    ),
}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One filled object; `dx`/`dy` are small offsets in unit image coordinates."""

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scene:
    """A plain background and one object (any position) or two (left then right)."""

    objects: tuple[ShapeObject, ...]
    background: str


def object_box(obj: ShapeObject) -> tuple[float, float, float]:
    """(centre x, centre y, extent) in unit image coordinates; the object stays inside its slot."""
    slot = "center" if obj.position == "center" else "side"
    s = EXTENT[(slot, obj.size)] * SHAPE_SCALE.get(obj.shape, 1.0)
    lo, hi = {"center": (0.0, 1.0), "left": (0.0, 0.5), "right": (0.5, 1.0)}[obj.position]
    margin = s / 2 + 0.01
    cx = min(max(POSITION_X[obj.position] + obj.dx, lo + margin), hi - margin)
    cy = min(max(0.5 + obj.dy, margin), 1 - margin)
    return cx, cy, s


def coverage(obj: ShapeObject, size: int = 32, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the object, float32 [size, size] (supersampled box filter)."""
    return _box_filter(_inside(obj, size * supersample), size, supersample)


def _box_filter(mask: np.ndarray, size: int, supersample: int) -> np.ndarray:
    """Coverage per pixel [size, size] float32 of a supersampled bool mask: the mean of its supersample² samples."""
    return mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3), dtype=np.float32)


def _inside(obj: ShapeObject, n: int) -> np.ndarray:
    """The object on an n x n grid of sample points (pixel centres of the supersampled image), bool [n, n]."""
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    x, y = t[None, :], t[:, None]
    cx, cy, s = object_box(obj)
    h = s / 2
    if obj.shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif obj.shape == "square":
        mask = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif obj.shape == "triangle":  # apex up; base and height both equal the extent
        mask = (y <= cy + h) & (2 * np.abs(x - cx) <= y - (cy - h))
    elif obj.shape == "cross":  # a plus sign, arms one third of the extent wide
        ax, ay = np.abs(x - cx), np.abs(y - cy)
        mask = ((ax <= h) & (ay <= h / 3)) | ((ax <= h / 3) & (ay <= h))
    elif obj.shape == "hexagon":  # regular, flat top and bottom; corner to corner equals the extent
        ax, ay = np.abs(x - cx), np.abs(y - cy)
        mask = (ay <= h * np.sqrt(3) / 2) & (np.sqrt(3) * ax + ay <= np.sqrt(3) * h)
    elif obj.shape == "star":
        mask = _inside_polygon(x, y, _star_vertices(cx, cy, s))
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {ALL_SHAPES}")
    return np.broadcast_to(mask, (n, n))


def _star_vertices(cx: float, cy: float, s: float) -> np.ndarray:
    """The 10 corners [10, 2] of a five-pointed star, apex up, whose bounding box is `s` wide and centred."""
    outer = s / (2 * np.sin(np.deg2rad(72)))  # the two side points span the width
    angles = np.deg2rad(-90 + 36 * np.arange(10))  # image y points down: -90 degrees is up
    radii = np.where(np.arange(10) % 2 == 0, outer, outer * STAR_INNER)
    px, py = radii * np.cos(angles), radii * np.sin(angles)
    return np.stack([px + cx, py + cy - (py.max() + py.min()) / 2], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: the points of the grid x [1, W], y [H, 1] inside the polygon [V, 2]; bool [H, W]."""
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        inside ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
    return inside


def render(scene: Scene, size: int = 32, supersample: int = 4) -> np.ndarray:
    """Renders a scene to uint8 [size, size, 3] with anti-aliased edges; deterministic."""
    layers = [(coverage(obj, size, supersample), RGB[obj.colour]) for obj in scene.objects]
    return _composite(layers, RGB[scene.background], size)


def render_mask(scene: Scene, size: int = 32, supersample: int = 4) -> np.ndarray:
    """The scene's exact object mask, uint8 [size, size, 3]: white silhouettes on black, anti-aliased as `render`
    (a pixel's value is 255 x the object's coverage there); a ControlNet condition image."""
    layers = [(coverage(obj, size, supersample), WHITE) for obj in scene.objects]
    return _composite(layers, BLACK, size)


def render_edges(scene: Scene, size: int = 32, supersample: int = 4, width: float = 1.0) -> np.ndarray:
    """The scene's exact object outlines, uint8 [size, size, 3]: white bands `width` pixels wide just inside each
    object's boundary, on black, anti-aliased as `render`; a ControlNet condition image."""
    from scipy import ndimage

    n, steps = size * supersample, max(1, round(width * supersample))
    layers = []
    for obj in scene.objects:
        inside = _inside(obj, n)
        core = ndimage.binary_erosion(inside, structure=np.ones((3, 3), bool), iterations=steps, border_value=0)
        layers.append((_box_filter(inside & ~core, size, supersample), WHITE))
    return _composite(layers, BLACK, size)


def _composite(layers: Sequence[tuple[np.ndarray, tuple[int, ...]]], background, size: int) -> np.ndarray:
    """Each (coverage [size, size], RGB) layer painted in order over a plain background; uint8 [size, size, 3]."""
    img = np.empty((size, size, 3), np.float32)
    img[...] = background
    for coverage_, rgb in layers:
        a = coverage_[..., None]
        img = img * (1 - a) + np.asarray(rgb, np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample_scene(
    rng: np.random.Generator,
    num_objects: int | None = None,
    jitter: float = 0.03,
    p_center: float = 0.5,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
) -> Scene:
    """Draws a scene: 1 or 2 objects (random if None); single objects are centred with `p_center`.

    `shapes`/`colours` are the vocabularies drawn from: the defaults are the training world; pass e.g.
    `ALL_SHAPES` or `HELD_OUT_SHAPES` (and `ALL_COLOURS`, `HELD_OUT_COLOURS`) for the held-out concepts.
    """
    if num_objects is None:
        num_objects = int(rng.choice([1, 2], p=[0.6, 0.4]))
    if num_objects == 1:
        positions = ["center"] if rng.random() < p_center else [str(rng.choice(["left", "right"]))]
    elif num_objects == 2:
        positions = ["left", "right"]
    else:
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    objects = tuple(
        ShapeObject(
            shape=str(rng.choice(shapes)),
            colour=str(rng.choice(colours)),
            size=str(rng.choice(SIZES)),
            position=p,
            dx=float(rng.uniform(-jitter, jitter)),
            dy=float(rng.uniform(-jitter, jitter)),
        )
        for p in positions
    )
    return Scene(objects=objects, background=str(rng.choice(BACKGROUNDS)))


def scene_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Integer class ids for the probe: per-object arrays [MAX_OBJECTS] padded with -1, plus scalars.

    Held-out shapes and colours get the ids after the training ones (indices into ALL_SHAPES, ALL_COLOURS).
    """
    out = {}
    for key, vocab in (("shape", ALL_SHAPES), ("colour", ALL_COLOURS), ("size", SIZES), ("position", POSITIONS)):
        ids = [vocab.index(getattr(o, key)) for o in scene.objects]
        out[key] = np.asarray(ids + [-1] * (MAX_OBJECTS - len(ids)), np.int32)
    out["num_objects"] = np.asarray(len(scene.objects), np.int32)
    out["background"] = np.asarray(BACKGROUNDS.index(scene.background), np.int32)
    return out


def _phrase(concept: str, rng: np.random.Generator, split: str) -> str:
    """The plain word or, with the remaining probability, one of the split's other phrasings."""
    if concept in HELD_OUT_CONCEPT_PHRASES:  # the same phrasings in both splits
        word, *others = HELD_OUT_CONCEPT_PHRASES[concept]
        if not others or rng.random() < (0.5 if concept in HELD_OUT_SHAPES else 0.85):
            return word
        return str(rng.choice(others))
    table = TRAIN_PHRASES if split == "train" else HELDOUT_PHRASES
    word = TRAIN_PHRASES[concept][0]  # the plain form: "circle", "red", "on the left", ...
    others = [p for p in table.get(concept, ()) if p != word]
    if not others or rng.random() < _P_WORD.get(concept, 0.7):
        return word
    return str(rng.choice(others))


def caption(scene: Scene, rng: np.random.Generator, split: str = "train") -> str:
    """A caption from the train or the disjoint held-out templates and phrasings."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    templates = (TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES)[len(scene.objects)]
    fields = {"bg": scene.background, "left": _phrase("left", rng, split), "right": _phrase("right", rng, split)}
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        with_pos = [t for t in templates if "{position}" in t]
        if obj.position != "center" and rng.random() < 0.75:
            templates = with_pos
        fields.update(
            shape=_phrase(obj.shape, rng, split),
            colour=_phrase(obj.colour, rng, split),
            size=_phrase(obj.size, rng, split),
            position=_phrase(obj.position, rng, split),
        )
    else:
        for i, obj in enumerate(scene.objects, start=1):
            fields.update(
                {
                    f"shape{i}": _phrase(obj.shape, rng, split),
                    f"colour{i}": _phrase(obj.colour, rng, split),
                    f"size{i}": _phrase(obj.size, rng, split),
                }
            )
    return str(rng.choice(templates)).format(**fields)


def _find(text: str, concepts: Sequence[str], extra: dict[str, tuple[str, ...]] | None = None) -> list[tuple[int, str]]:
    """(offset, concept) of every phrasing of `concepts` in text, longest phrasings first, no overlaps."""
    phrases = [(p, c) for c in concepts for p in SYNONYMS.get(c, (c,)) + (extra or {}).get(c, ())]
    taken = np.zeros(len(text) + 1, bool)
    hits = []
    for p, c in sorted(phrases, key=lambda pc: -len(pc[0])):
        for m in re.finditer(r"(?<![\w-])" + re.escape(p) + r"(?![\w-])", text):
            if not taken[m.start() : m.end()].any():
                taken[m.start() : m.end()] = True
                hits.append((m.start(), c))
    return sorted(hits)


_POSITION_WORDS = {"left": ("left",), "right": ("right",), "center": ("center", "centre", "middle")}


def parse_prompt(text: str, held_out: bool = False) -> dict:
    """Recovers the intended scene from a prompt: {"objects": [{shape, colour, size, position}], "background"}.

    Unstated attributes are None. With two objects and no stated positions, the first named is on the
    left (the convention of the templates); objects come back left first, as in `Scene`. With `held_out`
    the held-out shapes and colours are recognised too.
    """
    shape_vocab, colour_vocab = (ALL_SHAPES, ALL_COLOURS) if held_out else (SHAPES, COLOURS)
    extra = HELD_OUT_CONCEPT_PHRASES if held_out else None
    text = " ".join(text.lower().split())
    bg = re.search(r"\b(" + "|".join(BACKGROUNDS) + r")\s+(?:background|backdrop)\b", text)
    background = bg.group(1) if bg else None
    if bg:
        text = text[: bg.start()] + text[bg.end() :]
    segments: list[str] = []
    for seg in re.split(r"\s+and\s+|,\s*|;\s*", text):
        if _find(seg, shape_vocab, extra) or not segments:
            segments.append(seg)
        else:
            segments[-1] += " " + seg
    objects = []
    for seg in segments:
        shapes = _find(seg, shape_vocab, extra)
        if not shapes and objects:
            continue
        first = lambda hits: hits[0][1] if hits else None  # noqa: E731
        objects.append(
            {
                "shape": first(shapes),
                "colour": first(_find(seg, colour_vocab, extra)),
                "size": first(_find(seg, SIZES)),
                "position": first(_find(seg, POSITIONS, _POSITION_WORDS)),
            }
        )
    if len(objects) == 2:
        a, b = objects
        if a["position"] is None:
            a["position"] = "right" if b["position"] == "left" else "left"
        if b["position"] is None:
            b["position"] = "right" if a["position"] == "left" else "left"
        objects.sort(key=lambda o: POSITIONS.index(o["position"]) if o["position"] in POSITIONS else 0)
    return {"objects": objects, "background": background}
