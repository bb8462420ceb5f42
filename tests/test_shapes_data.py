"""Tests of the shapes world: renderer, captions and parser, and the TFDS builder (no TensorFlow)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jaxdiff.data import shapes as S


def _scenes(n: int, seed: int = 0, **kwargs) -> list[S.Scene]:
    rng = np.random.default_rng(seed)
    return [S.sample_scene(rng, **kwargs) for _ in range(n)]


def test_render_is_deterministic_given_a_seed():
    a, b = _scenes(20, seed=3), _scenes(20, seed=3)
    assert a == b
    for sa, sb in zip(a, b):
        np.testing.assert_array_equal(S.render(sa), S.render(sb))
    assert any(not np.array_equal(S.render(x), S.render(y)) for x, y in zip(a, _scenes(20, seed=4)))
    img = S.render(a[0], size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_object_pixels_have_the_stated_colour_and_background_differs():
    assert not set(S.BACKGROUNDS) & set(S.COLOURS)
    assert {S.RGB[b] for b in S.BACKGROUNDS}.isdisjoint(S.RGB[c] for c in S.COLOURS)
    for scene in _scenes(60, num_objects=None):
        for size in (32, 64):
            img = S.render(scene, size)
            for obj in scene.objects:
                cx, cy, _ = S.object_box(obj)
                np.testing.assert_array_equal(img[int(cy * size), int(cx * size)], S.RGB[obj.colour])
            # Top-left and bottom-middle pixels are always background.
            np.testing.assert_array_equal(img[0, 0], S.RGB[scene.background])
            np.testing.assert_array_equal(img[-1, size // 2], S.RGB[scene.background])


@pytest.mark.parametrize("shape, fraction", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
@pytest.mark.parametrize("position, size", [("center", "large"), ("center", "small"), ("left", "large")])
def test_fill_fraction_of_bounding_box_matches_the_shape(shape, fraction, position, size):
    obj = S.ShapeObject(shape, "red", size, position)
    n = 64
    _, _, extent = S.object_box(obj)
    area = S.coverage(obj, n).sum() / (extent * n) ** 2
    assert area == pytest.approx(fraction, rel=0.03)
    # The same from the rendered pixels: per-pixel coverage recovered from the blended colour.
    img = S.render(S.Scene((obj,), "white"), n).astype(float)
    bg, fg = np.array(S.RGB["white"], float), np.array(S.RGB["red"], float)
    alpha = (img - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))
    assert alpha.sum() / (extent * n) ** 2 == pytest.approx(fraction, rel=0.03)


def test_large_single_objects_span_about_two_thirds_and_two_objects_stay_in_their_halves():
    big = S.coverage(S.ShapeObject("square", "red", "large", "center"), 32)
    cols = np.flatnonzero(big.max(axis=0) > 0.5)
    assert 0.6 <= len(cols) / 32 <= 0.72
    for scene in _scenes(40, num_objects=2):
        left, right = (S.coverage(o, 32) for o in scene.objects)
        assert left[:, 16:].sum() == 0 and right[:, :16].sum() == 0


def test_scene_labels_are_class_ids_padded_with_minus_one():
    scene = S.Scene((S.ShapeObject("triangle", "yellow", "small", "left"),), "black")
    labels = S.scene_labels(scene)
    assert labels["shape"].tolist() == [2, -1] and labels["colour"].tolist() == [3, -1]
    assert labels["size"].tolist() == [0, -1] and labels["position"].tolist() == [1, -1]
    assert int(labels["num_objects"]) == 1 and int(labels["background"]) == 2
    assert all(v.dtype == np.int32 for v in labels.values())


def test_train_and_heldout_templates_and_phrasings_are_disjoint():
    for n in (1, 2):
        assert not set(S.TRAIN_TEMPLATES[n]) & set(S.HELDOUT_TEMPLATES[n])
    for concept, held in S.HELDOUT_PHRASES.items():
        assert not set(held) & set(S.TRAIN_PHRASES[concept]), concept
        assert S.SYNONYMS[concept][0] == concept or concept in S.POSITIONS
    rng = np.random.default_rng(0)
    scenes = _scenes(400, seed=1)
    train = {S.caption(s, rng, "train") for s in scenes}
    heldout = {S.caption(s, rng, "heldout") for s in scenes}
    assert not train & heldout
    heldout_only = {p for c, ps in S.HELDOUT_PHRASES.items() for p in ps if c in S.SHAPES}
    assert not any(p in t for p in heldout_only for t in train)
    assert any(p in h for p in heldout_only for h in heldout)


def _truth(scene: S.Scene) -> list[tuple[str, str]]:
    return [(o.shape, o.colour) for o in scene.objects]


def _parsed(text: str) -> list[tuple[str, str]]:
    return [(o["shape"], o["colour"]) for o in S.parse_prompt(text)["objects"]]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_generated_caption_parses_back_to_its_scene(split):
    rng = np.random.default_rng(5)
    for scene in _scenes(500, seed=2):
        text = S.caption(scene, rng, split)
        parsed = S.parse_prompt(text)
        assert _parsed(text) == _truth(scene), text
        if len(scene.objects) == 2:
            assert [o["position"] for o in parsed["objects"]] == ["left", "right"], text
        if "background" in text or "backdrop" in text:
            assert parsed["background"] == scene.background, text


def test_every_template_and_phrasing_parses_back():
    phrasings = lambda c: S.SYNONYMS.get(c, (c,))  # noqa: E731
    for templates in (S.TRAIN_TEMPLATES, S.HELDOUT_TEMPLATES):
        for (s1, s2), (c1, c2) in itertools.product(
            itertools.permutations(S.SHAPES, 2), itertools.permutations(S.COLOURS, 2)
        ):
            for p1, p2 in zip(phrasings(s1), itertools.cycle(phrasings(s2))):
                common = {"bg": "grey", "left": "on the left", "right": "on the right"}
                one = dict(common, shape=p1, colour=c1, size="big", position="to the left")
                for t in templates[1]:
                    assert _parsed(t.format(**one)) == [(s1, c1)], t.format(**one)
                two = dict(common, shape1=p1, colour1=c1, size1="small", shape2=p2, colour2=c2, size2="large")
                for t in templates[2]:
                    assert _parsed(t.format(**two)) == [(s1, c1), (s2, c2)], t.format(**two)


def test_parse_prompt_reads_user_prompts():
    p = S.parse_prompt("A blue square on the left")
    assert p["objects"] == [{"shape": "square", "colour": "blue", "size": None, "position": "left"}]
    p = S.parse_prompt("a red disc")
    assert p["objects"][0]["shape"] == "circle" and p["objects"][0]["position"] is None
    p = S.parse_prompt("a green triangle on the right and a yellow box on the left, black background")
    assert _parsed("a green triangle on the right and a yellow box on the left") == [
        ("square", "yellow"),
        ("triangle", "green"),
    ]
    assert p["background"] == "black"


def test_tfds_builder_builds_and_reads_back_without_tensorflow(tmp_path, monkeypatch):
    from jaxdiff.data import shapes_tfds as T

    monkeypatch.setenv("JAXDIFF_DATA_DIR", str(tmp_path / "env"))
    assert T.default_data_dir() == str(tmp_path / "env")
    for size in (32, 64):
        cfg = T.ShapesConfig(name=f"tiny{size}", version="1.0.0", size=size, num_train=24, num_validation=6, num_test=6)
        source = T.load_shapes("train", data_dir=str(tmp_path), config=cfg)
        assert len(source) == 24
        assert len(T.load_shapes("test", data_dir=str(tmp_path), config=cfg)) == 6
        for ex in (source[i] for i in range(len(source))):
            assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
            for key in ("shape", "colour", "size", "position"):
                assert ex[key].shape == (2,) and ex[key].dtype == np.int32
            n = int(ex["num_objects"])
            assert n in (1, 2) and (ex["shape"][n:] == -1).all() and (ex["shape"][:n] >= 0).all()
            truth = [(S.SHAPES[s], S.COLOURS[c]) for s, c in zip(ex["shape"][:n], ex["colour"][:n])]
            assert _parsed(ex["caption"].decode()) == truth
            assert _parsed(ex["heldout_caption"].decode()) == truth
            bg = S.RGB[S.BACKGROUNDS[int(ex["background"])]]
            np.testing.assert_array_equal(ex["image"][0, 0], bg)
    # Examples are a function of (split, index) only: the same scene at both sizes.
    a, b = T.make_example("train", 7, 32), T.make_example("train", 7, 64)
    assert a["caption"] == b["caption"] and a["shape"].tolist() == b["shape"].tolist()
    with pytest.raises(ValueError, match="32 or 64"):
        T.load_shapes("train", data_dir=str(tmp_path), size=48)


def _fingerprint() -> str:
    """Hash of the vocabularies, phrasings, templates, fixed-seed renders, captions and labels (TFDS examples too)."""
    import hashlib
    import json

    from jaxdiff.data import shapes_tfds as T

    h = hashlib.sha256()
    tables = [S.SHAPES, S.COLOURS, S.SIZES, S.POSITIONS, S.BACKGROUNDS, S.TRAIN_PHRASES, S.HELDOUT_PHRASES]
    tables += [S.SYNONYMS, S.TRAIN_TEMPLATES, S.HELDOUT_TEMPLATES]
    h.update(json.dumps(tables, sort_keys=True).encode())
    rng = np.random.default_rng(1234)
    for i in range(40):
        scene = S.sample_scene(rng, num_objects=None if i % 3 else 2)
        h.update(S.render(scene, 32 if i % 2 else 64).tobytes())
        h.update((S.caption(scene, rng, "train") + "|" + S.caption(scene, rng, "heldout")).encode())
        for k, v in sorted(S.scene_labels(scene).items()):
            h.update(k.encode() + np.asarray(v).tobytes())
    for split in ("train", "test"):
        for i in (0, 1, 7, 123):
            ex = T.make_example(split, i, 32)
            for k in sorted(ex):
                v = ex[k]
                h.update(k.encode() + (v.encode() if isinstance(v, str) else np.asarray(v).tobytes()))
    return h.hexdigest()[:16]


def test_existing_renders_captions_labels_and_tokenizer_words_are_unchanged():
    # Both hashes were computed from the code before the held-out concepts were added: the shipped models, their
    # data sets and the tokenizer (built from `vocabulary_words`) depend on these staying bit-identical.
    import hashlib

    from jaxdiff.train.shapes.common import vocabulary_words

    assert _fingerprint() == "03321f7635222c01"
    assert hashlib.sha256(" ".join(vocabulary_words()).encode()).hexdigest()[:16] == "d86323e721f27aeb"
    assert not set(S.HELD_OUT_SHAPES + S.HELD_OUT_COLOURS) & set(vocabulary_words())


@pytest.mark.parametrize(
    "shape, fraction",
    [
        ("cross", 5 / 9),
        ("hexagon", 3 * math.sqrt(3) / 8),
        ("star", 5 * S.STAR_INNER * math.sin(math.radians(36)) / (4 * math.sin(math.radians(72)) ** 2)),
    ],
)
def test_held_out_shapes_fill_their_box_as_their_geometry_says(shape, fraction):
    for position, size in (("center", "large"), ("right", "small")):
        obj = S.ShapeObject(shape, "purple", size, position)
        _, _, extent = S.object_box(obj)
        cov = S.coverage(obj, 64)
        assert cov.sum() / (extent * 64) ** 2 == pytest.approx(fraction, rel=0.03)
        cols = np.flatnonzero(cov.max(axis=0) > 0.5)
        assert len(cols) / 64 == pytest.approx(extent, abs=2 / 64)  # the extent is the width


def test_held_out_concepts_are_opt_in_and_caption_parse_and_label_back():
    assert S.ALL_SHAPES[: len(S.SHAPES)] == S.SHAPES and S.ALL_COLOURS[: len(S.COLOURS)] == S.COLOURS
    default = _scenes(300, seed=9)
    assert {o.shape for s in default for o in s.objects} <= set(S.SHAPES)
    assert {o.colour for s in default for o in s.objects} <= set(S.COLOURS)
    rng = np.random.default_rng(3)
    scenes = [S.sample_scene(rng, shapes=S.HELD_OUT_SHAPES, colours=S.HELD_OUT_COLOURS) for _ in range(200)]
    assert {o.shape for s in scenes for o in s.objects} == set(S.HELD_OUT_SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(S.HELD_OUT_COLOURS)
    for scene in scenes:
        labels = S.scene_labels(scene)
        n = len(scene.objects)
        assert (labels["shape"][:n] >= len(S.SHAPES)).all() and (labels["colour"][:n] >= len(S.COLOURS)).all()
        assert [S.ALL_SHAPES[i] for i in labels["shape"][:n]] == [o.shape for o in scene.objects]
        img = S.render(scene)
        for obj in scene.objects:
            cx, cy, _ = S.object_box(obj)
            np.testing.assert_array_equal(img[int(cy * 32), int(cx * 32)], S.RGB[obj.colour])
        for split in ("train", "heldout"):
            text = S.caption(scene, rng, split)
            parsed = S.parse_prompt(text, held_out=True)["objects"]
            assert [(o["shape"], o["colour"]) for o in parsed] == _truth(scene), text
            assert all(o["shape"] is None for o in S.parse_prompt(text)["objects"]), text  # not without opting in
