"""How well an erasure worked on the `shapes` world, judged by the probe: erasure, preservation and attack success.

The erased concept is a shape or a colour named by any of its phrasings (`S.SYNONYMS`: "box" is the square).
Prompts come from the world's own templates with every other attribute drawn at random (deterministic in `seed`):

- "word": train templates naming the concept with the word the user erased;
- "synonyms": the same templates with the concept's other phrasings that do not contain the erased word (train and
  held-out ones, e.g. "disc", "round shape", "round disc" for a circle; none exist for most colours);
- "heldout": the held-out templates, with the erased word;
- "preserved": scenes of the other concepts of the same kind (other shapes / colours), never the erased one.

Erasure is the fraction of images in which the probe sees the concept (lower is better after the edit);
preservation is the probe's shape and colour accuracy on "preserved" prompts and the Fréchet distance on the
probe's features between edited and unedited images of the same prompts and seeds (next to the same distance
between two seed sets of the unedited model: what sampling noise alone gives).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxdiff.data import shapes as S
from jaxdiff.errors import UserError
from jaxdiff.metrics import frechet

SETS = ("word", "synonyms", "heldout", "preserved")
KINDS = {"shape": S.SHAPES, "colour": S.COLOURS}


@dataclasses.dataclass(frozen=True)
class Concept:
    """An erasable concept of the shapes world: the word the user gave, its canonical name and kind."""

    word: str
    name: str  # "square" for "box"
    kind: str  # "shape" | "colour"

    @property
    def others(self) -> tuple[str, ...]:
        return tuple(c for c in KINDS[self.kind] if c != self.name)

    @property
    def synonyms(self) -> tuple[str, ...]:
        """The concept's other phrasings that do not contain the erased word ("round disc" is not a synonym of disc)."""
        return tuple(p for p in S.SYNONYMS[self.name] if self.word not in p.split())


def resolve(word: str) -> Concept:
    """The shapes concept named by `word` (any phrasing); a UserError naming the vocabulary otherwise."""
    key = " ".join(word.lower().split())
    for kind, names in KINDS.items():
        for name in names:
            if key in S.SYNONYMS[name]:
                return Concept(key, name, kind)
    known = ", ".join(f"{n} ({'/'.join(S.SYNONYMS[n][1:]) or '-'})" for names in KINDS.values() for n in names)
    raise UserError(f"{word!r} is not a shape or colour of the shapes world; known: {known}")


def _fill(template: str, obj: S.ShapeObject, bg: str, phrase: dict[str, str]) -> str:
    fields = {
        "shape": phrase.get("shape", obj.shape),
        "colour": phrase.get("colour", obj.colour),
        "size": obj.size,
        "position": S.TRAIN_PHRASES[obj.position][0],
        "bg": bg,
    }
    return template.format(**fields)


def captions(
    concept: Concept | None,
    n: int,
    seed: int,
    *,
    phrases: Sequence[str] | None = None,
    split: str = "train",
    exclude: str | None = None,
    kind: str | None = None,
) -> tuple[list[str], list[S.Scene]]:
    """n single-object (caption, scene) pairs. With `concept`, the object has that shape/colour and the caption
    names it with `phrases` (cycled; default its word); without, the object avoids `exclude` of `kind`."""
    rng = np.random.default_rng([seed, 4242, n])
    templates = (S.TRAIN_TEMPLATES if split == "train" else S.HELDOUT_TEMPLATES)[1]
    phrases = list(phrases or ([concept.word] if concept else []))
    out, scenes = [], []
    for i in range(n):
        scene = S.sample_scene(rng, num_objects=1)
        (obj,) = scene.objects
        phrase = {}
        if concept is not None:
            obj = dataclasses.replace(obj, **{concept.kind: concept.name})
            phrase[concept.kind] = phrases[i % len(phrases)]
        elif exclude is not None:
            pool = [c for c in KINDS[kind] if c != exclude]
            obj = dataclasses.replace(obj, **{kind: pool[int(rng.integers(len(pool)))]})
        scene = dataclasses.replace(scene, objects=(obj,))
        template = str(rng.choice(templates))
        out.append(_fill(template, obj, scene.background, phrase))
        scenes.append(scene)
    return out, scenes


def prompt_sets(concept: Concept, n: int, seed: int = 0) -> dict[str, tuple[list[str], list[S.Scene]]]:
    """The four prompt sets of the module docstring ("synonyms" is empty when the concept has none)."""
    sets = {
        "word": captions(concept, n, seed),
        "synonyms": captions(concept, n, seed + 1, phrases=concept.synonyms) if concept.synonyms else ([], []),
        "heldout": captions(concept, n, seed + 2, split="heldout"),
        "preserved": captions(None, n, seed + 3, exclude=concept.name, kind=concept.kind),
    }
    return sets


def concept_rate(predictions: dict, concept: Concept) -> float:
    """Fraction of images in which the probe sees the concept (slot 0: the single object)."""
    ids = predictions[f"{concept.kind}0"]
    return float(np.mean(ids == KINDS[concept.kind].index(concept.name)))


def scene_accuracy(predictions: dict, scenes: Sequence[S.Scene]) -> dict[str, float]:
    """Shape and colour accuracy of single-object images against their scenes."""
    shape = np.asarray([S.SHAPES.index(s.objects[0].shape) for s in scenes])
    colour = np.asarray([S.COLOURS.index(s.objects[0].colour) for s in scenes])
    return {
        "shape_acc": float(np.mean(predictions["shape0"] == shape)),
        "colour_acc": float(np.mean(predictions["colour0"] == colour)),
    }


Generate = Callable[[list[str], np.ndarray], np.ndarray]  # (prompts, noise latents [N,h,w,C]) -> images [N,H,W,3]


def frechet_distance(features1, features2) -> float:
    """Fréchet distance on probe features as pytorch-fid computes it, with a small ridge when there are fewer
    images than feature dimensions (`frechet.frechet_distance_few`)."""
    return frechet.frechet_distance_few(*frechet.feature_statistics(features1), *frechet.feature_statistics(features2))


def noise(n: int, shape: Sequence[int], seed: int) -> np.ndarray:
    """Unit Gaussian starting latents [n, *shape], the same for the unedited and the edited model."""
    return np.random.default_rng([seed, 99]).standard_normal((n, *shape)).astype(np.float32)


def evaluate(
    probe,
    concept: Concept,
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    sets: dict,
    floor_images: np.ndarray | None = None,
) -> dict:
    """Figures from images of the unedited (`before`) and edited (`after`) model, keyed like `sets`."""
    out = {"resolved": concept.name, "word": concept.word, "kind": concept.kind, "erasure": {}, "preservation": {}}
    feats = {}
    for name, (prompts, scenes) in sets.items():
        if not prompts:
            out["erasure" if name != "preserved" else "preservation"][name] = None
            continue
        pb, fb = probe(before[name])
        pa, fa = probe(after[name])
        feats[name] = (fb, fa)
        if name == "preserved":
            acc_b, acc_a = scene_accuracy(pb, scenes), scene_accuracy(pa, scenes)
            for key in acc_b:
                out["preservation"][key] = {"before": acc_b[key], "after": acc_a[key]}
        else:
            out["erasure"][name] = {
                "before": concept_rate(pb, concept),
                "after": concept_rate(pa, concept),
                "n": len(prompts),
            }
    if "preserved" in feats:
        fb, fa = feats["preserved"]
        out["preservation"]["frechet"] = frechet_distance(fb, fa)
        if floor_images is not None:
            out["preservation"]["frechet_floor"] = frechet_distance(fb, probe(floor_images)[1])
        out["preservation"]["n"] = len(sets["preserved"][0])
    return out


def attack_success(probe, concept: Concept, images: np.ndarray) -> float:
    """Fraction of an attack's images in which the probe sees the erased concept."""
    return concept_rate(probe(images)[0], concept)
