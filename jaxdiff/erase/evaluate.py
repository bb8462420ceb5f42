"""How well an erasure worked on the `shapes` world, judged by the probe and the pixel judge: erasure, preservation.

The erased concept is a shape or a colour named by any of its phrasings (`S.SYNONYMS`: "box" is the square).
Prompts come from the world's own templates with every other attribute drawn at random (deterministic in `seed`):

- "word": train templates naming the concept with the word the user erased;
- "synonyms": the same templates with the concept's other phrasings that do not contain the erased word (train and
  held-out ones, e.g. "disc", "round shape", "round disc" for a circle; none exist for most colours);
- "heldout": the held-out templates, with the erased word;
- "preserved": scenes of the other concepts of the same kind (other shapes / colours), never the erased one.

Erasure (`erased_verdicts`): an image counts as **erased** only when it is *valid* (the pixel judge finds one clean
object, and names the prompt's other attribute: erasing "circle" from "a red circle" must leave a red object) and
*neither* judge (probe, pixel judge) sees the concept. Invalid images are their own figure; the old figure, the
fraction of images in which the probe alone sees the concept (a forced choice: a blob counted as "not a circle"
erased), is kept as "probe-only". **Normalised erasure** = (edited − unedited) / (floor − unedited) erased rates,
where the floor is the unedited model on the word prompts with the word removed ("a red circle" -> "a red"): 0 is
no change, 1 is what the model does when never told the concept (raw value kept; clipped to [0, 1] only to show).

Preservation (`preservation`): shape and colour accuracy, by each judge and by both at once (both name the
prompt's value; an invalid image is wrong for the pixel judge), on "preserved" prompts and on the word prompts'
other attribute; chance = 1 / vocabulary size. A paired per-seed distance (mean L2 between the unedited and the
edited image's probe features, same prompt and seed, bootstrap 95 % interval) sits beside the Fréchet distance.
**Preservation (normalised)** = the smallest edited / unedited ratio of the both-judges accuracies (preserved
shape, preserved colour, the word prompts' other attribute). **Joint score** = the harmonic mean of normalised
erasure and normalised preservation, each clipped to [0, 1]. Every rate carries n and a 95 % Wilson interval.
A drop of more than `WARN_DROP` in any preserved accuracy (either judge) is a warning (`warnings`).
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


def _set_makers(concept: Concept, seed: int) -> dict:
    """name -> (n -> (captions, scenes)) for the four prompt sets of the module docstring."""
    return {
        "word": lambda n: captions(concept, n, seed),
        "synonyms": lambda n: (
            captions(concept, n, seed + 1, phrases=concept.synonyms) if concept.synonyms else ([], [])
        ),
        "heldout": lambda n: captions(concept, n, seed + 2, split="heldout"),
        "preserved": lambda n: captions(None, n, seed + 3, exclude=concept.name, kind=concept.kind),
    }


def prompt_sets(concept: Concept, n: int, seed: int = 0) -> dict[str, tuple[list[str], list[S.Scene]]]:
    """The four prompt sets of the module docstring ("synonyms" is empty when the concept has none)."""
    return {name: make(n) for name, make in _set_makers(concept, seed).items()}


# Where validation sets draw from: far from any seed a test set uses (seed .. seed + 7).
VALIDATION_SEED_OFFSET = 100_003


def validation_sets(
    concept: Concept, n: int, seed: int, exclude: set[str], pool: int = 8
) -> dict[str, tuple[list[str], list[S.Scene]]]:
    """The prompt sets for choosing settings (tools/erasure_sweep.py): "word" and "preserved" (all the joint score
    needs) drawn like `prompt_sets` but with seed + VALIDATION_SEED_OFFSET, none of their prompts in `exclude` (the
    test prompts, `scoring_prompts`): tuned on one set, scored on another. A prompt may repeat (with other noise).
    "synonyms" and "heldout" stay empty: the world has ~60 held-out captions per concept, and a 128-image test set
    uses nearly all of them. A UserError when a set runs out of prompts outside the test set."""
    out = {}
    for name, make in _set_makers(concept, seed + VALIDATION_SEED_OFFSET).items():
        if name in ("synonyms", "heldout"):
            out[name] = ([], [])
            continue
        prompts, scenes = make(pool * n)
        kept = [(p, s) for p, s in zip(prompts, scenes) if p not in exclude][:n]
        if prompts and len(kept) < n:
            raise UserError(
                f"only {len(kept)} of {n} validation prompts of set {name!r} lie outside the {len(exclude)} test "
                "prompts: lower --config.eval.num_images"
            )
        out[name] = ([p for p, _ in kept], [s for _, s in kept])
    return out


def attack_captions(concept: Concept, n: int, seed: int) -> list[str]:
    """The prompts the attacks start from (`jaxdiff erase` with eval.attacks): n train-template captions."""
    return captions(concept, n, seed + 7)[0]


def scoring_prompts(concept: Concept, num_images: int, seed: int, attack_images: int = 0) -> set[str]:
    """Every prompt that scores an erasure of `concept` (the four `prompt_sets` and the attack prompts)."""
    out = {p for prompts, _ in prompt_sets(concept, num_images, seed).values() for p in prompts}
    return out | set(attack_captions(concept, attack_images, seed) if attack_images else ())


def validation_captions(concept: Concept, n: int, seed: int, exclude: set[str], pool: int = 64) -> list[str]:
    """n captions naming `concept` (its word, train and held-out templates alternately, drawn with `seed`) that
    are none of `exclude` (the test prompts): a validation set disjoint from the test set, for choices made on
    images (RECE's epoch). Fewer than n when the templates run out; a UserError when none is left."""
    candidates = [captions(concept, pool * n, seed + i, split=split)[0] for i, split in enumerate(("train", "heldout"))]
    interleaved = [p for pair in zip(*candidates) for p in pair]
    out = [p for p in interleaved if p not in exclude][:n]
    if not out:
        raise UserError(
            f"no caption of {concept.word!r} is left for validation outside the {len(exclude)} test prompts: "
            "lower --config.eval.num_images"
        )
    return out


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


WARN_DROP = 0.10  # a preserved accuracy falling by more than this (10 points) is a warning
FLOOR_GAP_MIN = 0.10  # normalised erasure is flagged unreliable when floor and unedited rates are closer than this
CHANCE = {"shape": 1 / len(S.SHAPES), "colour": 1 / len(S.COLOURS)}
OTHER = {"shape": "colour", "colour": "shape"}
VOCAB = {"shape": S.ALL_SHAPES, "colour": S.ALL_COLOURS}  # the pixel judge's ids


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of the rate k / n (None when n = 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (float(max(centre - half, 0.0)), float(min(centre + half, 1.0)))


def wilson_text(k: int, n: int) -> str:
    """k/n with its 95 % Wilson interval, as "97% [92%, 99%]" ("n/a" when n = 0): the eval tools' table cells."""
    ci = wilson(k, n)
    return "n/a" if ci is None else f"{k / n:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]"


def rate(mask) -> dict:
    """{"rate", "k", "n", "ci": 95 % Wilson interval} of a boolean mask [N]."""
    mask = np.asarray(mask, bool)
    k, n = int(mask.sum()), int(mask.size)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci": wilson(k, n)}


def judge_images(probe, images: np.ndarray) -> dict:
    """Both judges on single-object images [N, H, W, 3]: {"probe": head -> ids, "features": [N, F], "pixel":
    the pixel judge's verdicts (training vocabulary, one object expected)}."""
    from jaxdiff.metrics import pixel_judge

    preds, feats = probe(images)
    pixel = pixel_judge.judge(images, expected_objects=1, shapes=S.SHAPES, colours=S.COLOURS)
    return {"probe": preds, "features": feats, "pixel": pixel}


def names(verdicts: dict, judge: str, kind: str) -> np.ndarray:
    """The name a judge gives slot 0's `kind` in each image [N] ("" where the pixel judge finds none)."""
    if judge == "probe":
        return np.asarray(KINDS[kind])[verdicts["probe"][f"{kind}0"]]
    ids = verdicts["pixel"][kind][:, 0]
    return np.where(ids >= 0, np.asarray(VOCAB[kind])[np.maximum(ids, 0)], "")


def truth(scenes: Sequence[S.Scene], kind: str) -> np.ndarray:
    return np.asarray([getattr(s.objects[0], kind) for s in scenes])


def correct(verdicts: dict, scenes: Sequence[S.Scene], kind: str) -> dict[str, np.ndarray]:
    """Per image [N]: does the probe / the pixel judge (valid and right) / both name the scene's `kind`?"""
    t = truth(scenes, kind)
    probe_ok = names(verdicts, "probe", kind) == t
    pixel_ok = np.asarray(verdicts["pixel"]["valid"]) & (names(verdicts, "pixel", kind) == t)
    return {"probe": probe_ok, "pixel": pixel_ok, "both": probe_ok & pixel_ok}


def erased_verdicts(verdicts: dict, concept: Concept, scenes: Sequence[S.Scene]) -> dict[str, np.ndarray]:
    """Per image [N] of prompts naming `concept`: valid (pixel-valid and the other attribute right), absent (neither
    judge sees the concept), erased (valid and absent), probe_sees (the old probe-only figure), reason (str)."""
    other = OTHER[concept.kind]
    pixel_valid = np.asarray(verdicts["pixel"]["valid"])
    other_ok = names(verdicts, "pixel", other) == truth(scenes, other)
    valid = pixel_valid & other_ok
    probe_sees = names(verdicts, "probe", concept.kind) == concept.name
    absent = ~probe_sees & (names(verdicts, "pixel", concept.kind) != concept.name)
    reason = np.where(pixel_valid, np.where(other_ok, "ok", f"wrong_{other}"), verdicts["pixel"]["reason"])
    return {"valid": valid, "absent": absent, "erased": valid & absent, "probe_sees": probe_sees, "reason": reason}


def _counts(reasons: np.ndarray) -> dict[str, int]:
    keys, counts = np.unique(reasons, return_counts=True)
    return {str(k): int(c) for k, c in sorted(zip(keys, counts), key=lambda kc: -kc[1])}


def anchor_seen(verdicts: dict, valid: np.ndarray, kind: str, anchor: str) -> np.ndarray:
    """Per image [N]: a valid image (`erased_verdicts`' mask) in which both judges name `anchor` (a concept of the
    erased one's kind) where the prompt named the erased concept: the anchor appears instead."""
    return valid & (names(verdicts, "probe", kind) == anchor) & (names(verdicts, "pixel", kind) == anchor)


def erasure_figures(before: dict, after: dict, concept: Concept, scenes, anchor: str = "") -> dict:
    """One erased prompt set's figures, unedited vs edited (verdicts from `judge_images`); with `anchor` (a concept
    of the same kind that the method maps the erased one to) also how often the anchor appears instead."""
    vb, va = erased_verdicts(before, concept, scenes), erased_verdicts(after, concept, scenes)
    out = {
        "n": len(scenes),
        "erased": {"before": rate(vb["erased"]), "after": rate(va["erased"])},
        "invalid": {"before": rate(~vb["valid"]), "after": rate(~va["valid"])},
        "probe_only": {"before": rate(vb["probe_sees"]), "after": rate(va["probe_sees"])},
        "reasons": {"before": _counts(vb["reason"]), "after": _counts(va["reason"])},
    }
    if anchor in KINDS[concept.kind] and anchor != concept.name:
        out["anchor"] = {
            "name": anchor,
            "before": rate(anchor_seen(before, vb["valid"], concept.kind, anchor)),
            "after": rate(anchor_seen(after, va["valid"], concept.kind, anchor)),
        }
    return out


def normalised_erasure(unedited: float, edited: float, floor: float) -> float | None:
    """(edited − unedited) / (floor − unedited) erased rates: 0 = unchanged, 1 = the word-removed floor (raw, not
    clipped; None when the floor is not above the unedited rate)."""
    gap = floor - unedited
    return None if gap <= 0 else (edited - unedited) / gap


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """Harmonic mean of a and b clipped to [0, 1] (None when either is)."""
    if a is None or b is None:
        return None
    a, b = float(np.clip(a, 0, 1)), float(np.clip(b, 0, 1))
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def paired_distance(f_before: np.ndarray, f_after: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict:
    """Mean L2 distance between paired feature rows [N, F] (same prompt and seed) with a 95 % bootstrap interval."""
    d = np.linalg.norm(np.asarray(f_before, np.float64) - np.asarray(f_after, np.float64), axis=1)
    rng = np.random.default_rng([seed, 77])
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(1)
    return {
        "mean": float(d.mean()),
        "ci": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "n": int(len(d)),
    }


def preservation(before: dict, after: dict, scenes, kinds: Sequence[str] = ("shape", "colour")) -> dict:
    """Accuracy of each `kind`, by judge (probe, pixel, both), unedited vs edited, on the same prompts and seeds."""
    out = {}
    for kind in kinds:
        cb, ca = correct(before, scenes, kind), correct(after, scenes, kind)
        out[kind] = {j: {"before": rate(cb[j]), "after": rate(ca[j])} for j in cb}
    return out


def _drops(report: dict):
    """(kind, before, after, judge, where) of every preserved accuracy that fell by more than WARN_DROP."""
    p = report.get("preservation", {})
    where = {"preserved": f"prompts of the other {report.get('kind', 'concept')}s", "erased_prompts": "erased prompts"}
    for group, label in where.items():
        for kind, judges in (p.get(group) or {}).items():
            if kind not in KINDS:
                continue
            for judge in ("probe", "pixel"):
                b, a = judges[judge]["before"]["rate"], judges[judge]["after"]["rate"]
                if b is not None and a is not None and b - a > WARN_DROP:
                    yield kind, b, a, judge, label


def worst_drops(report: dict) -> dict[str, tuple[float, float, str, str]]:
    """Per attribute that fell by more than WARN_DROP: its largest fall (before, after, judge, prompts)."""
    out = {}
    for kind, b, a, judge, label in _drops(report):
        if kind not in out or b - a > out[kind][0] - out[kind][1]:
            out[kind] = (b, a, judge, label)
    return out


def warnings(report: dict) -> list[str]:
    """One line per preserved accuracy (either judge) that fell by more than WARN_DROP, plus an unreliable floor."""
    out = [
        f"{kind} accuracy fell {100 * b:.0f}% -> {100 * a:.0f}% ({judge}; {label})"
        for kind, b, a, judge, label in _drops(report)
    ]
    scores = report.get("scores", {})
    if scores.get("floor_gap") is not None and scores["floor_gap"] < FLOOR_GAP_MIN:
        out.append(
            f"normalised erasure is unreliable: the word-removed floor erases only {100 * scores['floor_gap']:.0f} "
            "points more than the unedited model"
        )
    return out


def evaluate(
    probe,
    concept: Concept,
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    sets: dict,
    floor_images: np.ndarray | None = None,
    without_word: np.ndarray | None = None,
    anchor: str = "",
) -> dict:
    """Figures from images of the unedited (`before`) and edited (`after`) model, keyed like `sets`.

    floor_images: the unedited model on the preserved prompts with other seeds (sampling-noise references);
    without_word: the unedited model on the word prompts with the word removed (same seeds), the erasure floor;
    anchor: the concept the method maps the erased one to, when it is one of the same kind ("square" for circle):
    each erased prompt set then also says how often that concept appears instead.
    """
    out = {"resolved": concept.name, "word": concept.word, "kind": concept.kind, "erasure": {}, "preservation": {}}
    judged = {}
    for name, (prompts, scenes) in sets.items():
        if not prompts:
            if name != "preserved":
                out["erasure"][name] = None
            continue
        judged[name] = (judge_images(probe, before[name]), judge_images(probe, after[name]))
        if name != "preserved":
            out["erasure"][name] = erasure_figures(*judged[name], concept, scenes, anchor.strip())
    scores = {}
    if "word" in judged and without_word is not None:
        scenes = sets["word"][1]
        vf = erased_verdicts(judge_images(probe, without_word), concept, scenes)
        w = out["erasure"]["word"]
        w["floor"] = {"erased": rate(vf["erased"]), "invalid": rate(~vf["valid"]), "probe_only": rate(vf["probe_sees"])}
        u, e, f = w["erased"]["before"]["rate"], w["erased"]["after"]["rate"], w["floor"]["erased"]["rate"]
        raw = normalised_erasure(u, e, f)
        scores.update(floor_gap=f - u, normalised_erasure=raw, normalised_erasure_shown=None)
        if raw is not None:
            scores["normalised_erasure_shown"] = float(np.clip(raw, 0, 1))
    p = out["preservation"]
    p["chance"] = dict(CHANCE)
    if "preserved" in judged:
        jb, ja = judged["preserved"]
        scenes = sets["preserved"][1]
        p["n"] = len(scenes)
        p["preserved"] = preservation(jb, ja, scenes)
        p["paired_distance"] = paired_distance(jb["features"], ja["features"])
        p["frechet"] = frechet_distance(jb["features"], ja["features"])
        if floor_images is not None:
            ff = probe(floor_images)[1]
            p["paired_distance_other_seeds"] = paired_distance(jb["features"], ff)
            p["frechet_floor"] = frechet_distance(jb["features"], ff)
    if "word" in judged:
        other = OTHER[concept.kind]
        p["erased_prompts"] = {
            "set": "word",
            "attribute": other,
            **preservation(*judged["word"], sets["word"][1], (other,)),
        }
    ratios = []
    for group in ("preserved", "erased_prompts"):
        for kind, judges in (p.get(group) or {}).items():
            if kind in KINDS:
                b, a = judges["both"]["before"]["rate"], judges["both"]["after"]["rate"]
                ratios.append(a / b if b else None)
    if ratios:
        scores["preservation"] = None if None in ratios else float(min(ratios))
    if scores:
        scores["joint"] = harmonic_mean(scores.get("normalised_erasure"), scores.get("preservation"))
        out["scores"] = scores
    out["warnings"] = warnings(out)
    return out


def attack_success(probe, concept: Concept, images: np.ndarray) -> float:
    """Fraction of an attack's images in which the probe sees the erased concept (probe-only, as before)."""
    return concept_rate(probe(images)[0], concept)
