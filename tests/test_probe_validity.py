"""Tests of the probe's validity head and calibrated confidences: the tower, features and argmax stay as shipped."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxdiff.convert.safetensors_io import load_safetensors
from jaxdiff.data import corruptions as C
from jaxdiff.metrics import pixel_judge as J
from jaxdiff.metrics import probe as P

# Seeds unused by tools/train_probe_validity.py (train 0, report 1, validation 2).
SEED = 7


@pytest.fixture(scope="module")
def probe():
    return P.load_probe()


def test_shipped_probe_has_its_validity_head_fitted_to_its_own_weights(probe):
    assert probe.has_validity
    cal = json.loads((P.DEFAULT_PATH / P.CALIBRATION).read_text())
    assert cal["params_sha256"] == P.file_sha256(P.DEFAULT_PATH / P.PARAMS)
    assert 0 < cal["threshold"] <= 0.5 and set(cal["temperatures"]) == set(P.HEADS)


def test_features_and_predictions_are_bit_identical_to_the_stored_weights(probe):
    real, _ = C.real(48, SEED)
    blobs, _ = C.sample("blend", 16, SEED)
    images = np.concatenate([real, blobs])
    # The stored weights, applied without the Probe class.
    flat = load_safetensors(P.DEFAULT_PATH / P.PARAMS)
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    cfg = json.loads((P.DEFAULT_PATH / P.CONFIG).read_text())
    net = P.ProbeNet(tuple(cfg["channels"]), cfg["features"], cfg["groups"])
    logits, feats = jax.jit(lambda p, x: net.apply({"params": p}, x))(params, jnp.asarray(images / 255.0, jnp.float32))
    preds, got_feats = probe(images)
    np.testing.assert_array_equal(got_feats, np.asarray(feats))
    verdicts = probe.judge(images)
    for name in P.HEADS:
        np.testing.assert_array_equal(preds[name], np.asarray(jnp.argmax(logits[name], -1)), err_msg=name)
        np.testing.assert_array_equal(verdicts["predictions"][name], preds[name], err_msg=name)


def test_real_renders_are_valid_and_judged_right(probe):
    images, labels, _ = J.render_split(300, "test")
    extra, extra_labels = C.real(200, SEED)
    images = np.concatenate([images, extra])
    labels = {k: np.concatenate([labels[k], extra_labels[k]]) for k in labels if k in extra_labels}
    verdicts = probe.judge(images, labels["num_objects"])
    acc = J.accuracy(verdicts, labels)  # the pixel judge's scoring reads the probe's verdicts
    assert acc["valid"] >= 0.99, acc
    assert acc["shape0"] >= 0.99 and acc["colour0"] >= 0.99 and acc["all"] >= 0.98, acc
    assert set(verdicts["reason"]) <= set(P.JUDGE_REASONS)


# Invalid rate per family, measured on these 40 clean images of seed 7 each: empty, noise, three_objects 100 %,
# half_shape 92.5 %, cut 90 %, noise_blob 82.5 %, blend 72.5 %, mixed_colour 67.5 %, unknown_colour 50 %,
# background 47.5 %, debris 15 % (the frozen features barely see 1-2 pixel specks; on the 300 per family of the
# held-out report seed: docs/shapes_judges.md). The floors sit ~2 binomial standard deviations below.
FLOORS = {
    "empty": 0.95,
    "noise": 0.95,
    "noise_blob": 0.6,
    "half_shape": 0.75,
    "cut": 0.7,
    "debris": 0.05,
    "three_objects": 0.95,
    "blend": 0.5,
    "mixed_colour": 0.45,
    "unknown_colour": 0.3,
    "background": 0.3,
}


def test_each_corruption_family_is_mostly_invalid(probe):
    assert set(FLOORS) == set(C.FAMILIES)
    sets = [C.sample(f, 40, SEED) for f in C.FAMILIES]
    verdicts = probe.judge(np.concatenate([im for im, _ in sets]), np.concatenate([k for _, k in sets]))
    rates = {f: float((~verdicts["valid"][i * 40 : (i + 1) * 40]).mean()) for i, f in enumerate(C.FAMILIES)}
    low = {f: r for f, r in rates.items() if r < FLOORS[f]}
    assert not low, rates


def test_object_count_disagreeing_with_the_prompt_is_invalid(probe):
    two, _ = C.real(20, SEED, num_objects=2)
    one, _ = C.real(20, SEED, num_objects=1)
    v = probe.judge(np.concatenate([two, one]), np.array([1] * 20 + [2] * 20))
    assert (v["reason"][:20] == "too_many").mean() >= 0.9 and (v["reason"][20:] == "too_few").mean() >= 0.9
    assert not v["valid"].any()


def test_confidences_are_probabilities_and_temperature_never_changes_argmax(probe):
    images, _ = C.real(40, SEED)
    corrupted, _ = C.sample("half_shape", 24, SEED)
    images = np.concatenate([images, corrupted])
    base = probe.judge(images)
    for name in P.HEADS:
        c = base["confidence"][name]
        assert c.dtype == np.float32 and ((c >= 0) & (c <= 1)).all(), name
    for t in (0.05, 1.0, 20.0):
        hot = P.Probe(probe.config, probe.params, probe.validity, {**probe.calibration, "temperatures": {}})
        hot.calibration["temperatures"] = dict.fromkeys(P.HEADS, t)
        v = hot.judge(images)
        for name in P.HEADS:
            np.testing.assert_array_equal(v["predictions"][name], base["predictions"][name])
            assert ((v["confidence"][name] >= 1 / len(P.HEADS[name][2]) - 1e-6) & (v["confidence"][name] <= 1)).all()


def test_temperature_fit_recovers_a_known_temperature_and_lowers_ece():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, (4000, 4))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=q) for q in p])
    overconfident = true_logits * 3.0  # a model 3x too sure: T = 3 undoes it
    t = P.fit_temperature(overconfident, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    correct = overconfident.argmax(1) == labels
    before = P.expected_calibration_error(P.softmax_confidence(overconfident), correct)
    after = P.expected_calibration_error(P.softmax_confidence(overconfident, t), correct)
    assert after < 0.03 < before


def test_a_folder_without_the_validity_files_still_loads(tmp_path, probe):
    for name in (P.CONFIG, P.PARAMS):
        shutil.copyfile(P.DEFAULT_PATH / name, tmp_path / name)
    old = P.load_probe(tmp_path)
    assert not old.has_validity
    images, labels = C.real(10, SEED, num_objects=2)
    with pytest.warns(UserWarning, match="no validity head"):
        v = old.judge(images, 1)
    assert not v["validity_available"] and np.isnan(v["validity"]).all()
    assert set(v["reason"]) == {"too_many"}  # the object-count rule still works
    np.testing.assert_array_equal(old(images)[1], probe(images)[1])
    # Validity files fitted to other weights are refused, not used.
    shutil.copyfile(P.DEFAULT_PATH / P.VALIDITY, tmp_path / P.VALIDITY)
    cal = json.loads((P.DEFAULT_PATH / P.CALIBRATION).read_text())
    (tmp_path / P.CALIBRATION).write_text(json.dumps({**cal, "params_sha256": "0" * 64}))
    with pytest.warns(UserWarning, match="other probe weights"):
        assert not P.load_probe(tmp_path).has_validity
