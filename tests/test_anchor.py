"""Anchor-start sampling (`jaxdiff.personalize.anchor`): strengths, the no-anchor reference, the layout judges."""

import numpy as np
import pytest

from jaxdiff.data import shapes as S
from jaxdiff.errors import UserError
from jaxdiff.metrics import pixel_judge
from jaxdiff.personalize import anchor


@pytest.fixture(scope="module")
def pipe():
    from jaxdiff.sampling.pipeline import load_pipeline

    return load_pipeline("shapes")


def test_anchor_renders_keep_their_own_layout_and_are_not_the_concept():
    scenes = anchor.anchor_scenes(16, seed=0)
    assert all(
        len(s.objects) == 2 and s.objects[0].shape in ("circle", "square") and s.objects[0].colour != "yellow"
        for s in scenes
    )
    images = np.stack([S.render(s, 32) for s in scenes])
    v = pixel_judge.judge(images, expected_objects=2)
    assert anchor.layout_kept(v, scenes).mean() >= 0.9
    assert anchor.right_kept(v, scenes).mean() >= 0.9
    assert not anchor.identity_left(v, "triangle", "yellow").any()
    prompts = anchor.composition_prompts(scenes[:1], "<v>")
    assert prompts[0].startswith("a <v> on the left and a ") and prompts[0].endswith(" on the right")


def test_strength_one_is_plain_text_to_image_and_lower_strength_stays_near_the_anchor(pipe):
    scenes = anchor.anchor_scenes(2, seed=1)
    anchors = np.stack([S.render(s, 32) for s in scenes]).astype(np.float32) / 255.0
    prompts = anchor.composition_prompts(scenes, "red circle")
    z = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(noise=z, steps=10, guidance=3.0)
    plain = anchor.sample_from_anchor(pipe, prompts, anchors, 1.0, **kw)
    np.testing.assert_array_equal(plain, pipe(prompts, latents=z, steps=10, guidance=3.0))
    near = anchor.sample_from_anchor(pipe, prompts, anchors, 0.2, **kw)
    assert near.shape == anchors.shape
    assert np.abs(near - anchors).mean() < np.abs(plain - anchors).mean()
    with pytest.raises(UserError, match="strength"):
        anchor.sample_from_anchor(pipe, prompts, anchors, 0.0, **kw)


def test_the_tool_has_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "tools/anchor_eval.py", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--strengths" in out.stdout and "Wilson" in out.stdout
