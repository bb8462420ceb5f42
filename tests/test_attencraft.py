"""AttenCraft: the JS attention loss, SSIM, mask derivation (segmentation, assignment, the x split) on hand-made maps,
and one tiny `jaxdiff personalize` run that trains only cross-attention K/V and the two token rows."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxdiff import cli, selectors
from jaxdiff.data import shapes as S
from jaxdiff.images import save_png
from jaxdiff.personalize import attencraft as A
from jaxdiff.personalize import tokens
from jaxdiff.sampling.pipeline import load_pipeline

CONFIG = "configs/personalize/attencraft.py:shapes,runlocal"


def _np_js(p, q):
    """JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q) / 2, natural log."""
    m = (p + q) / 2
    return 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_js_of_a_map_with_itself_is_zero_and_matches_the_formula_otherwise():
    rng = np.random.default_rng(0)
    a, b = rng.random(64), rng.random(64)
    p, q = _softmax(a), _softmax(b)
    assert float(A.js_divergence(jnp.asarray(p), jnp.asarray(p))) == pytest.approx(0.0, abs=1e-7)
    got = float(A.js_divergence(jnp.asarray(p), jnp.asarray(q)))
    assert got > 1e-4 and got == pytest.approx(_np_js(p, q), rel=1e-4)
    # the attention loss: softmax over pixels of the min-max normalised map vs softmax of the binary mask
    mask = (b > 0.5).astype(np.float32)
    norm = (a - a.min()) / (a.max() - a.min())
    want = _np_js(_softmax(norm), _softmax(mask))
    assert float(A.attention_js(jnp.asarray(a), jnp.asarray(mask))) == pytest.approx(want, rel=1e-4)
    assert float(A.attention_js(jnp.asarray(mask * 5.0), jnp.asarray(mask))) == pytest.approx(0.0, abs=1e-7)


def _np_ssim(a, b, win=7):
    """skimage.metrics.structural_similarity(a, b, data_range=1, win_size=win) transcribed (uniform filter, sample
    covariance, the border cropped)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    f = lambda x: ndimage.uniform_filter(x, size=win)  # noqa: E731
    n = win * win / (win * win - 1)
    ux, uy = f(a), f(b)
    vx, vy, vxy = n * (f(a * a) - ux * ux), n * (f(b * b) - uy * uy), n * (f(a * b) - ux * uy)
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return s[pad:-pad, pad:-pad].mean()


def test_ssim_matches_skimage_formula_and_is_one_for_equal_masks():
    rng = np.random.default_rng(1)
    a = (rng.random((8, 8)) > 0.6).astype(np.float32)
    b = a.copy()
    b[3, 3] = 1 - b[3, 3]
    assert float(A.ssim(jnp.asarray(a), jnp.asarray(a))) == pytest.approx(1.0, abs=1e-6)
    got = float(A.ssim(jnp.asarray(a), jnp.asarray(b)))
    assert got < 0.99 and got == pytest.approx(_np_ssim(a, b), abs=1e-5)
    c = rng.random((12, 12)).astype(np.float32)
    d = rng.random((12, 12)).astype(np.float32)
    assert float(A.ssim(jnp.asarray(c), jnp.asarray(d))) == pytest.approx(_np_ssim(c, d), abs=1e-5)


def _blob(rows, cols, side=8):
    m = np.zeros((side, side), np.float32)
    m[rows, cols] = 1.0
    return m.reshape(-1)


def test_segment_and_assign_on_hand_made_maps():
    left, right = _blob(slice(3, 5), slice(1, 3)), _blob(slice(3, 5), slice(5, 7))
    bg = 1.0 - left - right
    m = jnp.asarray(np.stack([bg, left, right]))
    labels = np.asarray(A.segment(m, 0.1))
    np.testing.assert_array_equal(labels, np.where(left > 0, 1, np.where(right > 0, 2, 0)))
    owner, distinct = A.assign(jnp.asarray(labels), m)
    assert bool(distinct) and list(np.asarray(owner)) == [0, 1, 2]
    masks = np.asarray(A.token_masks(jnp.asarray(labels), owner))
    np.testing.assert_array_equal(masks, np.stack([bg, left, right]))
    # a pixel whose best map leads by less than the threshold stays unassigned
    close = np.stack([bg, left, right])
    close[2, 0] = close[0, 0] - 0.05
    assert np.asarray(A.segment(jnp.asarray(close), 0.1))[0] == -1
    # classes whose masses favour the same token: not distinct (the official code aborts)
    swapped = np.stack([bg, left + right, right * 0.0])
    labels = A.segment(jnp.asarray(swapped), 0.1)
    _, distinct = A.assign(labels, jnp.asarray(swapped))
    assert not bool(distinct)


def test_derive_masks_needs_distinct_maps_unless_the_x_split_is_on():
    left, right = _blob(slice(3, 5), slice(1, 3)), _blob(slice(3, 5), slice(5, 7))
    both = left + right
    cross = jnp.asarray(np.stack([1.0 - both, both, both]))  # the two tokens' maps agree (as on shapes)
    affinity = jnp.eye(64)
    s = A.MaskSettings(cross_side=8, affinity_side=8, cross_power=1.0, affinity_power=1, threshold=0.1)
    _, distinct, _ = A.derive_masks(cross, affinity, s)
    assert not bool(distinct)
    masks, distinct, _ = A.derive_masks(cross, affinity, A.MaskSettings(8, 8, 1.0, 1, 0.1, "x_kmeans"))
    assert bool(distinct)
    np.testing.assert_array_equal(np.asarray(masks), np.stack([1.0 - both, left, right]))
    # distinct maps: the official path, the split is not used
    cross = jnp.asarray(np.stack([1.0 - both, right, left]))
    masks, distinct, _ = A.derive_masks(cross, affinity, A.MaskSettings(8, 8, 1.0, 1, 0.1, "x_kmeans"))
    assert bool(distinct)
    np.testing.assert_array_equal(np.asarray(masks), np.stack([1.0 - both, right, left]))


def test_refine_spreads_a_map_along_the_affinity():
    a = np.eye(4, dtype=np.float32)
    a[0, 1] = a[1, 0] = 1.0  # pixels 0 and 1 attend to each other
    m = np.asarray(A.refine(jnp.asarray([[1.0, 0.0, 0.0, 0.0]]), jnp.asarray(a), 2))[0]
    assert m[0] == pytest.approx(1.0) and m[1] == pytest.approx(1.0) and m[2] == m[3] == 0.0


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    objs = (S.ShapeObject("cross", "purple", "large", "left"), S.ShapeObject("star", "orange", "large", "right"))
    save_png(folder / "000.png", S.render(S.Scene(objs, "white"), 32))
    return folder


FAST = ["--no-progress", "--config.sample.num_images=0", "--config.prior.num_images=0"]


@pytest.fixture(scope="module")
def run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "attencraft"
    args = ["personalize", "--config", CONFIG, "--images", str(images), "--token", "<a>,<b>", "--out", str(out)]
    assert cli.main([*args, *FAST, "--config.train.steps=2", "--config.refresh_every=1"]) == 0
    return out


def test_a_step_moves_only_cross_attention_kv_and_the_two_token_rows(run):
    base, personal = load_pipeline("shapes"), load_pipeline(run / "model")
    before, after = selectors.flatten(base.unet.params), selectors.flatten(personal.unet.params)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    kv = {p for p in before if "attn2" in p and p[-2] in ("to_k", "to_v") and p[-1] == "kernel"}
    assert changed == kv  # every attn2 K/V kernel moved, nothing else
    for a, b in zip(selectors.flatten(base.vae.params).values(), selectors.flatten(personal.vae.params).values()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    old = np.asarray(tokens.table_of(base.text_encoders[0].params))
    new = np.asarray(tokens.table_of(personal.text_encoders[0].params))
    assert new.shape == (old.shape[0] + 2, old.shape[1])
    np.testing.assert_array_equal(new[: old.shape[0]], old)  # every old row bit-identical
    init = np.asarray(tokens.init_rows(old, "shape", base.tokenizers[0]))[0]
    assert not np.array_equal(new[-2], init) and not np.array_equal(new[-1], init)  # both rows trained
    other = {p: v for p, v in selectors.flatten(base.text_encoders[0].params).items() if "token_embedding" not in p}
    flat = selectors.flatten(personal.text_encoders[0].params)
    for p, v in other.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat[p]))


def test_the_command_writes_both_tokens_masks_and_a_report(run):
    embeds = tokens.load_embeds(run / tokens.EMBEDS_FILE)
    assert list(embeds) == ["<a>", "<b>"]
    saved = np.load(run / A.MASKS_FILE)
    assert saved["initial"].shape == (3, 64) and saved["final"].shape == (3, 64)
    assert set(np.unique(saved["final"])) <= {0.0, 1.0}
    assert saved["initial"][1].sum() > 0 and saved["initial"][2].sum() > 0
    assert saved["refreshes"][0] == 1  # step 1 of 2 refreshes (step 0 uses the initial masks)
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "attencraft" and report["token"] == "<a>,<b>" and report["steps"] == 2
    assert report["loss_last"] is not None
    personal = load_pipeline(run / "model")
    assert personal.tokenizers[0]("a <a> and a <b>").input_ids[2] == 308


def test_one_token_or_no_split_is_a_one_line_error(images, tmp_path, capsys):
    args = ["personalize", "--config", CONFIG, "--images", str(images), *FAST]
    assert cli.main([*args, "--out", str(tmp_path / "one"), "--token", "<a>"]) == 2
    assert "learns 2 tokens" in capsys.readouterr().err and not (tmp_path / "one").exists()
    # the official segmentation on the shapes model: the fresh tokens' maps agree, no distinct classes
    assert cli.main([*args, "--out", str(tmp_path / "none"), "--token", "<a>,<b>", "--config.split=none"]) == 2
    assert "distinct" in capsys.readouterr().err
    ti = ["personalize", "--config", "configs/personalize/textual_inversion.py:runlocal", "--images", str(images)]
    assert cli.main([*ti, "--out", str(tmp_path / "ti"), "--token", "<a>,<b>"]) == 2
    assert "learns one token" in capsys.readouterr().err
