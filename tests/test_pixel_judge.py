"""Tests of the non-learned pixel judge: right on real renders (held-out concepts too), invalid on corrupted images."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.data import shapes as S
from jaxdiff.data.corruptions import fixed_cases as _corrupted
from jaxdiff.data.corruptions import render_objects as _render
from jaxdiff.metrics import pixel_judge as J

BASE = {"shapes": S.SHAPES, "colours": S.COLOURS}


def _check_accurate(held_out: bool, num_objects: int, n: int = 250) -> dict:
    # Reported on the TEST split; SHAPE_STATS come from the disjoint train split (see test_calibration...).
    images, labels, _ = J.render_split(n, "test", held_out=held_out, num_objects=num_objects)
    verdicts = J.judge(images, num_objects, **({} if held_out else BASE))
    acc = J.accuracy(verdicts, labels)
    assert acc["valid"] >= 0.99, acc
    for slot in range(num_objects):
        assert acc[f"shape{slot}"] >= 0.99 and acc[f"colour{slot}"] >= 0.99, acc
        assert acc[f"size{slot}"] >= 0.98, acc
    if num_objects == 1:
        assert acc["position0"] >= 0.98, acc
    return acc


# Measured on 1000 test-split renders per row (tools/judge_agreement.py): 100.0 % valid, shape, colour, size and
# position, for one and two objects, with the training vocabulary and with the held-out shapes and colours.
@pytest.mark.parametrize("num_objects", [1, 2])
def test_real_renders_are_valid_and_judged_right(num_objects):
    _check_accurate(False, num_objects)


@pytest.mark.parametrize("num_objects", [1, 2])
def test_held_out_shapes_and_colours_are_recognised(num_objects):
    images, labels, _ = J.render_split(250, "test", held_out=True, num_objects=num_objects)
    assert (labels["shape"] >= len(S.SHAPES)).any() and (labels["colour"] >= len(S.COLOURS)).any()
    _check_accurate(True, num_objects)


def test_hexagons_and_circles_are_told_apart_at_every_size_and_position():
    # The hard pair: a small left/right hexagon is ~10 pixels wide. Measured on 480 such renders: every one right; the
    # margin (RMS z-distance to the wrong shape minus to the right one) is 0.26 at least (small side hexagons), ~0.9
    # on average, while a render lies ~0.1-0.3 from its own shape.
    rng = np.random.default_rng(11)
    images, truth = [], []
    for shape in ("circle", "hexagon"):
        for position in S.POSITIONS:
            for size in S.SIZES:
                for _ in range(6):
                    obj = S.ShapeObject(
                        shape, str(rng.choice(S.ALL_COLOURS)), size, position, *rng.uniform(-0.03, 0.03, 2)
                    )
                    images.append(_render(obj, background=str(rng.choice(S.BACKGROUNDS))))
                    truth.append(S.ALL_SHAPES.index(shape))
    verdicts = J.judge(np.stack(images), 1)
    assert verdicts["valid"].all()
    np.testing.assert_array_equal(verdicts["shape"][:, 0], truth)
    blobs, _, _ = J.segment(np.stack(images))
    margins = []
    for objs, t in zip(blobs, truth):
        feats, _ = J.blob_features(objs[0]["alpha"])
        _, right = J.classify_shape(feats, [S.ALL_SHAPES[t]])
        _, wrong = J.classify_shape(feats, ["hexagon" if S.ALL_SHAPES[t] == "circle" else "circle"])
        margins.append(wrong - right)
    assert min(margins) > 0.1 and np.median(margins) > 0.5, (min(margins), np.median(margins))


def test_shape_statistics_come_from_the_train_split():
    stats = J.calibrate(n=400)
    for shape, (mean, _) in J.SHAPE_STATS.items():
        np.testing.assert_allclose(stats[shape][0], mean, atol=0.02, err_msg=shape)
    train, _, _ = J.render_split(50, "train")
    test, _, _ = J.render_split(50, "test")
    assert not any((a == b).all() for a in train for b in test)


def test_corrupted_images_are_invalid_with_the_right_reason():
    cases = _corrupted()
    images = np.stack([im for im, _, _ in cases.values()])
    verdicts = J.judge(images, np.array([k for _, k, _ in cases.values()]), **BASE)
    for (name, (_, _, reason)), valid, got in zip(cases.items(), verdicts["valid"], verdicts["reason"]):
        assert not valid, name
        assert got in J.REASONS and got != "ok", (name, got)
        if reason is not None:
            assert got == reason, (name, got)


def test_an_invalid_image_counts_as_wrong_never_as_a_success():
    images, labels, _ = J.render_split(40, "test", num_objects=1)
    images[::2] = images[::2, :1, :1]  # every other image: its background only
    verdicts = J.judge(images, 1, **BASE)
    acc = J.accuracy(verdicts, labels)
    assert acc["valid"] == pytest.approx(0.5) and set(verdicts["reason"][::2]) == {"empty"}
    assert acc["shape0"] == pytest.approx(0.5) and acc["colour0"] == pytest.approx(0.5) and acc["all"] <= 0.5


def test_accuracy_has_the_probes_heads_and_targets():
    from jaxdiff.metrics import probe

    _, labels, _ = J.render_split(30, "test")
    assert set(J.HEADS) == set(probe.HEADS)
    ours, theirs = J.targets(labels), probe.targets(labels)
    for name in probe.HEADS:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_float_images_are_judged_like_uint8():
    images, _, _ = J.render_split(20, "test")
    a, b = J.judge(images), J.judge(images.astype(np.float32) / 255.0)
    for key in ("valid", "shape", "colour", "size", "position"):
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="N, H, W, 3"):
        J.judge(images[0])
