"""Both judges' verdicts against the prompts (what `jaxdiff generate` records on shapes-world images)."""

import numpy as np

from jaxdiff.data.shapes_tfds import make_example
from jaxdiff.generate import _judge_shapes
from jaxdiff.metrics import shapes_verdicts as sv


def _renders(n=12):
    examples = [make_example("test", i, 32) for i in range(n)]
    return np.stack([e["image"] for e in examples]), [e["caption"] for e in examples]


def test_real_renders_match_their_captions_and_not_shifted_ones():
    images, captions = _renders()
    records, summary = sv.verdicts(images, captions)
    assert summary["n"] == 12 and summary["pixel_judge_matches_prompt"] == summary["probe_matches_prompt"] == 1.0
    assert all(r["asked"] and r["pixel_judge"]["objects"] == r["probe"]["objects"] for r in records)
    _, shifted = sv.verdicts(images, captions[1:] + captions[:1])
    assert shifted["pixel_judge_matches_prompt"] < 0.5 and shifted["probe_matches_prompt"] < 0.5


def test_a_blank_image_is_invalid_and_never_matches():
    blank = np.full((1, 32, 32, 3), 255, np.uint8)
    records, summary = sv.verdicts(blank, ["a red circle"])
    assert not records[0]["pixel_judge"]["valid"] and records[0]["pixel_judge"]["reason"] == "empty"
    assert summary["pixel_judge_matches_prompt"] == 0.0


def test_only_shapes_world_images_and_prompts_are_judged():
    images, captions = _renders(2)
    assert sv.applies(images, captions)
    assert not sv.applies(np.zeros((2, 64, 64, 3), np.uint8), captions)
    assert not sv.applies(images, ["a photo of a cat", captions[1]])
    records = [{"prompt": c} for c in captions]
    summary = _judge_shapes(list(images.astype(np.float32) / 255.0), captions, records)  # generate's float images
    assert summary["probe_matches_prompt"] == 1.0 and all("judges" in r for r in records)
    assert _judge_shapes(list(np.zeros((2, 64, 64, 3), np.float32)), captions, [{}, {}]) is None
