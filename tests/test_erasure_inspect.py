"""tools/erasure_inspect.py: which images fail the preservation test, and why, grouped by scene; bad input."""

import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import erasure_inspect  # noqa: E402

from jaxdiff.data import shapes as S  # noqa: E402
from jaxdiff.erase import evaluate as ev  # noqa: E402


def _scene(colour, shape, background="grey"):
    return S.Scene(objects=(S.ShapeObject(shape, colour, "small", "center"),), background=background)


def test_failures_name_the_pixel_judges_reason_or_the_judge_that_names_it_wrong():
    scenes = [_scene("blue", "square"), _scene("blue", "square"), _scene("green", "circle"), _scene("green", "circle")]
    shape_id = {s: i for i, s in enumerate(ev.KINDS["shape"])}
    colour_id = {c: i for i, c in enumerate(ev.KINDS["colour"])}
    pixel_shape = [ev.VOCAB["shape"].index(s) for s in ("square", "square", "circle", "triangle")]
    pixel_colour = [ev.VOCAB["colour"].index(c) for c in ("blue", "blue", "green", "green")]
    verdicts = {
        "probe": {
            "shape0": np.asarray([shape_id[s] for s in ("square", "square", "circle", "circle")]),
            "colour0": np.asarray([colour_id[c] for c in ("blue", "blue", "green", "green")]),
        },
        "pixel": {
            "valid": np.asarray([True, False, True, True]),
            "reason": np.asarray(["ok", "fragments", "ok", "ok"]),
            "shape": np.asarray([[i, -1] for i in pixel_shape]),
            "colour": np.asarray([[i, -1] for i in pixel_colour]),
        },
    }
    found = erasure_inspect.failures(verdicts, scenes)
    assert found == [(1, "fragments"), (3, "pixel: shape triangle")]
    assert erasure_inspect.by_scene(found, scenes) == [
        (("blue", "square", "grey", "fragments"), 1),
        (("green", "circle", "grey", "pixel: shape triangle"), 1),
    ]
    assert erasure_inspect.failures(verdicts, scenes, kinds=("colour",)) == [(1, "fragments")]


def test_a_folder_that_is_not_a_finished_run_is_one_clear_line(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "config.json").write_text("{}")
    tool = os.path.join(erasure_inspect.ROOT, "tools", "erasure_inspect.py")
    result = subprocess.run([sys.executable, tool, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "has no model (an SPM run writes adapters, not a model)" in result.stderr.strip().splitlines()[-1]
    help_text = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "--set" in help_text and "preserved" in help_text
